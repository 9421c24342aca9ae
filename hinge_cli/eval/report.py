"""What `hinge eval` writes: a slide's record, metrics.json (typed writer and reader) and report.md."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hinge_cli.core.files import write_text_atomic
from hinge_cli.data.expression import expression_unit
from hinge_cli.eval.metrics import finite_mean
from hinge_cli.eval.pooling import PoolingLevel, pooling_table
from hinge_cli.eval.probabilistic import GAUSSIAN_COVERAGE, INTERVAL_COVERAGE
from hinge_cli.eval.score import (
    CORRELATION_ROWS,
    HEADLINE,
    METRICS,
    MORAN_K,
    OTHER_METRICS,
    VIEWS,
    Metric,
    SlideMetrics,
    metric_table,
)

NOTES = {
    "model space": "prediction and truth after the model's own transform (uns['hinge']['transform']).",
    "given genes": "genes a prediction was given as measured (`hinge generate --given`, var['given']) are never "
                   "scored: it holds them at their input values, so only the genes it generated count.",
    "CP10k-log": "truth as log1p(counts per 10k of the spot's total over all its genes); the prediction is "
                 "turned back into counts (base^x - 1, clipped at 0) and put on the same scale: from its own "
                 "target_sum when the model was trained on normalised targets, else with the same library size "
                 "as the truth, so a prediction that only knows depth gets no credit.",
    "depth-partial": "both sides regressed on the spot's log total counts within the slide, residuals "
                     "correlated: gene-specific signal beyond sequencing depth. The headline. Spots under 100 "
                     "counts carry no expression to predict and can dominate the depth regression: they are left "
                     "out of this view (the metrics table counts them).",
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
    "observation model": "predictions of normalised expression are rates; each draw is taken to expected counts at the "
                         "measured spot's own total, counted (Poisson) and put back into the units before it meets the truth, so "
                         "calibration means the same on a 600-UMI section as on a 10k-UMI one. Coverage is then that of the central "
                         "68.3%, 95.4% and 90% of those draws (from the randomised PIT: counts tie). Count-unit predictions are scored "
                         "plainly. metrics.json's calibration.observation says which.",
    "calibration": "fraction of true values inside mean ± 1 and ± 2 predicted std (layers['std']); "
                   "a calibrated Gaussian gives 0.683 and 0.954. The 90% interval is [q05, q95] (layers['q05'], "
                   "layers['q95']); calibrated, 0.90 of true values fall inside it. Over every matched spot.",
    "CRPS": "continuous ranked probability score, E|X - y| - ½ E|X - X'| of each spot and gene, mean over spots "
            "then genes, in model-space units: lower is better, and a spread only scores well where it is both "
            "sharp and right. From the kept draws (obsm['samples']; E|X - X'| over pairs of distinct draws, the fair "
            "estimate, which does not depend on how many draws were kept), else from the Gaussian mean ± std.",
    "energy score": "the CRPS of the whole gene vector of a spot, E‖X - y‖ - ½ E‖X - X'‖ over the draws (distinct "
                    "pairs), mean over spots: lower is better, and it rewards draws whose genes move together as the "
                    "truth's do. n/a without draws.",
    "PIT histogram": "where each true value falls within its predictive distribution (its randomised rank among the "
                     "draws, or the Gaussian CDF), in 10 bins: flat is calibrated, a U too narrow, a hump too wide, "
                     "a slope biased.",
}


@dataclass
class GenePicks:
    """The genes drawn as maps: the best and worst by Pearson, and those asked for."""

    best: list[str]
    worst: list[str]
    asked: list[str]


@dataclass
class Pictures:
    """File names (inside maps/) of a slide's pictures."""

    maps: dict[str, str]  # gene -> file
    figures: dict[str, str]  # coexpression_model, coexpression_depth_partial, pearson_vs_variance -> file
    chosen: GenePicks

    def to_dict(self) -> dict[str, Any]:
        return {"maps": self.maps, **self.figures, "chosen": asdict(self.chosen)}


@dataclass
class Baseline:
    """A second prediction of the same slide (the ridge baseline), scored on the same spots and genes."""

    pred: str
    model: str
    metrics: SlideMetrics


