"""`hinge eval` scores a predictive spread: known draws give hand-computable CRPS, energy score, coverage and PIT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hinge_cli.data.expression import Transform
from hinge_cli.eval import evaluate, metric_table, read_slide_metrics
from hinge_cli.eval.proper_scores import crps_gaussian

GENES = ["G0", "G1", "G2"]
N_SPOTS = 8
SHIFTED = 2  # spots whose point prediction is 1.5 off the truth
NARROW = 2  # spots whose [q05, q95] misses the truth


@pytest.fixture(scope="module")
def truth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Counts 2^t - 1, so the model-space truth log2(counts + 1) is the integer t."""
    root = tmp_path_factory.mktemp("probabilistic")
    levels = np.random.default_rng(0).integers(0, 5, size=(N_SPOTS, len(GENES))).astype(np.float64)
    coords = np.column_stack([np.arange(N_SPOTS) * 100.0 + 200, np.full(N_SPOTS, 300.0) + (np.arange(N_SPOTS) % 2) * 50])
    adata = ad.AnnData(X=(2**levels - 1).astype(np.float32), obs=pd.DataFrame(index=[f"spot{i}" for i in range(N_SPOTS)]),
                       var=pd.DataFrame(index=GENES))
    adata.obsm["spatial"] = coords
    adata.write_h5ad(root / "truth.h5ad")
    return root / "truth.h5ad", levels, coords


