"""Reading a prediction and its truth, and matching them on spots and genes.

Spots match by barcode when the two files share any, else by coordinates within half a
spot (one-to-one, the closer claim wins). Genes are the prediction's panel ∩ the truth
∩ an optional list; genes the prediction holds NaN for are left out and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from hinge_cli.data.expression import Expression, Transform, read_h5ad
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.prediction import SPREAD_LAYERS

log = logging.getLogger(__name__)

MIN_SPOTS = 3


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
    model: str = "hinge"  # uns['hinge']['model']: what made it (`hinge generate --model ridge` writes "ridge")
    image: np.ndarray | None = None
    image_scale: float = 1.0
    spot_diameter: float | None = None
    q05: np.ndarray | None = None  # the predictive distribution's 5% and 95% quantiles (files from before them lack them)
    q95: np.ndarray | None = None
    draws: np.ndarray | None = None  # (spots, draws, genes), float32, when the file kept its draws
    given: list[str] = field(default_factory=list)  # genes var['given'] marks: measured and given to `generate --given`
    provenance: dict[str, Any] = field(default_factory=dict)  # uns['hinge']: what made it

    @property
    def bin_um(self) -> int | None:
        """The Visium HD bin size a prediction of bins (`generate --visium-hd`) was made at; None for spots."""
        bins = self.provenance.get("visium_hd")
        return None if not bins else int(bins["bin_um"])


def _layer(adata: Any, name: str) -> np.ndarray | None:
    return _dense(adata.layers[name]) if name in adata.layers else None


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
    adata = read_h5ad(path, "prediction file", f"give the .h5ad written by `{command('generate')} {setting('out')}`")
    provenance = dict(adata.uns.get("hinge", {}))
    if "transform" not in provenance:
        log.warning("%s does not record its units (uns['hinge']['transform']): read as log2(counts + 1), as files of "
                    "earlier versions were; set uns['hinge']['transform'] if it holds other units", path)
    try:
        transform = Transform.from_dict({k: _plain(v) for k, v in dict(provenance.get("transform", Transform("none").to_dict())).items()})
    except TypeError as exc:
        raise HingeError(f"{path}: uns['hinge']['transform'] is malformed ({exc})", "keys are normalize, target_sum, log_base") from None
    spatial = dict(adata.uns.get("spatial", {}))
    sample = str(provenance.get("sample_id") or provenance.get("sample") or (next(iter(spatial)) if len(spatial) == 1 else path.stem))
    pred = Prediction(
        path=path, sample=sample, barcodes=_unique([str(b) for b in adata.obs_names], path),
        genes=[str(g) for g in adata.var_names], values=_dense(adata.X),
        std=_layer(adata, "std"),
        coords=np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2] if "spatial" in adata.obsm else None,
        transform=transform, model=str(provenance.get("model", "hinge")), q05=_layer(adata, "q05"), q95=_layer(adata, "q95"),
        draws=np.asarray(adata.obsm["samples"], dtype=np.float32) if "samples" in adata.obsm else None,
        given=[str(g) for g in adata.var_names[np.asarray(adata.var["given"], dtype=bool)]] if "given" in adata.var else [],
        provenance=provenance,
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
    q05: np.ndarray | None = None
    q95: np.ndarray | None = None
    draws: np.ndarray | None = None  # (spots, draws, genes)
    raw: bool = True  # False: the truth held normalised expression, so no depth is known (`read_truth`)
    barcodes: list[str] = field(default_factory=list)  # the prediction's, of each aligned spot


def _spacing(truth: Expression) -> float | None:
    return median_spacing(truth.coords) if truth.coords is not None and len(truth.coords) > 1 else None


def match_spots(barcodes: list[str], coords: np.ndarray | None, spot_diameter: float | None, truth: Expression,
                what: str, truth_path: Path | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Rows of the `barcodes` spots and of `truth` that are the same spot: by barcode when any is shared, else by
    coordinates within half a spot (`spot_diameter`, default the truth's spacing); and how they were matched."""
    index = {b: i for i, b in enumerate(_unique(truth.barcodes, truth_path or Path("truth")))}
    shared = [(i, index[b]) for i, b in enumerate(barcodes) if b in index]
    diameter = spot_diameter or _spacing(truth)
    alignment: dict[str, Any] = {"n_pred_spots": len(barcodes), "n_truth_spots": len(truth.barcodes)}
    if shared:
        rows_p, rows_t = (np.array(r, dtype=int) for r in zip(*shared, strict=True))
        alignment["matched_by"] = "barcode"
    else:
        if coords is None or truth.coords is None or diameter is None:
            raise HingeError(
                f"{what} and {truth_path or 'the truth'} share no spot barcode, and coordinates are missing",
                "give both files obsm['spatial'] in level-0 pixels, or use the same barcodes",
            )
        rows_p, rows_t = match_coordinates(coords, truth.coords, diameter / 2)
        alignment.update(matched_by="coordinates", radius_px=diameter / 2)
    alignment["n_matched"] = len(rows_p)
    return rows_p, rows_t, alignment


