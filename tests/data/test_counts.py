"""Raw counts are found in X, a named layer or scanpy's layers['counts'], and log values are refused."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from hinge_cli.data.counts import looks_like_counts, raw_counts
from hinge_cli.data.expression import read_expression
from hinge_cli.errors import HingeError

COUNTS = np.array([[0, 3, 1], [5, 0, 2]], np.float32)


def _scanpy_style() -> ad.AnnData:
    """What scanpy users save: log1p-normalised X, raw counts kept in layers['counts']."""
    adata = ad.AnnData(X=np.log1p(COUNTS))
    adata.layers["counts"] = sparse.csr_matrix(COUNTS)
    return adata


def test_looks_like_counts() -> None:
    assert looks_like_counts(COUNTS) and looks_like_counts(sparse.csr_matrix(COUNTS.astype(np.int32)))
    assert not looks_like_counts(np.log1p(COUNTS)) and not looks_like_counts(-COUNTS)
    assert not looks_like_counts(np.array([[np.nan, 1.0]]))


def test_counts_in_x_are_used_as_they_are() -> None:
    matrix, where = raw_counts(ad.AnnData(X=sparse.csr_matrix(COUNTS.astype(np.int64))))
    assert where == "X" and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix.toarray(), COUNTS)


def test_scanpy_counts_layer_is_found_and_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hinge_cli"):
        matrix, where = raw_counts(_scanpy_style(), source="s1.h5ad")
    assert where == "layers['counts']" and "s1.h5ad: X does not hold raw counts; using layers['counts']" in caplog.text
    np.testing.assert_array_equal(matrix.toarray(), COUNTS)


def test_named_layer_is_used_or_its_absence_listed() -> None:
    adata = _scanpy_style()
    adata.layers["umi"] = COUNTS * 2
    assert raw_counts(adata, "umi")[0].sum() == 2 * COUNTS.sum()
    with pytest.raises(HingeError, match="no layer 'raw'.*available layers: counts, umi"):
        raw_counts(adata, "raw")
    adata.layers["lognorm"] = np.log1p(COUNTS)
    with pytest.raises(HingeError, match=r"layers\['lognorm'\].*does not hold raw counts"):
        raw_counts(adata, "lognorm")


def test_log_values_without_counts_are_refused() -> None:
    adata = ad.AnnData(X=np.log1p(COUNTS))
    adata.layers["scaled"] = np.log1p(COUNTS) - 1
    with pytest.raises(HingeError, match="X of .* does not look like raw counts.*--layer NAME.*layers: scaled"):
        raw_counts(adata)


def test_read_expression_takes_a_layer_and_finds_scanpy_counts(tmp_path: Path) -> None:
    _scanpy_style().write_h5ad(tmp_path / "scanpy.h5ad")
    assert read_expression(tmp_path / "scanpy.h5ad").totals.tolist() == COUNTS.sum(1).tolist()
    assert read_expression(tmp_path / "scanpy.h5ad", layer="counts").totals.tolist() == COUNTS.sum(1).tolist()
    with pytest.raises(HingeError, match="no layer 'raw'"):
        read_expression(tmp_path / "scanpy.h5ad", layer="raw")
