"""Expression reading, the target transform, gene panels and the barcode join."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from scipy import sparse

from hinge_cli.data.dataset import assemble, training_samples
from hinge_cli.data.expression import Expression, Transform, read_expression
from hinge_cli.data.panel import select_panel
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run


def expression(counts: np.ndarray, genes: list[str], prefix: str = "b") -> Expression:
    m = sparse.csr_matrix(counts.astype(np.float32))
    return Expression([f"{prefix}{i}" for i in range(len(counts))], genes, m, counts.sum(axis=1).astype(float), None)


def test_transform_log2_and_total_normalisation() -> None:
    counts = np.array([[0, 1, 3], [2, 2, 4]], float)
    np.testing.assert_allclose(Transform().apply(counts), np.log2(counts + 1), rtol=1e-6)
    scaled = Transform("total", target_sum=10).apply(counts)
    np.testing.assert_allclose(scaled, np.log2(counts / counts.sum(1, keepdims=True) * 10 + 1), rtol=1e-6)
    # library size over all genes, not only the panel's, when given
    np.testing.assert_allclose(Transform("total", 10).apply(counts[:, :1], totals=np.array([4, 8])), np.log2([[1], [3.5]]), rtol=1e-6)
    with pytest.raises(HingeError, match="normalisation"):
        Transform("cpm")


def test_sparse_transform_is_the_dense_one_on_stored_entries() -> None:
    """Panel selection and corpora transform sparse counts: the same numbers as `apply`, zeros kept sparse."""
    counts = sparse.csr_matrix(np.array([[0, 3, 0, 1], [5, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    totals = np.array([10.0, 5.0, 0.0], dtype=np.float32)  # library sizes over more genes than these
    for transform in (Transform(), Transform("total", target_sum=100), Transform(log_base=10.0)):
        before = counts.copy()
        values = transform.apply_sparse(counts, totals)
        assert values.nnz == counts.nnz and (counts != before).nnz == 0
        np.testing.assert_allclose(values.toarray(), transform.apply(counts.toarray(), totals), rtol=1e-6)
    np.testing.assert_allclose(Transform("total", 100).apply_sparse(counts, totals)[0, 1], np.log2(31))


def test_read_expression_refuses_normalised_values(tmp_path: Path) -> None:
    adata = ad.AnnData(X=np.array([[0.5, 1.0]], np.float32))
    adata.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(HingeError, match="raw counts"):
        read_expression(tmp_path / "norm.h5ad")
    adata.layers["counts"] = np.array([[1, 2]], np.float32)
    adata.write_h5ad(tmp_path / "layer.h5ad")
    assert read_expression(tmp_path / "layer.h5ad", layer="counts").totals.tolist() == [3.0]


def test_hvg_picks_the_variable_genes_and_hmhvg_skips_mito_and_ribo() -> None:
    rng = np.random.default_rng(0)
    genes = ["MT-CO1", "RPL3", "VAR1", "VAR2", "FLAT1", "LOW1"]
    n = 200
    counts = np.stack([
        rng.poisson(rng.choice([5, 200], n)),  # mitochondrial: high and variable
        rng.poisson(rng.choice([5, 150], n)),  # ribosomal: high and variable
        rng.poisson(rng.choice([2, 60], n)),
        rng.poisson(rng.choice([3, 40], n)),
        rng.poisson(np.full(n, 50)),
        rng.poisson(np.full(n, 0.05)),
    ], axis=1)
    sample = expression(counts, genes)
    assert set(select_panel([sample], 2, "hvg", Transform())) == {"MT-CO1", "RPL3"}
    assert set(select_panel([sample], 2, "hmhvg", Transform())) == {"VAR1", "VAR2"}
    with pytest.raises(HingeError, match="fewer than --n-genes"):
        select_panel([sample], 10, "hvg", Transform())


def test_panel_uses_only_the_samples_it_is_given() -> None:
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(20)]
    train = [expression(rng.poisson(rng.gamma(1, 5, (50, 20))), genes) for _ in range(2)]
    wild = rng.poisson(np.where(np.arange(20) == 7, 1000, 1) * rng.random((50, 1)) * 5, (50, 20))
    panel = select_panel(train, 5, "hvg", Transform())
    assert select_panel(train, 5, "hvg", Transform()) == panel  # deterministic
    assert "G7" in select_panel(train + [expression(wild, genes)], 5, "hvg", Transform())
    assert panel == select_panel(train, 5, "hvg", Transform())


def _write_embeddings(path: Path, barcodes: list[str], features: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["embeddings"] = features
        h5["barcodes"] = np.array(barcodes, dtype=object).astype("S")
        h5["coords"] = np.zeros((len(barcodes), 2), np.int64)


def _run_with_sample(tmp_path: Path, genes: list[str], counts: np.ndarray, emb_barcodes: list[str]) -> Run:
    run = Run(tmp_path / "run")
    adata = ad.AnnData(X=counts.astype(np.float32))
    adata.obs_names = [f"s{i}" for i in range(len(counts))]
    adata.var_names = genes
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    run.register_sample("A", expression={"path": str(path)})
    _write_embeddings(run.embeddings("enc", "A"), emb_barcodes, np.arange(len(emb_barcodes) * 3, dtype=np.float32).reshape(-1, 3))
    return run


def test_assemble_joins_by_barcode_not_by_position(tmp_path: Path) -> None:
    counts = np.array([[1, 0], [0, 2], [3, 3], [0, 0]])
    run = _run_with_sample(tmp_path, ["X", "Y"], counts, ["s2", "s0", "s1", "s3"])
    table = assemble(run, "enc", ["A"], ["Y", "X"], Transform())
    assert table.barcodes == ["s2", "s0", "s1"]  # s3 has no counts on the panel: dropped
    np.testing.assert_allclose(table.targets, np.log2(np.array([[3, 3], [0, 1], [2, 0]]) + 1))
    np.testing.assert_array_equal(table.features[:, 0], [0, 3, 6])
    assert table.depth.tolist() == [6, 1, 2]


def test_misaligned_barcodes_and_missing_genes_are_errors(tmp_path: Path) -> None:
    run = _run_with_sample(tmp_path, ["X", "Y"], np.ones((3, 2)), ["s0", "s1", "zz"])
    with pytest.raises(HingeError, match="1 embedded spots have no expression"):
        assemble(run, "enc", ["A"], ["X"], Transform())
    run = _run_with_sample(tmp_path, ["X", "Y"], np.ones((3, 2)), ["s0", "s1", "s2"])
    with pytest.raises(HingeError, match="1 panel genes are missing.*Z"):
        assemble(run, "enc", ["A"], ["X", "Z"], Transform())
    filled = assemble(run, "enc", ["A"], ["X", "Z"], Transform(), fill_missing=True)
    assert (filled.targets[:, 1] == 0).all()


def test_training_samples_respect_holdout(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    for s in ("a", "b", "c"):
        run.register_sample(s, expression={"path": "x"})
    run.register_sample("grid-only", slide="y")
    assert training_samples(run, ["b"]) == ["a", "c"]
    with pytest.raises(HingeError, match="not in the run"):
        training_samples(run, ["nope"])
