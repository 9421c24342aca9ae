"""Measured spot expression: reading counts and the target transform.

The transform is a small record that travels with checkpoints and predictions, so that `eval` puts the
truth through exactly what the model was trained on. New models predict normalised expression, counts per
10,000 of the spot's total then natural log1p (scanpy's `normalize_total(target_sum=1e4)` + `log1p`): its
level does not depend on the training data's sequencing depth. `--normalize none` keeps log2(counts + 1),
the paper's count scale; older cards keep whatever they recorded.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
from scipy import sparse
from scipy.stats import poisson

from hinge_cli.data.counts import COUNTS, FRACTIONAL, measured_values, raw_counts
from hinge_cli.errors import HingeError, setting

log = logging.getLogger(__name__)

NORMALIZE = ("none", "total")
MODEL_SPACE_FLOOR = 0.0  # every transform is a log of (scaled) counts + 1, so no expression lies below it
POISSON_EXACT_MAX = 30.0  # expected counts up to which count noise is summed exactly (the delta method errs below)
POISSON_COUNTS = 90  # the counts summed over: P(C >= 90) < 1e-18 at 30 expected
# how a fit or a score met measured counts: through the observation model, or not, or not for want of raw counts
POISSON, PLAIN, NO_COUNTS = "poisson", "plain", "no counts"
NORMALISED_SUM = 1e4  # the per-spot total a normalised truth file is recognised by (scanpy's target_sum)
MAX_COUNTS = 1e12  # the ceiling of count units when read back: far beyond any spot, far short of overflow
RATE_SHARE_FLOOR = 0.01  # of a residual variance kept when taking the count noise out would leave nothing


def less_noise(variance: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A variance without the (mean) count noise in it, at least RATE_SHARE_FLOOR of it kept: one rule for every fit."""
    return np.maximum(variance - noise, RATE_SHARE_FLOOR * variance)