def predict(path: Path, levels: np.ndarray, coords: np.ndarray, std: bool = True, quantiles: bool = True,
            draws: bool = True, model: str = "hinge") -> Path:
    """A prediction of the truth `levels`: draws t - 1, t + 1, t + 2; point prediction t (1.5 off on SHIFTED spots), std 1;
    [q05, q95] = [t - 1, t + 1] but [t + 0.5, t + 1] on the last NARROW spots."""
    mean = levels.copy()
    mean[:SHIFTED] += 1.5
    adata = ad.AnnData(X=mean.astype(np.float32), obs=pd.DataFrame(index=[f"spot{i}" for i in range(N_SPOTS)]),
                       var=pd.DataFrame(index=GENES))
    adata.obsm["spatial"] = coords
    if std:
        adata.layers["std"] = np.ones_like(mean, np.float32)
    if quantiles:
        q05 = levels - 1.0
        q05[-NARROW:] = levels[-NARROW:] + 0.5
        adata.layers["q05"], adata.layers["q95"] = q05.astype(np.float32), (levels + 1.0).astype(np.float32)
    if draws:
        adata.obsm["samples"] = np.stack([levels - 1.0, levels + 1.0, levels + 2.0], axis=1).astype(np.float32)
    image = np.full((400, 800, 3), 230, np.uint8)
    adata.uns["hinge"] = {"transform": Transform().to_dict(), "sample_id": "s1", "model": model}
    adata.uns["spatial"] = {"s1": {"images": {"hires": image},
                                   "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 55.0}}}
    adata.write_h5ad(path)
    return path


def test_known_draws_give_hand_computed_scores(truth, tmp_path: Path) -> None:
    truth_path, levels, coords = truth
    pred = predict(tmp_path / "p.h5ad", levels, coords)
    evaluate([pred], [truth_path], out=tmp_path / "out", genes_to_plot=["G0"])
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    cal = m["calibration"]
    # draws [t - 1, t + 1, t + 2] at y = t: E|X - y| = 4/3, E|X - X'| over the distinct pairs = 2 (2 + 3 + 1) / 6
    # (over all nine pairs, the draws with themselves included, it would be 4/3 and the CRPS 2/3)
    assert cal["crps"] == pytest.approx(1 / 3) and cal["crps_from"] == "samples" and cal["n_draws"] == 3
    assert all(m["per_gene"][g]["crps"] == pytest.approx(1 / 3) for g in GENES)
    # the gene vectors: the draws √3, √3 and 2√3 from the truth, 2√3, 3√3 and √3 apart
    assert cal["energy_score"] == pytest.approx(4 * math.sqrt(3) / 3 - 0.5 * 2 * math.sqrt(3))
    assert cal["within_1std"] == pytest.approx((N_SPOTS - SHIFTED) / N_SPOTS) and cal["within_2std"] == 1.0
    assert cal["within_90_interval"] == pytest.approx((N_SPOTS - NARROW) / N_SPOTS)
    # one draw below, none equal: the truth's rank among four values is 1, so its PIT lies in [1/4, 2/4]
    histogram = np.array(cal["pit_histogram"])
    assert len(histogram) == 10 and histogram.sum() == pytest.approx(1.0)
    assert histogram[:2].sum() == 0 and histogram[5:].sum() == 0
    table = metric_table(read_slide_metrics(tmp_path / "out" / "metrics.json"))
    assert table["calibration.crps"] == pytest.approx(1 / 3) and table["calibration.n_draws"] == 3
    report = (tmp_path / "out" / "report.md").read_text()
    assert "CRPS, mean over genes (lower is better)" in report and "3 draws per spot" in report and "fair estimates" in report
    assert "![pit_histogram](maps/pit_histogram.png)" in report and (tmp_path / "out" / "maps" / "pit_histogram.png").is_file()


def test_the_maps_show_the_spread_beside_the_mean(truth, tmp_path: Path) -> None:
    truth_path, levels, coords = truth
    widths = {}
    for name, spread in (("with", True), ("without", False)):
        pred = predict(tmp_path / f"{name}.h5ad", levels, coords, std=spread, quantiles=spread, draws=spread)
        evaluate([pred], [truth_path], out=tmp_path / name, genes_to_plot=["G1"])
        with Image.open(tmp_path / name / "maps" / "G1.png") as im:
            widths[name] = im.width
    assert widths["with"] > widths["without"] * 1.25  # a fourth panel: the predictive std
    assert not (tmp_path / "without" / "maps" / "pit_histogram.png").exists()


def test_without_draws_the_crps_is_the_gaussian_one(truth, tmp_path: Path) -> None:
    truth_path, levels, coords = truth
    pred = predict(tmp_path / "p.h5ad", levels, coords, draws=False, quantiles=False)
    evaluate([pred], [truth_path], out=tmp_path / "out", maps=False)
    cal = json.loads((tmp_path / "out" / "metrics.json").read_text())["calibration"]
    assert cal["crps_from"] == "gaussian" and cal["n_draws"] == 0
    expected = crps_gaussian(np.r_[np.full(SHIFTED, 1.5), np.zeros(N_SPOTS - SHIFTED)], np.ones(N_SPOTS), np.zeros(N_SPOTS))
    assert cal["crps"] == pytest.approx(expected.mean())
    assert cal["energy_score"] is None and cal["within_90_interval"] is None  # no draws, no quantiles: NaN as null
    assert "mean ± std only" in (tmp_path / "out" / "report.md").read_text()


def test_old_files_without_a_spread_still_evaluate(truth, tmp_path: Path) -> None:
    """No spread at all: no calibration; as a baseline beside a prediction with one, its column is n/a."""
    truth_path, levels, coords = truth
    old = predict(tmp_path / "old.h5ad", levels, coords, std=False, quantiles=False, draws=False, model="ridge")
    evaluate([old], [truth_path], out=tmp_path / "old", maps=False)
    m = json.loads((tmp_path / "old" / "metrics.json").read_text())
    assert m["calibration"] is None and "crps" not in m["per_gene"]["G0"]
    assert "none in the file" in (tmp_path / "old" / "report.md").read_text()
    new = predict(tmp_path / "new.h5ad", levels, coords)
    evaluate([new], [truth_path], out=tmp_path / "both", maps=False, baselines=[old])
    report = (tmp_path / "both" / "report.md").read_text()
    assert "| CRPS (lower better) | 0.333 | n/a | n/a |" in report
    assert json.loads((tmp_path / "both" / "metrics.json").read_text())["baseline"]["metrics"]["calibration.crps"] is None


def test_a_probabilistic_baseline_is_compared_on_its_scores(truth, tmp_path: Path) -> None:
    truth_path, levels, coords = truth
    hinge = predict(tmp_path / "hinge.h5ad", levels, coords)
    ridge = predict(tmp_path / "ridge.h5ad", levels, coords, draws=False, model="ridge")
    summary = evaluate([hinge], [truth_path], out=tmp_path / "out", maps=False, baselines=[ridge])
    lines = summary.lines()
    row = {name: next(line for line in lines if line.strip().startswith(name)).split() for name in ("CRPS", "energy score")}
    gaussian = crps_gaussian(np.r_[np.full(SHIFTED, 1.5), np.zeros(N_SPOTS - SHIFTED)], np.ones(N_SPOTS), np.zeros(N_SPOTS)).mean()
    assert row["CRPS"][-3:] == ["0.333", f"{gaussian:.3f}", "ridge" if gaussian < 1 / 3 else "hinge"]
    assert row["energy score"][-3:] == [f"{math.sqrt(3) / 3:.3f}", "n/a", "n/a"]  # this ridge file keeps no draws


def test_an_old_metrics_json_still_reads(truth, tmp_path: Path) -> None:
    """metrics.json written before the proper scores: the calibration has only the two coverages."""
    truth_path, levels, coords = truth
    evaluate([predict(tmp_path / "p.h5ad", levels, coords)], [truth_path], out=tmp_path / "out", maps=False)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    m["calibration"] = {k: m["calibration"][k] for k in ("within_1std", "within_2std", "expected_gaussian")}
    for gene in m["per_gene"].values():
        del gene["crps"]
    (tmp_path / "old.json").write_text(json.dumps(m))
    old = read_slide_metrics(tmp_path / "old.json")
    assert old.calibration.within_1std == pytest.approx((N_SPOTS - SHIFTED) / N_SPOTS)
    assert math.isnan(old.calibration.crps) and old.calibration.n_draws == 0 and old.per_gene.crps is None
    assert not old.calibration.fair and read_slide_metrics(tmp_path / "out" / "metrics.json").calibration.fair
    assert math.isnan(metric_table(old)["calibration.crps"])
