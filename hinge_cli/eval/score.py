"""Every number of one aligned slide, as typed results that serialise to metrics.json.

The truth goes through the transform the model was trained with, so numbers are in
model space. Since sequencing depth dominates raw correlations (DESIGN.md,
"Evaluation"), every correlation metric is reported three ways: in model space, on
library-size normalised targets (CP10k-log), and depth-partial (the headline).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from hinge_cli.data.expression import Transform
from hinge_cli.eval import metrics
from hinge_cli.eval.align import Aligned
from hinge_cli.eval.probabilistic import Calibration, score_calibration

N_TOP_VARIABLE = 50  # HEST convention
PCC_KS = (50, 200)  # Stem/HINGE tables; CorrelationSummary has one field per k
MORAN_K = 6  # neighbours in the Moran's I weights (one ring of a Visium hex grid)
VIEWS = {  # view -> its name in reports; depth-partial first, the headline
    "depth_partial": "depth-partial",
    "normalised": "CP10k-log",
    "model": "model space",
}

log = logging.getLogger(__name__)


def _number(value: Any) -> Any:
    """A JSON value back as a number: null was NaN."""
    return math.nan if value is None else value


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    return cls(**{f.name: _number(data[f.name]) for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class CorrelationSummary:
    """Per-gene correlations summarised; NaN genes (constant or non-finite) are excluded and counted."""

    mean: float
    mean_top_variable: float
    n_genes: int
    n_excluded: int
    n_top_variable: int
    pcc_at_50: float
    pcc_at_200: float

    @classmethod
    def of(cls, r: np.ndarray, top: np.ndarray) -> CorrelationSummary:
        return cls(**metrics.summarise_correlations(r, top, PCC_KS))


@dataclass(frozen=True)
class Coexpression:
    consistency: float
    mean_abs_diff: float
    n_genes: int


@dataclass(frozen=True)
class ViewScores:
    """The correlation metrics of one view (model space, CP10k-log or depth-partial)."""

    pearson: CorrelationSummary
    spearman: CorrelationSummary
    coexpression: Coexpression

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewScores:
        return cls(_from_dict(CorrelationSummary, data["pearson"]), _from_dict(CorrelationSummary, data["spearman"]),
                   _from_dict(Coexpression, data["coexpression"]))


@dataclass(frozen=True)
class Correlations:
    model: ViewScores
    normalised: ViewScores
    depth_partial: ViewScores
    low_count_spots: int = 0  # spots under metrics.MIN_DEPTH counts, left out of the depth-partial view

    def view(self, name: str) -> ViewScores:
        return {"model": self.model, "normalised": self.normalised, "depth_partial": self.depth_partial}[name]


@dataclass(frozen=True)
class Errors:
    mse: float
    mae: float


@dataclass(frozen=True)
class VarianceScores:
    rvd: float
    n_genes: int
    mean_var_true: float
    mean_var_pred: float


@dataclass(frozen=True)
class SpatialScores:
    morans_i_agreement: float
    morans_i_mean_abs_diff: float
    morans_i_mean_true: float
    morans_i_mean_pred: float
    n_genes: int
    weights: str


@dataclass(frozen=True)
class GeneScores:
    """Per-gene numbers, one array entry per evaluated gene (in `genes` order)."""

    genes: list[str]
    pearson_model: np.ndarray
    spearman_model: np.ndarray
    pearson_normalised: np.ndarray
    spearman_normalised: np.ndarray
    pearson_depth_partial: np.ndarray
    spearman_depth_partial: np.ndarray
    mse: np.ndarray
    mae: np.ndarray
    var_true: np.ndarray
    var_pred: np.ndarray
    rvd: np.ndarray
    morans_i_true: np.ndarray
    morans_i_pred: np.ndarray
    within_1std: np.ndarray | None = None  # only with a predicted spread
    crps: np.ndarray | None = None  # mean over spots; only with a predicted spread

    def to_dict(self) -> dict[str, dict[str, float]]:
        columns = {f.name: getattr(self, f.name) for f in fields(self)[1:] if getattr(self, f.name) is not None}
        return {gene: {name: column[j] for name, column in columns.items()} for j, gene in enumerate(self.genes)}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> GeneScores:
        genes = list(data)
        names = [f.name for f in fields(cls)[1:] if not genes or f.name in data[genes[0]]]
        return cls(genes, **{name: np.array([_number(data[g][name]) for g in genes], float) for name in names})


@dataclass(frozen=True)
class SlideMetrics:
    """Every number of one slide; `to_dict` is its part of metrics.json."""

    correlation: Correlations
    errors: Errors
    variance: VarianceScores
    spatial: SpatialScores
    calibration: Calibration | None
    per_gene: GeneScores

    def to_dict(self, per_gene: bool = True) -> dict[str, Any]:
        out = {"correlation": asdict(self.correlation), "errors": asdict(self.errors), "variance": asdict(self.variance),
               "spatial": asdict(self.spatial), "calibration": asdict(self.calibration) if self.calibration else None}
        return {**out, "per_gene": self.per_gene.to_dict()} if per_gene else out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideMetrics:
        """The inverse of `to_dict` (a slide's metrics.json); NaN comes back from null."""
        views = {view: ViewScores.from_dict(data["correlation"][view]) for view in VIEWS}
        calibration = data.get("calibration")
        correlations = Correlations(**views, low_count_spots=data["correlation"].get("low_count_spots", 0))
        return cls(correlations, _from_dict(Errors, data["errors"]), _from_dict(VarianceScores, data["variance"]),
                   _from_dict(SpatialScores, data["spatial"]), _from_dict(Calibration, calibration) if calibration else None,
                   GeneScores.from_dict(data.get("per_gene", {})))


@dataclass(frozen=True)
class Metric:
    """One reported number: `key` names it in metrics.json tables (the path of its place in a slide's metrics.json).

    `get` returns None where the slide has no such number (calibration without a predicted std).
    """

    key: str
    label: str
    get: Callable[[SlideMetrics], float | int | None]



# (key within a view, label, accessor) of each correlation metric; one Metric per view is built from each row
CORRELATION_ROWS: tuple[tuple[str, str, Callable[[ViewScores], float | int]], ...] = (
    ("pearson.mean", "mean Pearson", lambda v: v.pearson.mean),
    ("pearson.mean_top_variable", "mean Pearson, top-50 variable genes", lambda v: v.pearson.mean_top_variable),
    ("pearson.pcc_at_50", "PCC@50 (published-table convention, optimistic)", lambda v: v.pearson.pcc_at_50),
    ("pearson.pcc_at_200", "PCC@200 (published-table convention, optimistic)", lambda v: v.pearson.pcc_at_200),
    ("spearman.mean", "mean Spearman", lambda v: v.spearman.mean),
    ("coexpression.consistency", "co-expression consistency (r)", lambda v: v.coexpression.consistency),
    ("coexpression.mean_abs_diff", "co-expression mean abs. difference", lambda v: v.coexpression.mean_abs_diff),
    ("pearson.n_excluded", "genes excluded (constant or non-finite)", lambda v: v.pearson.n_excluded),
)


def _correlation_metric(view: str, key: str, label: str, get: Callable[[ViewScores], float | int]) -> Metric:
    return Metric(f"correlation.{view}.{key}", f"{label} [{VIEWS[view]}]", lambda m: get(m.correlation.view(view)))


CORRELATION_METRICS = tuple(_correlation_metric(view, *row) for view in VIEWS for row in CORRELATION_ROWS)
OTHER_METRICS = (
    Metric("correlation.low_count_spots", f"spots under {metrics.MIN_DEPTH:.0f} counts, left out of depth-partial",
           lambda m: m.correlation.low_count_spots),
    Metric("errors.mse", "MSE", lambda m: m.errors.mse),
    Metric("errors.mae", "MAE", lambda m: m.errors.mae),
    Metric("variance.rvd", "RVD (relative variance distance)", lambda m: m.variance.rvd),
    Metric("spatial.morans_i_agreement", "Moran's I agreement (r across genes)", lambda m: m.spatial.morans_i_agreement),
    Metric("spatial.morans_i_mean_abs_diff", "Moran's I mean abs. difference", lambda m: m.spatial.morans_i_mean_abs_diff),
    Metric("spatial.morans_i_mean_true", "Moran's I mean, truth", lambda m: m.spatial.morans_i_mean_true),
    Metric("spatial.morans_i_mean_pred", "Moran's I mean, prediction", lambda m: m.spatial.morans_i_mean_pred),
    Metric("calibration.within_1std", "within mean ± 1 std (Gaussian 0.683)", lambda m: m.calibration and m.calibration.within_1std),
    Metric("calibration.within_2std", "within mean ± 2 std (Gaussian 0.954)", lambda m: m.calibration and m.calibration.within_2std),
    Metric("calibration.within_90_interval", "within the 90% interval [q05, q95] (0.90)",
           lambda m: m.calibration and m.calibration.within_90_interval),
    Metric("calibration.crps", "CRPS, mean over genes (lower is better)", lambda m: m.calibration and m.calibration.crps),
    Metric("calibration.energy_score", "energy score of the spot's gene vector (lower is better)",
           lambda m: m.calibration and m.calibration.energy_score),
    Metric("calibration.n_draws", "draws per spot (0: CRPS of the Gaussian mean ± std)",
           lambda m: m.calibration and m.calibration.n_draws),
)
METRICS: dict[str, Metric] = {m.key: m for m in (*CORRELATION_METRICS, *OTHER_METRICS)}
HEADLINE = METRICS["correlation.depth_partial.pearson.mean"]


def metric_table(slide: SlideMetrics) -> dict[str, float | int | None]:
    """Every table metric of one slide by key: a row of the cross-slide metrics.json and of the benchmark."""
    return {key: metric.get(slide) for key, metric in METRICS.items()}


@dataclass
class SlideScore:
    """The metrics of one slide and the arrays the pictures need."""

    metrics: SlideMetrics
    truth: np.ndarray  # in model space
    coexpression: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # view -> (predicted, true, gene indices)

    @property
    def pearson(self) -> np.ndarray:
        return self.metrics.per_gene.pearson_model

    @property
    def partial(self) -> np.ndarray:
        return self.metrics.per_gene.pearson_depth_partial


def to_cp10k_log(pred: np.ndarray, transform: Transform, totals: np.ndarray) -> np.ndarray:
    """Model-space predictions as log1p(counts per 10k): invert the transform, rescale by the spot's library size."""
    counts = transform.linear(pred)
    library = np.full(len(pred), transform.target_sum) if transform.normalize == "total" else np.maximum(totals, 1.0)
    return np.log1p(counts * (1e4 / library)[:, None])


def _spatial(pred: np.ndarray, truth: np.ndarray, coords: np.ndarray) -> tuple[SpatialScores, np.ndarray, np.ndarray]:
    weights = metrics.knn_weights(coords, MORAN_K)
    moran_pred, moran_true = metrics.morans_i(pred, weights), metrics.morans_i(truth, weights)
    both = np.isfinite(moran_pred) & np.isfinite(moran_true)
    agreement = metrics.pearson_per_gene(moran_pred[both, None], moran_true[both, None])[0] if both.sum() >= 2 else math.nan
    scores = SpatialScores(float(agreement), metrics.finite_mean(np.abs(moran_pred - moran_true)),
                           metrics.finite_mean(moran_true), metrics.finite_mean(moran_pred), int(both.sum()),
                           f"row-standardised {MORAN_K}-nearest neighbours")
    return scores, moran_pred, moran_true


def score_slide(aligned: Aligned, transform: Transform) -> SlideScore:
    """All metrics of one aligned slide (see report.NOTES for their definitions)."""
    pred, log_depth = aligned.pred, np.log(np.maximum(aligned.totals, 1.0))
    truth = transform.apply(aligned.counts, aligned.totals).astype(np.float64)
    top = metrics.top_variable(truth, N_TOP_VARIABLE)
    counted = metrics.counted_spots(aligned.totals)  # the depth-partial view leaves out spots with almost no counts
    if counted.sum() < 3:
        log.warning("%s: fewer than 3 of its %d spots have %g UMI, so the depth-partial scores use every spot (median %.0f "
                    "UMI); at this depth read the pooled or model-space scores", aligned.sample, len(pred), metrics.MIN_DEPTH,
                    float(np.median(aligned.totals)) if len(pred) else 0.0)
        counted = np.ones(len(pred), dtype=bool)
    partial = (pred[counted], truth[counted], log_depth[counted])
    p_res, t_res, valid = metrics.depth_residuals(*partial)
    pairs = {
        "model": (pred, truth, None),
        "normalised": (to_cp10k_log(pred, transform, aligned.totals), metrics.cp10k_log(aligned.counts, aligned.totals), None),
        "depth_partial": (p_res, t_res, valid),
    }
    views: dict[str, ViewScores] = {}
    per_gene: dict[str, np.ndarray] = {}
    matrices: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for view, (p, t, mask) in pairs.items():
        if mask is None:
            r, rho = metrics.pearson_per_gene(p, t), metrics.spearman_per_gene(p, t)
        else:
            r, rho = metrics.depth_partial_pearson(*partial), metrics.depth_partial_spearman(*partial)
        coex, cp, ct, used = metrics.coexpression(p, t, mask)
        views[view] = ViewScores(CorrelationSummary.of(r, top), CorrelationSummary.of(rho, top), Coexpression(**coex))
        per_gene[f"pearson_{view}"], per_gene[f"spearman_{view}"] = r, rho
        matrices[view] = (cp, ct, used)

    rvd, rvd_terms = metrics.relative_variance_distance(pred, truth)
    spatial, moran_pred, moran_true = _spatial(pred, truth, aligned.coords)
    calibrated = score_calibration(aligned, truth, transform)
    if calibrated is not None:
        per_gene.update(calibrated.per_gene)
    genes = GeneScores(aligned.genes, **per_gene, mse=((pred - truth) ** 2).mean(0), mae=np.abs(pred - truth).mean(0),
                       var_true=truth.var(0), var_pred=pred.var(0), rvd=rvd_terms, morans_i_true=moran_true,
                       morans_i_pred=moran_pred)
    result = SlideMetrics(
        correlation=Correlations(**views, low_count_spots=int((~counted).sum())),
        errors=Errors(metrics.mse(pred, truth), metrics.mae(pred, truth)),
        variance=VarianceScores(rvd, int(np.isfinite(rvd_terms).sum()), float(truth.var(0).mean()), float(pred.var(0).mean())),
        spatial=spatial, calibration=None if calibrated is None else calibrated.calibration, per_gene=genes,
    )
    return SlideScore(result, truth, matrices)