@dataclass
class SlideResult:
    """Everything `hinge eval` found about one slide; `to_dict` is its metrics.json (without the notes)."""

    sample: str
    pred: str
    truth: str
    alignment: dict[str, Any]
    genes: dict[str, Any]
    transform: dict[str, Any]
    metrics: SlideMetrics
    pictures: Pictures
    model: str = "hinge"
    baseline: Baseline | None = None
    shift: dict[str, Any] | None = None  # the prediction's shift report (uns['hinge']['shift']), where it has one
    pooling: list[PoolingLevel] | None = None  # a bin-level prediction's scores as both sides are pooled

    def to_dict(self) -> dict[str, Any]:
        out = {"sample": self.sample, "pred": self.pred, "truth": self.truth, "alignment": self.alignment,
               "genes": self.genes, "transform": self.transform, "headline": HEADLINE.key, **self.metrics.to_dict()}
        if self.shift is not None:
            out["shift"] = self.shift
        if self.pooling is not None:
            out["pooling"] = [level.to_dict() for level in self.pooling]
        if self.baseline is not None:
            b = self.baseline
            out["baseline"] = {"pred": b.pred, "model": b.model, "metrics": metric_table(b.metrics)}
        return {**out, "pictures": self.pictures.to_dict()}


HIGHER, LOWER = "higher", "lower"
# (name, metric, which is better: HIGHER, LOWER, or the nominal value, where closer is better) of the numbers a
# prediction and its baseline are compared on
COMPARED: tuple[tuple[str, Metric, str | float], ...] = (
    ("depth-partial Pearson", HEADLINE, HIGHER),
    ("Pearson", METRICS["correlation.model.pearson.mean"], HIGHER),
    ("co-expression consistency", METRICS["correlation.model.coexpression.consistency"], HIGHER),
    ("RVD", METRICS["variance.rvd"], LOWER),
    ("MSE", METRICS["errors.mse"], LOWER),
    ("CRPS (lower better)", METRICS["calibration.crps"], LOWER),
    ("energy score (lower better)", METRICS["calibration.energy_score"], LOWER),
    ("within ± 1 std (0.683)", METRICS["calibration.within_1std"], GAUSSIAN_COVERAGE["within_1std"]),
    ("within ± 2 std (0.954)", METRICS["calibration.within_2std"], GAUSSIAN_COVERAGE["within_2std"]),
    ("within 90% interval (0.90)", METRICS["calibration.within_90_interval"], INTERVAL_COVERAGE),
)


@dataclass
class Spread:
    """Mean and sample std (ddof=1) of one metric over slides, and how many slides had it."""

    mean: float
    std: float
    n: int


def across_slides(slides: Sequence[SlideResult]) -> dict[str, Spread]:
    """Every table metric over slides; NaN/absent values are left out and counted."""
    out: dict[str, Spread] = {}
    for key, metric in METRICS.items():
        got = [metric.get(s.metrics) for s in slides]
        values = np.array([v for v in got if isinstance(v, (int, float)) and math.isfinite(v)], float)
        out[key] = Spread(float(values.mean()) if len(values) else math.nan,
                          float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values))
    return out


# ----------------------------------------------------------------------------- JSON


