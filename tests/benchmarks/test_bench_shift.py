"""The shift benchmark's simulated shifts and its table, on small synthetic arrays (the HER2ST run is `make bench-shift`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "her2st"))

import shift  # noqa: E402

from hinge_cli.data.expression import Expression  # noqa: E402
from hinge_cli.eval import HEADLINE  # noqa: E402
from hinge_cli.slide.stats import focus  # noqa: E402


def tissue(seed: int = 0) -> np.ndarray:
    """An H&E-like picture: pink stroma with purple nuclei, fine detail for the blur to take away."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((96, 128, 3), np.uint8)
    rgb[:] = (215, 150, 190)
    for y, x in rng.integers(4, (92, 124), (60, 2)):
        rgb[y - 2 : y + 3, x - 2 : x + 3] = (95, 60, 150)
    return rgb


def test_hed_jitter_moves_the_colours_further_the_stronger_it_is_and_not_at_all_at_zero():
    rgb = tissue()
    moved = [np.abs(shift.hed_jitter(rgb, sigma, seed=3).astype(float) - rgb).mean() for sigma in (0.0, 0.05, 0.2)]
    assert moved[0] < 0.6 and moved[0] < moved[1] < moved[2]  # at 0 only the round trip's rounding
    assert abs(focus(shift.hed_jitter(rgb, 0.2, seed=3)) / focus(rgb) - 1) < 0.5  # a stain keeps the detail


def test_blur_and_jpeg_take_the_fine_detail_away():
    rgb = tissue()
    assert focus(shift.blurred_jpeg(rgb)) < 0.5 * focus(rgb)


def test_thinning_brings_the_median_depth_to_660_and_never_adds_a_count():
    rng = np.random.default_rng(1)
    counts = sparse.csr_matrix(rng.poisson(rng.uniform(20, 60, (300, 200))).astype(np.float32))
    truth = Expression([f"s{i}" for i in range(300)], [f"G{j}" for j in range(200)], counts, np.asarray(counts.sum(1)).ravel(), None)
    thin = shift.thinned(truth, seed=0)
    assert abs(np.median(thin.totals) - shift.THIN_MEDIAN) < 0.03 * shift.THIN_MEDIAN
    assert (thin.counts > counts).nnz == 0
    np.testing.assert_allclose(thin.totals, np.asarray(thin.counts.sum(1)).ravel())


def _scores(drop: dict[str, float], coverage: float = 0.68) -> dict:
    """Two folds x two seeds of made-up scores: each method loses `drop[method]` under every image shift."""
    out: dict = {}
    for fold in ("C2", "C3"):
        for name in shift.SHIFTS:
            for seed in (0, 1):
                numbers = {}
                for method in shift.METHODS:
                    base = 0.3 + 0.01 * seed
                    lost = drop[method] if name in shift.IMAGE_SHIFTS else 0.0
                    numbers[method] = {HEADLINE.key: base - lost, "calibration.within_1std": coverage, "shift.score": 0.5,
                                       "shift.outside": float(name in ("stain-strong", "jpeg50-blur1", "mpp+10%"))}
                out.setdefault(fold, {}).setdefault(name, {})[seed] = numbers
    return out


def test_the_summary_pairs_each_shift_with_the_unshifted_section_and_reads_the_targets():
    summary = shift.summarise(_scores({"ridge": 0.05, "hinge": 0.07}))
    cell = summary["stain-strong"]["hinge"]
    assert abs(cell["drop"]["mean"] - 0.07) < 1e-9 and abs(cell[HEADLINE.key]["mean"] - 0.235) < 1e-9
    assert abs(cell[HEADLINE.key]["seed_std"] - 0.005) < 1e-9
    lines = shift.targets(summary)
    assert sum("missed" in line for line in lines) == len(shift.IMAGE_SHIFTS)  # HINGE lost 0.02 more than ridge everywhere
    assert all("met" in line for line in shift.targets(shift.summarise(_scores({"ridge": 0.05, "hinge": 0.055}))))
