"""Slide standardisation of image features: the statistics, their file and memory paths, and where they apply."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from hinge_cli.data.dataset import assemble
from hinge_cli.data.expression import Transform
from hinge_cli.data.features import CHUNK_SPOTS, FeatureNorm, SlideShift
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run


def _direct(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
    return flat.mean(0), flat.std(0)


def _write(path: Path, features: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    barcodes = [f"s{i}" for i in range(len(features))]
    with h5py.File(path, "w") as h5:
        h5["embeddings"] = features
        h5["barcodes"] = np.array(barcodes, dtype=object).astype("S")
        h5["coords"] = np.zeros((len(barcodes), 2), np.int64)


def test_chunked_moments_equal_the_direct_ones_far_from_zero(tmp_path: Path) -> None:
    """More spots than a chunk, views kept, a mean 10^4 times the spread: the merged moments are the direct ones,
    and the file path gives what the in-memory path gives."""
    rng = np.random.default_rng(0)
    features = (1e4 + rng.standard_normal((2 * CHUNK_SPOTS + 37, 3, 5))).astype(np.float32)
    shift = SlideShift.fit(features)
    mean, std = _direct(features)
    np.testing.assert_allclose(shift.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(shift.std, std, rtol=1e-9)
    assert shift.n_spots == len(features)
    standardised = shift(features)
    np.testing.assert_allclose(standardised.reshape(-1, 5).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(standardised.reshape(-1, 5).std(0), 1, atol=1e-4)
    _write(tmp_path / "e.h5", features)
    read = SlideShift.read(tmp_path / "e.h5")
    assert np.array_equal(read.mean, shift.mean) and np.array_equal(read.std, shift.std)


def test_a_single_spot_is_refused_and_a_few_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(HingeError, match="frag has 1 embedded spot.*at least 2.*--feature-norm training"):
        SlideShift.fit(np.ones((1, 4), np.float32), "frag")
    with caplog.at_level(logging.WARNING):
        SlideShift.fit(np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32), "core")
    assert "core has only 12 embedded spots" in caplog.text


def test_feature_norm_records_whether_slides_were_standardised() -> None:
    norm = FeatureNorm.fit(np.arange(12, dtype=np.float32).reshape(4, 3), per_slide=True)
    again = FeatureNorm.from_dict(norm.to_dict())
    assert again.per_slide and np.array_equal(again.mean, norm.mean) and np.array_equal(again.std, norm.std)
    old = {"mean": [0.0] * 3, "std": [1.0] * 3}  # a card written before slide standardisation
    assert not FeatureNorm.from_dict(old).per_slide


def test_assemble_standardises_each_sample_by_all_its_embedded_spots(tmp_path: Path) -> None:
    """Two samples with different stains; the spot with no counts is dropped from the table but not from its slide's
    statistics, so a sample is standardised the same in training as when `generate` reads all its spots."""
    run = Run(tmp_path / "run")
    rng = np.random.default_rng(2)
    raw = {}
    for k, sample in enumerate(("A", "B")):
        counts = rng.poisson(5, (40, 2)).astype(np.float32)
        counts[0] = 0
        adata = ad.AnnData(X=counts)
        adata.obs_names = [f"s{i}" for i in range(40)]
        adata.var_names = ["X", "Y"]
        adata.write_h5ad(tmp_path / f"{sample}.h5ad")
        run.register_sample(sample, expression={"path": str(tmp_path / f"{sample}.h5ad")})
        raw[sample] = (10 * k + (1 + k) * rng.standard_normal((40, 2, 3))).astype(np.float32)
        _write(run.embeddings("enc", sample), raw[sample])
    table = assemble(run, "enc", ["A", "B"], ["X", "Y"], Transform(), per_slide=True)
    plain = assemble(run, "enc", ["A", "B"], ["X", "Y"], Transform())
    for sample in ("A", "B"):
        rows = table.sample == sample
        assert rows.sum() == 39
        mean, std = _direct(raw[sample])
        np.testing.assert_allclose(table.features[rows], (raw[sample][1:] - mean) / std, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(plain.features[rows], raw[sample][1:])