@dataclass(frozen=True)
class Transform:
    """counts -> model space. `normalize='total'` scales each spot to `target_sum` first."""

    normalize: str = "none"
    target_sum: float = 1e4
    log_base: float = 2.0

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE:
            raise HingeError(f"unknown normalisation '{self.normalize}'", f"use one of {', '.join(NORMALIZE)}")

    @property
    def rates(self) -> bool:
        """Whether values are normalised expression: rates a measured spot's own depth counts again (the observation
        model); count units (log2(counts + 1) at the training data's depth) have no rate to take to another depth."""
        return self.normalize == "total"

    @classmethod
    def of(cls, normalize: str) -> Transform:
        """A new model's transform for `--normalize`: total -> ln(CP10k + 1), none -> log2(counts + 1)."""
        return cls(normalize, 1e4, math.e if normalize == "total" else 2.0)

    def apply(self, counts: np.ndarray, totals: np.ndarray | None = None) -> np.ndarray:
        """Transform (spots, genes) counts; `totals` are the spots' library sizes over all genes."""
        x = np.asarray(counts, dtype=np.float64)
        if self.normalize == "total":
            depth = x.sum(axis=1) if totals is None else np.asarray(totals, dtype=np.float64)
            x = x * self._scale(depth)[:, None]
        return self._log(x).astype(np.float32)

    def apply_sparse(self, counts: sparse.spmatrix, totals: np.ndarray) -> sparse.csr_matrix:
        """`apply` for sparse counts, touching only stored entries (log(0 + 1) is 0); `counts` is left as it was.

        The result keeps the arithmetic's precision: float64 once scaled, the counts' dtype otherwise.
        """
        values = sparse.diags(self._scale(totals)) @ counts if self.normalize == "total" else counts
        values = sparse.csr_matrix(values, copy=True)
        values.data = self._log(values.data)
        return values

    def linear(self, values: np.ndarray) -> np.ndarray:
        """Model-space values back to what was logged (counts per `target_sum`, or counts), float64, at most what the
        units can hold: a gene takes at most all of a spot's counts, and count units stop far short of overflow. A
        model far outside its training data can predict values beyond that; they are read at the ceiling."""
        ceiling = self.target_sum if self.rates else MAX_COUNTS
        x = np.minimum(np.asarray(values, dtype=np.float64), self._log(ceiling))
        return np.maximum(np.power(self.log_base, x) - 1.0, 0.0)

    def from_linear(self, values: np.ndarray) -> np.ndarray:
        """What was logged (counts per `target_sum`, or counts) into model space, float64: `linear`'s inverse."""
        return self._log(np.asarray(values, dtype=np.float64))

    def count_noise_variance(self, values: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """The variance, in these units, that Poisson counting adds to a measured spot of `depth` UMI whose expression is
        `values`: exact over the counts up to POISSON_EXACT_MAX expected, by the delta method beyond (where it holds).
        Only normalised units have a rate to count at another depth: zero for count units."""
        values = np.asarray(values, dtype=np.float64)
        if not self.rates:
            return np.zeros(values.shape)
        depth = np.broadcast_to(np.maximum(np.asarray(depth, dtype=np.float64), 1.0), values.shape)
        grow = np.power(self.log_base, values)  # 1 + rate x target_sum
        expected = np.maximum(grow - 1.0, 0.0) / self.target_sum * depth
        slope = self.target_sum / depth / grow / np.log(self.log_base)  # units per count, at the expected count
        out = expected * slope**2
        low = np.flatnonzero(expected <= POISSON_EXACT_MAX)
        counts = np.arange(POISSON_COUNTS)
        for part in np.array_split(low, max(1, len(low) // 100_000)):
            lam, scale = expected.flat[part][:, None], self.target_sum / depth.flat[part][:, None]
            pmf = poisson.pmf(counts, lam)
            level = np.log1p(counts * scale) / np.log(self.log_base)
            mean = (pmf * level).sum(1, keepdims=True)
            out.flat[part] = (pmf * (level - mean) ** 2).sum(1)
        return out

    def less_count_noise(self, variance: np.ndarray, values: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """A per-gene residual variance without the count noise of spots whose expression is `values` (N, G) at `depth`
        (N,): the uncertainty about the expression, which the observation model counts again at a measured spot's
        depth (at least RATE_SHARE_FLOOR of it kept). Unchanged in count units."""
        if not self.rates:
            return variance
        return less_noise(variance, self.count_noise_variance(values, np.asarray(depth)[:, None]).mean(0))

    def _scale(self, totals: np.ndarray) -> np.ndarray:
        """Each spot's factor to `target_sum` counts; an empty spot is left unscaled rather than divided by zero."""
        return self.target_sum / np.maximum(totals, 1.0)

    def _log(self, values: np.ndarray) -> np.ndarray:
        return np.log1p(values) / np.log(self.log_base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Transform:
        return cls(**data)


@dataclass
class Expression:
    """Raw counts of one sample: spots x genes, with each spot's total over all genes."""

    barcodes: list[str]
    genes: list[str]
    counts: sparse.csr_matrix
    totals: np.ndarray
    coords: np.ndarray | None
    raw: bool = True  # False: the file held normalised expression; counts are per `totals` (10,000), no depth is known

    def restrict(self, genes: set[str]) -> Expression:
        """The same spots with only the genes in `genes` (totals still count every gene)."""
        keep = [i for i, g in enumerate(self.genes) if g in genes]
        return Expression(self.barcodes, [self.genes[i] for i in keep], self.counts[:, keep], self.totals, self.coords, self.raw)

    def columns(self, genes: list[str], fill_missing: bool = False) -> np.ndarray:
        """Dense counts for `genes` in that order; absent genes are an error unless filled with 0."""
        index = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in index]
        if missing and not fill_missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            mine, theirs = gene_namespace(self.genes), gene_namespace(missing)
            if mine != theirs:
                raise HingeError(f"{len(missing)} panel genes are missing from this sample, which names its genes as {mine} "
                                 f"(e.g. {', '.join(self.genes[:2])}) where the panel has {theirs} ({shown})",
                                 "name genes the same way in every sample (map Ensembl ids to symbols, or the reverse): "
                                 f"{setting('fill-missing')} zero would leave this sample with no expression at all")
            raise HingeError(
                f"{len(missing)} panel genes are missing from this sample: {shown}",
                f"pass {setting('fill-missing')} zero to treat them as unexpressed, or choose a panel the samples share",
            )
        out = np.zeros((len(self.barcodes), len(genes)), np.float32)
        present = [(j, index[g]) for j, g in enumerate(genes) if g in index]
        if present:
            cols, src = zip(*present, strict=True)
            out[:, list(cols)] = self.counts[:, list(src)].toarray()
        return out


ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}")


def gene_namespace(genes: Sequence[str]) -> str:
    """'Ensembl ids' when most of `genes` are (ENSG00000141510, ENSMUSG...), else 'symbols': two samples that differ
    here share no gene, whatever the panel."""
    ids = sum(bool(ENSEMBL_ID.match(g)) for g in genes)
    return "Ensembl ids" if ids > len(genes) / 2 else "symbols"


def read_h5ad(path: Path, what: str, fix: str, backed: bool = False) -> ad.AnnData:
    """Open an .h5ad, turning a missing or unreadable file into a HingeError that says `fix`."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"{what} {path} does not exist", fix)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same to the user
        raise HingeError(f"{what} {path} is not a readable .h5ad ({exc.__class__.__name__}: {exc})", fix) from None


def read_expression(path: Path, layer: str | None = None) -> Expression:
    """Raw counts from an .h5ad: `layers[layer]`, or as found by `raw_counts` (X, else layers['counts'])."""
    adata = _read_spots(path)
    counts, _ = raw_counts(adata, layer, str(path))
    return _expression(adata, counts)


def read_truth(path: Path, layer: str | None = None) -> Expression:
    """A measured section for eval: raw counts where the file has them. Else, each with a warning: counts that are not
    whole numbers (corrected or averaged), read as counts; or normalised expression, ln or log2 of counts per 10,000
    + 1 of every gene as scanpy's normalize_total + log1p writes it, read as counts per 10,000 with no depth
    (`raw` False: no observation model, and depth-partial scores are plain ones). Anything else is refused."""
    adata = _read_spots(path)
    values, where, kind = measured_values(adata, layer, str(path))
    if kind == COUNTS:
        return _expression(adata, values)
    if kind == FRACTIONAL:
        log.warning("%s: %s holds counts that are not whole numbers; the observation model assumes raw UMI counts, so "
                    "calibration figures are approximate (give raw counts, e.g. --layer counts)", path, where)
        return _expression(adata, values)
    for base, name in ((math.e, "ln"), (2.0, "log2")):
        rates = values.copy()
        rates.data = np.power(base, rates.data.astype(np.float64)) - 1.0
        sums = np.asarray(rates.sum(1)).ravel()
        if len(sums) and np.allclose(sums, NORMALISED_SUM, rtol=0.01):
            log.warning("%s: %s holds normalised expression (%s(counts per 10,000 + 1)), not raw counts: eval scores it with "
                        "no depth, so calibration is plain (no observation model) and depth-partial equals plain Pearson "
                        "(give raw counts, e.g. --layer counts, for both)", path, where, name)
            return replace(_expression(adata, rates.astype(np.float32)), totals=np.full(len(sums), NORMALISED_SUM), raw=False)
    raise HingeError(f"{where} of {path} holds neither raw counts nor ln or log2 of counts per 10,000 + 1 over every gene",
                     f"give the raw UMI counts in X or with {setting('layer')} (layers: {', '.join(adata.layers.keys()) or 'none'})")


def _read_spots(path: Path) -> ad.AnnData:
    path = Path(path)
    adata = read_h5ad(path, "expression file", "give an .h5ad written by anndata, with raw counts")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise HingeError(f"expression file {path} is empty ({adata.n_obs} spots x {adata.n_vars} genes)",
                         "give the sample's full .h5ad")
    if not adata.var_names.is_unique:
        repeated = sorted(set(adata.var_names[adata.var_names.duplicated()]))
        log.warning("%s names %d genes more than once (%s): the repeats are kept as GENE-1, GENE-2, ... "
                    "(sum them and save the file again to count them as one gene)", path, len(repeated), ", ".join(repeated[:5]))
        adata.var_names_make_unique()
    return adata


def _expression(adata: ad.AnnData, counts: sparse.csr_matrix) -> Expression:
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2] if "spatial" in adata.obsm else None
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return Expression([str(b) for b in adata.obs_names], [str(g) for g in adata.var_names], counts, totals, coords)


def expression_unit(normalize: str, target_sum: float, log_base: float) -> str:
    """The unit of model-space values (a Transform's fields): e.g. log2(counts + 1), ln(counts per 10000 + 1)."""
    log = "ln" if abs(log_base - math.e) < 1e-9 else f"log{log_base:g}"
    if normalize == "none":
        return f"{log}(counts + 1)"
    return f"{log}(counts per {target_sum:g} + 1)"