def align(pred: Prediction, truth: Expression, genes: Sequence[str] | None = None, truth_path: Path | None = None) -> Aligned:
    """Match spots (barcodes, else coordinates within half a spot) and genes (the panel ∩ the truth ∩ `genes`, less
    the genes the prediction was given: completion is never credited for copying its input)."""
    if not truth.raw and not pred.transform.rates:
        raise HingeError(f"the truth {truth_path or ''} holds normalised expression but {pred.path} predicts log counts "
                         "at the training data's depth, which a spot's depth is needed to compare with",
                         f"give the truth's raw UMI counts (X or {setting('layer')})")
    diameter = pred.spot_diameter or _spacing(truth)
    rows_p, rows_t, alignment = match_spots(pred.barcodes, pred.coords, diameter, truth, f"prediction {pred.path}", truth_path)
    if len(rows_p) < MIN_SPOTS:
        raise HingeError(
            f"only {len(rows_p)} spots of {pred.path} match the truth (by {alignment['matched_by']})",
            "check that both files describe the same slide, with coordinates in the same level-0 pixels",
        )
    given = set(pred.given)
    candidates = [g for g in pred.genes if g not in given]
    if not candidates:
        raise HingeError(f"every gene of {pred.path} was given to `{command('generate')} {setting('given')}`, so none is left to score",
                         f"give fewer genes with {setting('given-genes')}, so that eval has predicted genes to score")
    not_in_prediction: list[str] = []
    if genes is not None:
        panel = set(pred.genes)
        not_in_prediction = [g for g in genes if g not in panel]
        wanted = set(genes)
        candidates = [g for g in candidates if g in wanted]
    truth_genes = set(truth.genes)
    missing = [g for g in candidates if g not in truth_genes]
    evaluated = [g for g in candidates if g in truth_genes]
    if not evaluated:
        raise HingeError(
            f"no gene of the prediction's panel is in the truth {truth_path or ''}".rstrip(),
            f"check that gene symbols match (same naming, e.g. HGNC symbols) and any {setting('genes')} list",
        )
    column = {g: j for j, g in enumerate(pred.genes)}
    cols = np.array([column[g] for g in evaluated])
    values = pred.values[np.ix_(rows_p, cols)]
    spread = {name: layer[np.ix_(rows_p, cols)] for name in SPREAD_LAYERS if (layer := getattr(pred, name)) is not None}
    draws = pred.draws[rows_p][:, :, cols] if pred.draws is not None else None
    finite = np.isfinite(values).all(0)
    for layer in spread.values():
        finite &= np.isfinite(layer).all(0)
    if draws is not None:
        finite &= np.isfinite(draws).all((0, 1))
    dropped = [g for g, ok in zip(evaluated, finite, strict=True) if not ok]
    if not finite.any():
        raise HingeError(f"every prediction of {pred.path} holds NaN or infinite values", f"re-run `{command('generate')}`")
    for what, names in (("missing from the truth", missing), ("with non-finite predictions, left out", dropped),
                        ("asked for but not in the prediction's panel", not_in_prediction)):
        if names:
            log.warning("%s: %d genes %s: %s", pred.sample, len(names), what, ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
    kept = [g for g, ok in zip(evaluated, finite, strict=True) if ok]
    spread = {name: layer[:, finite] for name, layer in spread.items()}
    counts = truth.columns(kept)[rows_t].astype(np.float64)
    coords = pred.coords[rows_p] if pred.coords is not None else truth.coords[rows_t] if truth.coords is not None else None
    if coords is None:
        raise HingeError(f"neither {pred.path} nor the truth has obsm['spatial']", "add spot centres in level-0 pixels")
    return Aligned(
        sample=pred.sample, genes=kept, pred=values[:, finite], std=spread.get("std"),
        counts=counts, totals=truth.totals[rows_t].astype(np.float64), coords=coords,
        spot_diameter=float(diameter if diameter is not None else median_spacing(coords)), alignment=alignment,
        gene_report={"n_panel": len(pred.genes), "n_evaluated": len(kept), "missing_from_truth": missing,
                     "dropped_nonfinite": dropped, "not_in_prediction": not_in_prediction, "given": list(pred.given)},
        q05=spread.get("q05"), q95=spread.get("q95"),
        draws=draws[:, :, finite] if draws is not None else None, raw=truth.raw, barcodes=[pred.barcodes[i] for i in rows_p],
    )
