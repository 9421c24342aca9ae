"""`hinge eval`: score predictions against measured spot expression, with maps and a report.

The truth goes through the transform the model was trained with (read from the
prediction's `uns['hinge']['transform']`), so numbers are in model space. Since
sequencing depth dominates raw correlations (DESIGN.md, "Evaluation"), every
correlation metric is reported three ways: in model space, on library-size
normalised targets (CP10k-log), and depth-partial (the headline).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial import cKDTree
from scipy.spatial.distance import squareform

from hinge_cli import metrics, plots
from hinge_cli.data.expression import Expression, Transform, read_expression, read_h5ad
from hinge_cli.errors import HingeError
from hinge_cli.progress import SILENT, Progress
from hinge_cli.files import write_text_atomic
from hinge_cli.run import Run

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("hinge-eval")
N_TOP_VARIABLE = 50  # HEST convention
PCC_KS = (50, 200)  # Stem/HINGE tables
N_MAP_GENES = 6  # best and worst genes drawn as maps
MORAN_K = 6  # neighbours in the Moran's I weights (one ring of a Visium hex grid)
MIN_SPOTS = 3
HEADLINE = "correlation.depth_partial.pearson.mean"
VIEWS = {
    "depth_partial": "depth-partial",
    "normalised": "CP10k-log",
    "model": "model space",
}
NOTES = {
    "model space": "prediction and truth after the model's own transform (uns['hinge']['transform']).",
    "CP10k-log": "truth as log1p(counts per 10k of the spot's total over all its genes); the prediction is "
                 "turned back into counts (base^x - 1, clipped at 0) and put on the same scale: from its own "
                 "target_sum when the model was trained on normalised targets, else with the same library size "
                 "as the truth, so a prediction that only knows depth gets no credit.",
    "depth-partial": "both sides regressed on the spot's log total counts within the slide, residuals "
                     "correlated: gene-specific signal beyond sequencing depth. The headline.",
    "constant genes": "a gene constant (or non-finite) on either side has no correlation; it is excluded "
                      "from means and counted as 'genes excluded'.",
    "top-50": "mean over the 50 truth genes with the largest variance in model space (HEST convention).",
    "PCC@k": "mean of the k best genes, the convention of published tables (Stem, HINGE); optimistic by "
             "construction, since it picks genes after seeing the result. n/a when the panel has fewer than k genes.",
    "co-expression": "Pearson between the upper triangles of the predicted and true gene-gene correlation "
                     "matrices (1 = same structure), and their mean absolute difference.",
    "MSE/MAE": "over all spots and genes, in model space.",
    "RVD": "relative variance distance, mean over genes of (var_pred - var_true)^2 / var_true^2: 0 is perfect, "
           "a prediction without spread scores 1.",
    "Moran's I": f"per gene on row-standardised {MORAN_K}-nearest-neighbour weights over spot centres; "
                 "agreement is the Pearson across genes of predicted against true I.",
    "calibration": "fraction of true values inside mean ± 1 and ± 2 predicted std (layers['std']); "
                   "a calibrated Gaussian gives 0.683 and 0.954.",
}


# ----------------------------------------------------------------------------- inputs


@dataclass
class Prediction:
    """What `eval` needs from a prediction .h5ad (see DESIGN.md, "Output of generate")."""

    path: Path
    sample: str
    barcodes: list[str]
    genes: list[str]
    values: np.ndarray
    std: np.ndarray | None
    coords: np.ndarray | None
    transform: Transform
    image: np.ndarray | None = None
    image_scale: float = 1.0
    spot_diameter: float | None = None


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _dense(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float64)


def _unique(names: list[str], path: Path) -> list[str]:
    if len(set(names)) != len(names):
        raise HingeError(f"{path} has duplicate spot barcodes", "make obs_names unique (adata.obs_names_make_unique())")
    return names


def read_prediction(path: Path) -> Prediction:
    """Read a prediction written by `hinge generate`, checking it carries its transform."""
    path = Path(path)
    adata = read_h5ad(path, "prediction file", "give the .h5ad written by `hinge generate --out`")
    provenance = dict(adata.uns.get("hinge", {}))
    if "transform" not in provenance:
        raise HingeError(
            f"{path} does not record the transform its values are in (uns['hinge']['transform'])",
            "evaluate a file written by `hinge generate`, or set uns['hinge']['transform'] = "
            "{'normalize': 'none', 'target_sum': 10000, 'log_base': 2}",
        )
    try:
        transform = Transform.from_dict({k: _plain(v) for k, v in dict(provenance["transform"]).items()})
    except TypeError as exc:
        raise HingeError(f"{path}: uns['hinge']['transform'] is malformed ({exc})", "keys are normalize, target_sum, log_base") from None
    spatial = dict(adata.uns.get("spatial", {}))
    sample = str(provenance.get("sample_id") or provenance.get("sample") or (next(iter(spatial)) if len(spatial) == 1 else path.stem))
    pred = Prediction(
        path=path, sample=sample, barcodes=_unique([str(b) for b in adata.obs_names], path),
        genes=[str(g) for g in adata.var_names], values=_dense(adata.X),
        std=_dense(adata.layers["std"]) if "std" in adata.layers else None,
        coords=np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2] if "spatial" in adata.obsm else None,
        transform=transform,
    )
    entry = spatial.get(sample, next(iter(spatial.values()))) if spatial else {}
    scalefactors = dict(entry.get("scalefactors", {}))
    if scalefactors.get("spot_diameter_fullres"):
        pred.spot_diameter = float(scalefactors["spot_diameter_fullres"])
    hires = dict(entry.get("images", {})).get("hires")
    if hires is not None and "tissue_hires_scalef" in scalefactors:
        image = np.asarray(hires)
        pred.image = (image * 255).clip(0, 255).astype(np.uint8) if image.dtype.kind == "f" and image.max() <= 1 else image.astype(np.uint8)
        pred.image_scale = float(scalefactors["tissue_hires_scalef"])
    return pred


def read_gene_list(path: Path) -> list[str]:
    """One symbol per line; blank lines and '#' comments ignored."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"gene list {path} does not exist", "give a text file with one gene symbol per line")
    genes = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not genes:
        raise HingeError(f"gene list {path} is empty", "list the genes to evaluate, one per line")
    return list(dict.fromkeys(genes))