def json_ready(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays to Python, NaN and infinities to null."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON with NaN as null, written atomically."""
    write_text_atomic(path, json.dumps(json_ready(data), indent=1))


def write_slide_metrics(path: Path, slide: SlideResult) -> None:
    write_json(path, {**slide.to_dict(), "notes": NOTES})


def write_summary_metrics(path: Path, slides: Sequence[SlideResult], summary: dict[str, Spread]) -> None:
    table = {s.sample: metric_table(s.metrics) for s in slides}
    write_json(path, {"slides": table, "mean_std": {k: asdict(v) for k, v in summary.items()}, "headline": HEADLINE.key,
                      "notes": NOTES})


def read_slide_metrics(path: Path) -> SlideMetrics:
    """The metrics of a slide's metrics.json, as written by `hinge eval`."""
    return SlideMetrics.from_dict(json.loads(Path(path).read_text()))


def read_baseline_metrics(path: Path) -> dict[str, float | int] | None:
    """The baseline's table metrics in a slide's metrics.json (by key, as `metric_table`; null back to NaN), or None."""
    baseline = json.loads(Path(path).read_text()).get("baseline")
    return None if baseline is None else {key: math.nan if v is None else v for key, v in baseline["metrics"].items()}


# ----------------------------------------------------------------------------- markdown


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _merit(mine: float, theirs: float, goal: str | float) -> float:
    """How much better `mine` is than `theirs` (positive: mine), NaN when either is missing."""
    if goal == HIGHER:
        return mine - theirs
    if goal == LOWER:
        return theirs - mine
    return abs(theirs - goal) - abs(mine - goal)


def comparison(pairs: Sequence[tuple[SlideMetrics, SlideMetrics]], names: tuple[str, str]) -> list[list[str]]:
    """Rows of (metric, prediction, baseline, the better one), each a mean over the (prediction, baseline) pairs."""
    rows = []
    for name, metric, goal in COMPARED:
        mine, theirs = (finite_mean(np.array([_value(metric.get(pair[k])) for pair in pairs])) for k in (0, 1))
        merit = _merit(mine, theirs, goal)
        better = ("n/a" if not math.isfinite(merit) else "tie" if merit == 0 else names[0] if merit > 0 else names[1])
        rows.append([name, fmt(mine), fmt(theirs), better])
    return rows


def _value(value: float | int | None) -> float:
    return math.nan if value is None else float(value)


def comparison_lines(slide: SlideResult, baseline: Baseline) -> list[str]:
    """The side-by-side for the terminal."""
    header = f"{slide.model} vs {baseline.model} baseline"
    rows = comparison([(slide.metrics, baseline.metrics)], (slide.model, baseline.model))
    return [f"  {header:<28}{slide.model:>8}{baseline.model:>8}  better"] + [
        f"  {name:<28}{mine:>8}{theirs:>8}  {better}" for name, mine, theirs, better in rows]


def comparison_section(slides: Sequence[SlideResult]) -> list[str]:
    """report.md's side-by-side of the slides evaluated with a baseline (means when there are several); none without."""
    paired = [s for s in slides if s.baseline is not None]
    if not paired:
        return []
    first = paired[0]
    names = (first.model, first.baseline.model)
    where = (f"Baseline prediction `{first.baseline.pred}`" if len(slides) == 1 else
             f"Means over the {len(paired)} slides with a baseline prediction")
    table = _markdown(["metric", names[0], f"{names[1]} baseline", "better"],
                      comparison([(s.metrics, s.baseline.metrics) for s in paired], names))
    return [f"## {names[0]} vs {names[1]} baseline", "", f"{where}, scored on the same spots and genes.", "", table, ""]


def metrics_table(slides: Sequence[SlideResult], summary: dict[str, Spread] | None = None,
                  rows: Sequence[Metric] = tuple(METRICS.values())) -> str:
    """Markdown table: one row per metric, one column per slide, plus mean ± std when given."""
    body = []
    for metric in rows:
        cells = [fmt(metric.get(s.metrics)) for s in slides]
        if summary:
            cells.append(f"{fmt(summary[metric.key].mean)} ± {fmt(summary[metric.key].std)}")
        body.append([f"**{c}**" for c in [metric.label, *cells]] if metric is HEADLINE else [metric.label, *cells])
    return _markdown(["metric"] + [s.sample for s in slides] + (["mean ± std"] if summary else []), body)


def correlation_table(slide: SlideMetrics) -> str:
    """One slide's correlation metrics: one row per metric, one column per view (depth-partial first: the headline)."""
    body = [[label] + [fmt(get(slide.correlation.view(view))) for view in VIEWS] for _, label, get in CORRELATION_ROWS]
    return _markdown(["correlation metric"] + list(VIEWS.values()), body)


def _notes() -> str:
    return "\n".join(f"- **{name}**: {text}" for name, text in NOTES.items())


def _spread_source(slide: SlideMetrics) -> str:
    calibration = slide.calibration
    if calibration is None:
        return "none in the file (no calibration or proper scores)"
    if calibration.crps_from == "samples":
        pairs = ("fair estimates, over distinct pairs of draws" if calibration.fair else
                 "averaged over all pairs of draws, as before 2026-12-01: higher by about std / (draws √π)")
        source = f"{calibration.n_draws} draws per spot (CRPS, energy score and PIT from the draws; {pairs})"
    elif calibration.observation == "poisson":
        source = f"mean ± std only ({calibration.n_draws} draws of that Gaussian)"
    else:
        return "mean ± std only (CRPS and PIT of that Gaussian; no energy score without draws)"
    if calibration.observation == "poisson":
        return source + "; through the observation model: each draw counted at the measured spot's depth (Poisson)"
    if calibration.observation == "no counts":
        return source + "; plain: the truth held normalised expression, no raw counts, so no depth to count the draws at"
    return source + "; plain: the draws as predicted, without count noise (count units, or a file scored before 2026-12-07)"


def shift_summary(shift: dict[str, Any] | None) -> str:
    """One line of the prediction's shift report (docs/generate.md: "A new patient's slide")."""
    if shift is None:
        return "not reported (the prediction was made by a model or a version without the shift report)"
    verdict = f"OUTSIDE what training saw: {shift['why']}" if shift["outside"] else "inside what training saw"
    return (f"{verdict}. Feature score {fmt(float(shift['score']))} (0: inside the training slides' range; 1: a typical feature "
            f"one spread, within and between slides, beyond it), {shift['features_outside']} of {shift['n_features']} features outside; tissue colour "
            f"RGB {shift['colour']} against {shift['training_colour'][0]}-{shift['training_colour'][1]}; µm/px {shift['mpp']:.3g} against "
            f"{shift['training_mpp'][0]:.3g}-{shift['training_mpp'][1]:.3g}; {shift['n_spots']} spots, {shift['area_mm2']:.1f} mm²")


def slide_report(slide: SlideResult) -> str:
    """report.md of one slide: provenance, the metric table, best and worst genes, pictures, definitions."""
    a, g = slide.alignment, slide.genes
    lines = [
        f"# hinge eval: {slide.sample}", "",
        f"- prediction `{slide.pred}`, truth `{slide.truth}`",
        f"- spots: {a['n_matched']} matched by {a['matched_by']} (prediction {a['n_pred_spots']}, truth {a['n_truth_spots']})",
        f"- genes: {g['n_evaluated']} evaluated of a {g['n_panel']}-gene panel; model space {expression_unit(**slide.transform)}",
    ]
    lines.append(f"- predictive spread: {_spread_source(slide.metrics)}")
    lines.append(f"- shift from the training slides: {shift_summary(slide.shift)}")
    for key, what in (("missing_from_truth", "missing from the truth"), ("dropped_nonfinite", "left out, non-finite predictions"),
                      ("not_in_prediction", "asked for but not in the panel")):
        if g[key]:
            lines.append(f"- {len(g[key])} genes {what}: {', '.join(g[key])}")
    if g.get("given"):
        lines.append(f"- {len(g['given'])} genes given to the model (`generate --given`), not scored: {', '.join(g['given'])}")
    headline = (f"**Headline: depth-partial mean Pearson = {fmt(HEADLINE.get(slide.metrics))}** "
                "(gene-specific signal beyond sequencing depth).")
    lines += ["", headline, "", *comparison_section([slide])]
    lines += [correlation_table(slide.metrics), "", metrics_table([slide], rows=OTHER_METRICS), ""]
    if slide.pooling is not None:
        lines += pooling_table(slide.pooling)
    lines += ["## Best and worst genes (by model-space Pearson)", "", "| gene | Pearson | depth-partial | Spearman | MSE |",
              "|---|---|---|---|---|"]
    per_gene = slide.metrics.per_gene
    column = {gene: j for j, gene in enumerate(per_gene.genes)}
    pictures = slide.pictures
    for gene in dict.fromkeys(pictures.chosen.best + pictures.chosen.worst):
        j = column[gene]
        lines.append(f"| {gene} | {fmt(per_gene.pearson_model[j])} | {fmt(per_gene.pearson_depth_partial[j])} | "
                     f"{fmt(per_gene.spearman_model[j])} | {fmt(per_gene.mse[j])} |")
    lines += ["", "## Pictures", ""]
    lines += [f"![{name}](maps/{file})" for name, file in pictures.figures.items()]
    lines += [f"![{gene}](maps/{file})" for gene, file in pictures.maps.items()]
    lines += ["", "## What the numbers mean", "", _notes(), ""]
    return "\n".join(lines)


def summary_report(slides: Sequence[SlideResult], summary: dict[str, Spread]) -> str:
    """report.md across slides: the per-slide columns and mean ± std."""
    links = [f"- [{s.sample}]({s.sample}/report.md)" for s in slides]
    spread = summary[HEADLINE.key]
    headline = (f"**Headline: depth-partial mean Pearson = {fmt(spread.mean)} ± {fmt(spread.std)}** "
                "(mean ± sample std over slides)")
    return "\n".join([f"# hinge eval: {len(slides)} slides", "", *links, "", headline, "", *comparison_section(slides),
                      metrics_table(slides, summary), "", "## What the numbers mean", "", _notes(), ""])
