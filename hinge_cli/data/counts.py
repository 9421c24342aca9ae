"""Finding the raw counts in an AnnData, wherever its writer put them.

Models train on log2(counts + 1) of raw UMI counts, so a matrix that was already
normalised or log-transformed would be transformed twice without any error. Scanpy's
convention keeps raw counts in `layers['counts']` and log values in `X`; this module
accepts that, an explicitly named layer, or raw counts in `X`, and refuses anything else.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
from scipy import sparse

from hinge_cli.errors import HingeError, setting

log = logging.getLogger(__name__)

SCANPY_COUNTS_LAYER = "counts"
LOG_CEILING = 30.0  # a log of counts per 10,000 never exceeds log2(10,001) = 13.3: larger fractional values are counts
COUNTS, FRACTIONAL, NORMALISED = "counts", "fractional counts", "normalised"


def looks_like_counts(matrix: object) -> bool:
    """True when every stored value is a non-negative integer (a dense or sparse matrix)."""
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return True
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number):
        return False
    if np.issubdtype(values.dtype, np.integer):
        return bool(values.min() >= 0)
    return bool(np.isfinite(values).all() and values.min() >= 0 and np.allclose(values, np.round(values)))


def _layer_list(adata: ad.AnnData) -> str:
    return ", ".join(adata.layers.keys()) or "none"


def raw_counts(adata: ad.AnnData, layer: str | None = None, source: str = "the expression file") -> tuple[sparse.csr_matrix, str]:
    """The spots x genes raw counts (float32 CSR) and where they were found ("X" or "layers['NAME']").

    `layer` named: that layer, which must exist and hold counts. Otherwise `X` when it holds
    non-negative integers, else `layers['counts']` (said in the log), else a HingeError.
    """
    if layer is not None:
        if layer not in adata.layers:
            raise HingeError(f"{source} has no layer '{layer}'", f"available layers: {_layer_list(adata)}; omit {setting('layer')} to use X")
        where, matrix = f"layers['{layer}']", adata.layers[layer]
        if not looks_like_counts(matrix):
            raise HingeError(
                f"{where} of {source} does not hold raw counts (negative or fractional values)",
                f"pass {setting('layer')} with the layer of raw UMI counts (layers: {_layer_list(adata)})",
            )
        return sparse.csr_matrix(matrix, dtype=np.float32), where
    if looks_like_counts(adata.X):
        return sparse.csr_matrix(adata.X, dtype=np.float32), "X"
    if SCANPY_COUNTS_LAYER in adata.layers and looks_like_counts(adata.layers[SCANPY_COUNTS_LAYER]):
        log.info("%s: X does not hold raw counts; using layers['%s'] (scanpy's convention)", source, SCANPY_COUNTS_LAYER)
        return sparse.csr_matrix(adata.layers[SCANPY_COUNTS_LAYER], dtype=np.float32), f"layers['{SCANPY_COUNTS_LAYER}']"
    raise HingeError(
        f"X of {source} does not look like raw counts (negative or fractional values, e.g. normalised or log-transformed)",
        f"store raw UMI counts in X, or pass {setting('layer', 'NAME')} with the layer that holds them (layers: {_layer_list(adata)})",
    )


def measured_values(adata: ad.AnnData, layer: str | None = None,
                    source: str = "the expression file") -> tuple[sparse.csr_matrix, str, str]:
    """A measured section's values for eval, and what they are: raw counts as `raw_counts` finds them (COUNTS); else the
    non-negative values of X (or `layer`), read as FRACTIONAL counts where some exceed any log of counts per 10,000
    (corrected or averaged counts), else as NORMALISED expression, which the caller must recognise."""
    try:
        return (*raw_counts(adata, layer, source), COUNTS)
    except HingeError:
        if layer is not None and layer not in adata.layers:
            raise
    where, matrix = (f"layers['{layer}']", adata.layers[layer]) if layer is not None else ("X", adata.X)
    values = sparse.csr_matrix(matrix, dtype=np.float32)
    if values.data.size and (not np.isfinite(values.data).all() or values.data.min() < 0):
        raise HingeError(f"{where} of {source} holds negative or non-finite values (scaled or centred data), not counts",
                         f"give the raw UMI counts in X or with {setting('layer')} (layers: {_layer_list(adata)})")
    return values, where, FRACTIONAL if values.data.size and values.data.max() > LOG_CEILING else NORMALISED