# ----------------------------------------------------------------------------- alignment


def median_spacing(coords: np.ndarray) -> float:
    """Median distance from each spot to its nearest neighbour (the grid pitch)."""
    dist, _ = cKDTree(coords).query(coords, k=2)
    return float(np.median(dist[:, 1]))


def match_coordinates(pred_xy: np.ndarray, truth_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest matches within `radius`: (pred rows, truth rows); the closer claim wins a contested spot."""
    dist, nearest = cKDTree(truth_xy).query(pred_xy, k=1, distance_upper_bound=radius)
    found = np.flatnonzero(np.isfinite(dist))
    order = found[np.argsort(dist[found], kind="stable")]
    _, first = np.unique(nearest[order], return_index=True)
    keep = np.sort(order[first])
    return keep, nearest[keep]


@dataclass
class Aligned:
    """One prediction and its truth on the same spots and genes."""

    sample: str
    genes: list[str]
    pred: np.ndarray
    std: np.ndarray | None
    counts: np.ndarray
    totals: np.ndarray
    coords: np.ndarray
    spot_diameter: float
    alignment: dict[str, Any]
    gene_report: dict[str, Any]


def align(pred: Prediction, truth: Expression, genes: Sequence[str] | None = None, truth_path: Path | None = None) -> Aligned:
    """Match spots (barcodes, else coordinates within half a spot) and genes (the panel ∩ the truth ∩ `genes`)."""
    index = {b: i for i, b in enumerate(_unique(truth.barcodes, truth_path or Path("truth")))}
    shared = [(i, index[b]) for i, b in enumerate(pred.barcodes) if b in index]
    spacing = median_spacing(truth.coords) if truth.coords is not None and len(truth.coords) > 1 else None
    diameter = pred.spot_diameter or spacing
    alignment: dict[str, Any] = {"n_pred_spots": len(pred.barcodes), "n_truth_spots": len(truth.barcodes)}
    if shared:
        rows_p, rows_t = (np.array(r, dtype=int) for r in zip(*shared))
        alignment["matched_by"] = "barcode"
    else:
        if pred.coords is None or truth.coords is None or diameter is None:
            raise HingeError(
                f"prediction {pred.path} and truth share no spot barcode, and coordinates are missing",
                "give both files obsm['spatial'] in level-0 pixels, or use the truth's barcodes",
            )
        rows_p, rows_t = match_coordinates(pred.coords, truth.coords, diameter / 2)
        alignment.update(matched_by="coordinates", radius_px=diameter / 2)
    alignment["n_matched"] = len(rows_p)
    if len(rows_p) < MIN_SPOTS:
        raise HingeError(
            f"only {len(rows_p)} spots of {pred.path} match the truth (by {alignment['matched_by']})",
            "check that both files describe the same slide, with coordinates in the same level-0 pixels",
        )
    candidates = list(pred.genes)
    not_in_prediction: list[str] = []
    if genes is not None:
        panel = set(pred.genes)
        not_in_prediction = [g for g in genes if g not in panel]
        wanted = set(genes)
        candidates = [g for g in pred.genes if g in wanted]
    truth_genes = set(truth.genes)
    missing = [g for g in candidates if g not in truth_genes]
    evaluated = [g for g in candidates if g in truth_genes]
    if not evaluated:
        raise HingeError(
            f"no gene of the prediction's panel is in the truth {truth_path or ''}".rstrip(),
            "check that gene symbols match (same naming, e.g. HGNC symbols) and any --genes list",
        )
    column = {g: j for j, g in enumerate(pred.genes)}
    cols = np.array([column[g] for g in evaluated])
    values = pred.values[np.ix_(rows_p, cols)]
    std = pred.std[np.ix_(rows_p, cols)] if pred.std is not None else None
    finite = np.isfinite(values).all(0) & (np.isfinite(std).all(0) if std is not None else True)
    dropped = [g for g, ok in zip(evaluated, finite) if not ok]
    if not finite.any():
        raise HingeError(f"every prediction of {pred.path} holds NaN or infinite values", "re-run `hinge generate`")
    for what, names in (("missing from the truth", missing), ("with non-finite predictions, left out", dropped),
                        ("asked for but not in the prediction's panel", not_in_prediction)):
        if names:
            log.warning("%s: %d genes %s: %s", pred.sample, len(names), what, ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
    kept = [g for g, ok in zip(evaluated, finite) if ok]
    counts = truth.columns(kept)[rows_t].astype(np.float64)
    coords = pred.coords[rows_p] if pred.coords is not None else truth.coords[rows_t] if truth.coords is not None else None
    if coords is None:
        raise HingeError(f"neither {pred.path} nor the truth has obsm['spatial']", "add spot centres in level-0 pixels")
    return Aligned(
        sample=pred.sample, genes=kept, pred=values[:, finite], std=std[:, finite] if std is not None else None,
        counts=counts, totals=truth.totals[rows_t].astype(np.float64), coords=coords,
        spot_diameter=float(diameter if diameter is not None else median_spacing(coords)), alignment=alignment,
        gene_report={"n_panel": len(pred.genes), "n_evaluated": len(kept), "missing_from_truth": missing,
                     "dropped_nonfinite": dropped, "not_in_prediction": not_in_prediction},
    )


# ----------------------------------------------------------------------------- scoring


def to_cp10k_log(pred: np.ndarray, transform: Transform, totals: np.ndarray) -> np.ndarray:
    """Model-space predictions as log1p(counts per 10k): invert the transform, rescale by the spot's library size."""
    counts = np.maximum(np.power(transform.log_base, pred) - 1.0, 0.0)
    library = np.full(len(pred), transform.target_sum) if transform.normalize == "total" else np.maximum(totals, 1.0)
    return np.log1p(counts * (1e4 / library)[:, None])


@dataclass
class SlideScore:
    """Every number of one slide (`metrics`, JSON-ready) and the arrays the pictures need."""

    metrics: dict[str, Any]
    truth: np.ndarray
    pearson: np.ndarray
    partial: np.ndarray
    coexpression: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # view -> (predicted, true, gene indices)


def score(aligned: Aligned, transform: Transform) -> SlideScore:
    """All metrics of one aligned slide (see NOTES for their definitions)."""
    pred, log_depth = aligned.pred, np.log(np.maximum(aligned.totals, 1.0))
    truth = transform.apply(aligned.counts, aligned.totals).astype(np.float64)
    top = metrics.top_variable(truth, N_TOP_VARIABLE)
    p_res, t_res, valid = metrics.depth_residuals(pred, truth, log_depth)
    pairs = {
        "model": (pred, truth, None),
        "normalised": (to_cp10k_log(pred, transform, aligned.totals), metrics.cp10k_log(aligned.counts, aligned.totals), None),
        "depth_partial": (p_res, t_res, valid),
    }
    correlation: dict[str, Any] = {}
    per_gene: dict[str, np.ndarray] = {}
    matrices: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for view, (p, t, mask) in pairs.items():
        if mask is None:
            r, rho = metrics.pearson_per_gene(p, t), metrics.spearman_per_gene(p, t)
        else:
            r, rho = metrics.depth_partial_pearson(pred, truth, log_depth), metrics.depth_partial_spearman(pred, truth, log_depth)
        coex, cp, ct, used = metrics.coexpression(p, t, mask)
        correlation[view] = {"pearson": metrics.summarise_correlations(r, top, PCC_KS),
                             "spearman": metrics.summarise_correlations(rho, top, PCC_KS), "coexpression": coex}
        per_gene[f"pearson_{view}"], per_gene[f"spearman_{view}"] = r, rho
        matrices[view] = (cp, ct, used)

    rvd, rvd_terms = metrics.relative_variance_distance(pred, truth)
    weights = metrics.knn_weights(aligned.coords, MORAN_K)
    moran_pred, moran_true = metrics.morans_i(pred, weights), metrics.morans_i(truth, weights)
    both = np.isfinite(moran_pred) & np.isfinite(moran_true)
    agreement = metrics.pearson_per_gene(moran_pred[both, None], moran_true[both, None])[0] if both.sum() >= 2 else math.nan
    per_gene.update(
        mse=((pred - truth) ** 2).mean(0), mae=np.abs(pred - truth).mean(0), var_true=truth.var(0), var_pred=pred.var(0),
        rvd=rvd_terms, morans_i_true=moran_true, morans_i_pred=moran_pred,
    )
    calibration = None
    if aligned.std is not None:
        calibration = {**metrics.calibration(pred, aligned.std, truth), "expected_gaussian": {"within_1std": 0.683, "within_2std": 0.954}}
        inside = np.abs(truth - pred) <= aligned.std
        per_gene["within_1std"] = inside.mean(0)
    numbers = {
        "correlation": correlation,
        "errors": {"mse": metrics.mse(pred, truth), "mae": metrics.mae(pred, truth)},
        "variance": {"rvd": rvd, "n_genes": int(np.isfinite(rvd_terms).sum()),
                     "mean_var_true": float(truth.var(0).mean()), "mean_var_pred": float(pred.var(0).mean())},
        "spatial": {"morans_i_agreement": float(agreement),
                    "morans_i_mean_abs_diff": metrics.finite_mean(np.abs(moran_pred - moran_true)),
                    "morans_i_mean_true": metrics.finite_mean(moran_true), "morans_i_mean_pred": metrics.finite_mean(moran_pred),
                    "n_genes": int(both.sum()), "weights": f"row-standardised {MORAN_K}-nearest neighbours"},
        "calibration": calibration,
        "per_gene": {g: {k: v[j] for k, v in per_gene.items()} for j, g in enumerate(aligned.genes)},
    }
    return SlideScore(numbers, truth, per_gene["pearson_model"], per_gene["pearson_depth_partial"], matrices)


# ----------------------------------------------------------------------------- pictures


def _file_name(gene: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", gene)


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([a[np.isfinite(a)] for a in arrays])
    lo, hi = np.percentile(values, [1, 99]) if len(values) else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def pick_genes(genes: list[str], r: np.ndarray, extra: Sequence[str] = (), n: int = N_MAP_GENES) -> dict[str, list[str]]:
    """The n best and n worst genes by Pearson (finite only), and the extra genes asked for."""
    ranked = [genes[j] for j in np.argsort(-np.where(np.isfinite(r), r, -np.inf), kind="stable") if np.isfinite(r[j])]
    return {"best": ranked[:n], "worst": ranked[::-1][:n], "asked": list(extra)}


def draw_pictures(aligned: Aligned, pred: Prediction, result: SlideScore, maps_dir: Path,
                  genes_to_plot: Sequence[str] = ()) -> dict[str, Any]:
    """Maps (true | predicted | error) of the chosen genes, co-expression heatmaps and the Pearson-variance scatter."""
    chosen = pick_genes(aligned.genes, result.pearson, genes_to_plot)
    column = {g: j for j, g in enumerate(aligned.genes)}
    files: dict[str, Any] = {"maps": {}}
    for gene in dict.fromkeys(chosen["best"] + chosen["worst"] + chosen["asked"]):
        j = column[gene]
        truth, guess = result.truth[:, j], aligned.pred[:, j]
        lo, hi = _limits(truth, guess)
        err = guess - truth
        bound = float(np.percentile(np.abs(err), 99)) or 1.0
        panels = [plots.MapPanel("true", truth, lo, hi), plots.MapPanel("predicted", guess, lo, hi),
                  plots.MapPanel("error (predicted - true)", err, -bound, bound, "diverging")]
        title = f"{aligned.sample}  {gene}   Pearson {result.pearson[j]:.3f}   depth-partial {result.partial[j]:.3f}"
        path = plots.spot_map(maps_dir / f"{_file_name(gene)}.png", aligned.coords, panels, aligned.spot_diameter, title,
                              pred.image, pred.image_scale)
        files["maps"][gene] = path.name
    for view in ("model", "depth_partial"):
        cp, ct, used = result.coexpression[view]
        if len(used) < 2:
            continue
        order = leaves_list(linkage(squareform(np.clip(1 - ct, 0, 2), checks=False), "average")) if len(used) > 2 else np.arange(len(used))
        names = [aligned.genes[used[k]] for k in order]
        path = plots.heatmaps(maps_dir / f"coexpression_{view}.png",
                              [("true", ct[np.ix_(order, order)]), ("predicted", cp[np.ix_(order, order)])], names,
                              f"{aligned.sample}: gene-gene Pearson, {VIEWS[view]} (genes clustered on the truth)")
        files[f"coexpression_{view}"] = path.name
    variance = result.truth.var(0)
    path = plots.scatter(maps_dir / "pearson_vs_variance.png",
                         {"Pearson": (variance, result.pearson), "depth-partial": (variance, result.partial)},
                         f"{aligned.sample}: per-gene correlation against truth variance", "variance of the truth (model space)",
                         "Pearson r")
    files["pearson_vs_variance"] = path.name
    files["chosen"] = chosen
    return files


# ----------------------------------------------------------------------------- report


CORRELATION_ROWS = (
    ("pearson.mean", "mean Pearson"),
    ("pearson.mean_top_variable", "mean Pearson, top-50 variable genes"),
    ("pearson.pcc_at_50", "PCC@50 (published-table convention, optimistic)"),
    ("pearson.pcc_at_200", "PCC@200 (published-table convention, optimistic)"),
    ("spearman.mean", "mean Spearman"),
    ("coexpression.consistency", "co-expression consistency (r)"),
    ("coexpression.mean_abs_diff", "co-expression mean abs. difference"),
    ("pearson.n_excluded", "genes excluded (constant or non-finite)"),
)
ROWS = [(f"{label} [{name}]", f"correlation.{view}.{key}") for view, name in VIEWS.items() for key, label in CORRELATION_ROWS] + [
    ("MSE", "errors.mse"), ("MAE", "errors.mae"), ("RVD (relative variance distance)", "variance.rvd"),
    ("Moran's I agreement (r across genes)", "spatial.morans_i_agreement"),
    ("Moran's I mean abs. difference", "spatial.morans_i_mean_abs_diff"),
    ("Moran's I mean, truth", "spatial.morans_i_mean_true"), ("Moran's I mean, prediction", "spatial.morans_i_mean_pred"),
    ("within mean ± 1 std (Gaussian 0.683)", "calibration.within_1std"),
    ("within mean ± 2 std (Gaussian 0.954)", "calibration.within_2std"),
]


def lookup(data: dict[str, Any], dotted: str) -> Any:
    """data['a']['b'] for 'a.b'; None where any step is missing."""
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def across_slides(slides: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Mean and sample std (ddof=1) over slides of every table metric; NaN/absent values are left out and counted."""
    out: dict[str, dict[str, float | int]] = {}
    for _, key in ROWS:
        values = np.array([v for s in slides if isinstance(v := lookup(s, key), (int, float)) and math.isfinite(v)], float)
        out[key] = {"mean": float(values.mean()) if len(values) else math.nan,
                    "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan, "n": int(len(values))}
    return out


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def metrics_table(slides: Sequence[dict[str, Any]], summary: dict[str, dict[str, float | int]] | None = None,
                  rows: Sequence[tuple[str, str]] = tuple(ROWS)) -> str:
    """Markdown table: one row per metric, one column per slide, plus mean ± std when given."""
    body = []
    for label, key in rows:
        cells = [_fmt(lookup(s, key)) for s in slides]
        if summary:
            cells.append(f"{_fmt(summary[key]['mean'])} ± {_fmt(summary[key]['std'])}")
        body.append([f"**{c}**" for c in [label, *cells]] if key == HEADLINE else [label, *cells])
    return _markdown(["metric"] + [s["sample"] for s in slides] + (["mean ± std"] if summary else []), body)


def correlation_table(slide: dict[str, Any]) -> str:
    """One slide's correlation metrics: one row per metric, one column per view (depth-partial first: the headline)."""
    body = [[label] + [_fmt(lookup(slide, f"correlation.{view}.{key}")) for view in VIEWS] for key, label in CORRELATION_ROWS]
    return _markdown(["correlation metric"] + list(VIEWS.values()), body)


def _notes() -> str:
    return "\n".join(f"- **{name}**: {text}" for name, text in NOTES.items())


def slide_report(slide: dict[str, Any]) -> str:
    """report.md of one slide: provenance, the metric table, best and worst genes, pictures, definitions."""
    a, g, t = slide["alignment"], slide["genes"], slide["transform"]
    transform = (f"log{t['log_base']:g}(counts + 1)" if t["normalize"] == "none"
                 else f"log{t['log_base']:g}(counts per {t['target_sum']:g} + 1)")
    lines = [
        f"# hinge eval: {slide['sample']}", "",
        f"- prediction `{slide['pred']}`, truth `{slide['truth']}`",
        f"- spots: {a['n_matched']} matched by {a['matched_by']} (prediction {a['n_pred_spots']}, truth {a['n_truth_spots']})",
        f"- genes: {g['n_evaluated']} evaluated of a {g['n_panel']}-gene panel; model space {transform}",
    ]
    for key, what in (("missing_from_truth", "missing from the truth"), ("dropped_nonfinite", "left out, non-finite predictions"),
                      ("not_in_prediction", "asked for but not in the panel")):
        if g[key]:
            lines.append(f"- {len(g[key])} genes {what}: {', '.join(g[key])}")
    lines += ["", f"**Headline: depth-partial mean Pearson = {_fmt(lookup(slide, HEADLINE))}** "
                  "(gene-specific signal beyond sequencing depth).", "", correlation_table(slide), "",
              metrics_table([slide], rows=[r for r in ROWS if not r[1].startswith("correlation.")]), ""]
    per_gene, pictures = slide["per_gene"], slide["pictures"]
    lines += ["## Best and worst genes (by model-space Pearson)", "", "| gene | Pearson | depth-partial | Spearman | MSE |", "|---|---|---|---|---|"]
    for gene in dict.fromkeys(pictures["chosen"]["best"] + pictures["chosen"]["worst"]):
        row = per_gene[gene]
        lines.append(f"| {gene} | {_fmt(row['pearson_model'])} | {_fmt(row['pearson_depth_partial'])} | "
                     f"{_fmt(row['spearman_model'])} | {_fmt(row['mse'])} |")
    lines += ["", "## Pictures", ""]
    lines += [f"![{name}](maps/{file})" for name, file in pictures.items() if name not in ("maps", "chosen")]
    lines += [f"![{gene}](maps/{file})" for gene, file in pictures["maps"].items()]
    lines += ["", "## What the numbers mean", "", _notes(), ""]
    return "\n".join(lines)


def summary_report(slides: Sequence[dict[str, Any]], summary: dict[str, dict[str, float | int]]) -> str:
    """report.md across slides: the per-slide columns and mean ± std."""
    links = [f"- [{s['sample']}]({s['sample']}/report.md)" for s in slides]
    return "\n".join([f"# hinge eval: {len(slides)} slides", "", *links, "",
                      f"**Headline: depth-partial mean Pearson = {_fmt(summary[HEADLINE]['mean'])} ± "
                      f"{_fmt(summary[HEADLINE]['std'])}** (mean ± sample std over slides)", "",
                      metrics_table(slides, summary), "", "## What the numbers mean", "", _notes(), ""])


def _json_ready(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN and infinities to null."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(_json_ready(data), indent=1))


# ----------------------------------------------------------------------------- the stage


@dataclass
class EvalSummary:
    slides: list[dict[str, Any]]
    folders: list[Path]
    summary_dir: Path | None = None

    def lines(self) -> list[str]:
        out = [f"{s['sample']}: depth-partial Pearson {_fmt(lookup(s, HEADLINE))}, Pearson "
               f"{_fmt(lookup(s, 'correlation.model.pearson.mean'))}, MSE {_fmt(lookup(s, 'errors.mse'))} "
               f"({s['alignment']['n_matched']} spots, {s['genes']['n_evaluated']} genes) -> {folder / 'report.md'}"
               for s, folder in zip(self.slides, self.folders)]
        if self.summary_dir is not None:
            out.append(f"across {len(self.slides)} slides -> {self.summary_dir / 'report.md'}")
        return out


def evaluate(preds: Sequence[Path], truths: Sequence[Path], out: Path | None = None, run: Run | None = None,
             genes: Path | None = None, genes_to_plot: Sequence[str] = (), overwrite: bool = False,
             progress: Progress = SILENT) -> EvalSummary:
    """Score each prediction against its truth (pairs in order) and write metrics.json, report.md and maps/.

    Output folders: with `out` and one pair, `out` itself; with several pairs,
    `out/<sample>/` plus the cross-slide metrics.json and report.md in `out`.
    Without `out`, `<run>/eval/<sample>/` (summary in `<run>/eval/`) when a run
    is given, else ./hinge-eval as `out`.
    """
    if not preds or len(preds) != len(truths):
        raise HingeError(f"{len(preds)} --pred and {len(truths)} --truth files", "give one --truth per --pred, in the same order")
    wanted = read_gene_list(genes) if genes is not None else None
    loaded = [read_prediction(p) for p in preds]
    samples = [p.sample for p in loaded]
    if len(set(samples)) != len(samples):
        raise HingeError(f"two predictions are for the same sample ({', '.join(samples)})", "evaluate each slide once")
    several = len(loaded) > 1
    if out is None and run is not None:
        folders, summary_dir = [run.eval_dir(s) for s in samples], run.root / "eval"
    else:
        root = Path(out) if out is not None else DEFAULT_OUT
        folders, summary_dir = ([root / s for s in samples] if several else [root]), root
    existing = [f / "metrics.json" for f in [*folders, *([summary_dir] if several else [])] if (f / "metrics.json").exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise HingeError(f"evaluation results already exist: {existing[0]}{more}", "pass --overwrite to replace them, or give another --out")
    slides: list[dict[str, Any]] = []
    with progress.task("eval", total=len(loaded)) as advance:
        for pred, truth_path, folder in zip(loaded, truths, folders):
            aligned = align(pred, read_expression(truth_path), wanted, Path(truth_path))
            unknown = [g for g in genes_to_plot if g not in aligned.genes]
            if unknown:
                raise HingeError(f"--genes-to-plot: {', '.join(unknown)} not evaluated on {pred.sample}",
                                 "choose genes in both the prediction's panel and the truth")
            result = score(aligned, pred.transform)
            slide = {"sample": pred.sample, "pred": str(pred.path), "truth": str(truth_path), "alignment": aligned.alignment,
                     "genes": aligned.gene_report, "transform": pred.transform.to_dict(), "headline": HEADLINE, **result.metrics}
            slide["pictures"] = draw_pictures(aligned, pred, result, folder / "maps", genes_to_plot)
            write_json(folder / "metrics.json", {**slide, "notes": NOTES})
            write_text_atomic(folder / "report.md", slide_report(slide))
            if run is not None:
                run.record_stage(pred.sample, "eval", "ok", metrics=str(folder / "metrics.json"), headline=lookup(slide, HEADLINE))
            slides.append(slide)
            advance(status=pred.sample)
    if not several:
        return EvalSummary(slides, folders)
    summary = across_slides(slides)
    table = {s["sample"]: {key: lookup(s, key) for _, key in ROWS} for s in slides}
    write_json(summary_dir / "metrics.json", {"slides": table, "mean_std": summary, "headline": HEADLINE, "notes": NOTES})
    write_text_atomic(summary_dir / "report.md", summary_report(slides, summary))
    return EvalSummary(slides, folders, summary_dir)
