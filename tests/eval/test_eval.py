"""`hinge eval` on prediction/truth pairs written here, so a known prediction has known scores."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.data.expression import Transform, read_expression
from hinge_cli.errors import HingeError
from hinge_cli.eval import (
    HEADLINE,
    align,
    evaluate,
    match_coordinates,
    metric_table,
    read_prediction,
    read_slide_metrics,
    write_json,
)
from hinge_cli.run.directory import Run

PITCH = 100.0  # px between spot centres


def grid(n_side: int) -> np.ndarray:
    """A hexagonal lattice of spot centres (level-0 px), as on Visium."""
    rows, cols = np.mgrid[0:n_side, 0:n_side]
    x = cols * PITCH + (rows % 2) * PITCH / 2 + 200
    y = rows * PITCH * np.sqrt(3) / 2 + 200
    return np.column_stack([x.ravel(), y.ravel()]).astype(np.float64)


def make_truth(path: Path, n_side: int = 8, n_genes: int = 12, seed: int = 0) -> ad.AnnData:
    """Poisson counts with spatial waves and varying depth; two extra genes only count toward library size."""
    rng = np.random.default_rng(seed)
    xy = grid(n_side)
    depth = rng.uniform(0.5, 2.0, len(xy))
    phase = rng.uniform(0, 2 * np.pi, n_genes + 2)
    rate = depth[:, None] * np.exp(1.5 + np.sin(xy[:, :1] / 250 + phase) + 0.3 * rng.normal(size=(len(xy), n_genes + 2)))
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, 3] = 0  # a gene never detected: constant truth
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"spot{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)] + ["EXTRA1", "EXTRA2"]))
    adata.obsm["spatial"] = xy
    adata.write_h5ad(path)
    return adata


def write_prediction(path: Path, values: np.ndarray, barcodes: list[str], genes: list[str], coords: np.ndarray,
                     transform: Transform | None = None, std: np.ndarray | None = None, image: np.ndarray | None = None,
                     sample: str = "s1") -> Path:
    """A prediction file laid out as `hinge generate` writes it."""
    adata = ad.AnnData(X=values.astype(np.float32), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = coords
    if std is not None:
        adata.layers["std"] = std.astype(np.float32)
    adata.uns["hinge"] = {"transform": (transform or Transform()).to_dict(), "sample_id": sample}
    if image is not None:
        adata.uns["spatial"] = {sample: {"images": {"hires": image},
                                         "scalefactors": {"tissue_hires_scalef": 0.25, "spot_diameter_fullres": 55.0}}}
    adata.write_h5ad(path)
    return path


def perfect(truth: ad.AnnData, transform: Transform, genes: list[str]) -> np.ndarray:
    counts = np.asarray(truth.X)
    return transform.apply(counts[:, [truth.var_names.get_loc(g) for g in genes]], counts.sum(1))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ad.AnnData]:
    root = tmp_path_factory.mktemp("eval")
    truth = make_truth(root / "truth.h5ad")
    genes = [f"G{j}" for j in range(12)]
    values = perfect(truth, Transform(), genes)
    pred = write_prediction(root / "pred.h5ad", values, list(truth.obs_names), genes, truth.obsm["spatial"],
                            std=np.full_like(values, 0.1))
    return pred, root / "truth.h5ad", truth


def test_perfect_prediction_scores_perfectly(pair, tmp_path: Path) -> None:
    pred, truth, _ = pair
    summary = evaluate([pred], [truth], out=tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    corr = m["correlation"]
    for view in ("model", "normalised", "depth_partial"):
        assert corr[view]["pearson"]["mean"] == pytest.approx(1.0)
        # float32 predictions, turned back into CP10k, can swap the ranks of near-tied spots
        assert corr[view]["spearman"]["mean"] == pytest.approx(1.0, abs=1e-3 if view == "normalised" else 1e-9)
        assert corr[view]["coexpression"]["consistency"] == pytest.approx(1.0)
        assert corr[view]["coexpression"]["mean_abs_diff"] == pytest.approx(0.0, abs=1e-6)
        assert corr[view]["pearson"]["n_excluded"] == 1  # G3 is never detected
    assert m["per_gene"]["G3"]["pearson_model"] is None
    assert m["errors"]["mse"] == pytest.approx(0.0, abs=1e-10) and m["errors"]["mae"] == pytest.approx(0.0, abs=1e-5)
    assert m["variance"]["rvd"] == pytest.approx(0.0, abs=1e-6)
    assert m["spatial"]["morans_i_agreement"] == pytest.approx(1.0)
    assert m["calibration"]["within_1std"] == 1.0
    assert m["alignment"]["matched_by"] == "barcode" and m["alignment"]["n_matched"] == 64
    assert summary.slides[0].sample == "s1"
    report = (tmp_path / "report.md").read_text()
    assert "**Headline: depth-partial mean Pearson = 1.000**" in report and "PCC@50" in report
    pngs = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert {"coexpression_model.png", "coexpression_depth_partial.png", "pearson_vs_variance.png", "pit_histogram.png"} <= set(pngs)
    assert len(pngs) == 4 + 11  # every gene but the constant one is among the 6 best or 6 worst
    with Image.open(tmp_path / "maps" / "G0.png") as im:
        assert im.width > 3 * 100


def test_depth_only_predictions_score_nothing_beyond_depth(pair, tmp_path: Path) -> None:
    """Depth alone looks good on raw correlation, but gets no credit depth-partial or on normalised targets."""
    _, truth_path, truth = pair
    genes = [f"G{j}" for j in range(12)]
    totals = np.asarray(truth.X).sum(1, keepdims=True)
    offsets = np.linspace(0.5, 2.0, 12)
    candidates = {"linear": offsets + 0.8 * np.log(totals), "proportional": np.log2(1 + totals * offsets / 14)}
    corr = {}
    for name, values in candidates.items():
        write_prediction(tmp_path / f"{name}.h5ad", values, list(truth.obs_names), genes, truth.obsm["spatial"])
        evaluate([tmp_path / f"{name}.h5ad"], [truth_path], out=tmp_path / name, maps=False)
        corr[name] = json.loads((tmp_path / name / "metrics.json").read_text())["correlation"]
    assert corr["linear"]["model"]["pearson"]["mean"] > 0.2
    assert corr["linear"]["depth_partial"]["pearson"]["n_excluded"] == 12
    assert corr["linear"]["depth_partial"]["pearson"]["mean"] is None  # NaN is written as null
    assert corr["proportional"]["model"]["pearson"]["mean"] > 0.2
    assert corr["proportional"]["normalised"]["pearson"]["n_excluded"] == 12


def test_barcode_alignment_reorders_and_ignores_extra_spots(pair, tmp_path: Path) -> None:
    _, truth_path, truth = pair
    genes = ["G5", "G1", "NOT_MEASURED"]
    order = np.random.default_rng(1).permutation(truth.n_obs)[:40]
    values = np.column_stack([perfect(truth, Transform(), genes[:2])[order], np.zeros(40)])
    barcodes = [truth.obs_names[i] for i in order]
    values = np.vstack([values, np.ones((2, 3))])
    coords = np.vstack([truth.obsm["spatial"][order], [[0, 0], [1, 1]]])
    path = write_prediction(tmp_path / "p.h5ad", values, barcodes + ["ghost1", "ghost2"], genes, coords)
    aligned = align(read_prediction(path), read_expression(truth_path))
    assert aligned.genes == ["G5", "G1"] and aligned.gene_report["missing_from_truth"] == ["NOT_MEASURED"]
    assert aligned.alignment == {"n_pred_spots": 42, "n_truth_spots": 64, "matched_by": "barcode", "n_matched": 40}
    truth_counts = np.asarray(truth.X)[order][:, [5, 1]]
    np.testing.assert_array_equal(aligned.counts, truth_counts)
    np.testing.assert_allclose(aligned.totals, np.asarray(truth.X)[order].sum(1))


def test_coordinate_alignment_within_half_a_spot(pair, tmp_path: Path) -> None:
    _, truth_path, truth = pair
    xy = truth.obsm["spatial"]
    shift = np.array([20.0, -15.0])  # 25 px off: inside half the 100 px pitch
    far = np.array([[5000.0, 5000.0]])
    coords = np.vstack([xy[:30] + shift, far])
    values = np.zeros((31, 2))
    values[:30] = perfect(truth, Transform(), ["G0", "G1"])[:30]
    path = write_prediction(tmp_path / "p.h5ad", values, [f"grid{i}" for i in range(31)], ["G0", "G1"], coords)
    aligned = align(read_prediction(path), read_expression(truth_path))
    assert aligned.alignment["matched_by"] == "coordinates" and aligned.alignment["n_matched"] == 30
    assert aligned.alignment["radius_px"] == pytest.approx(PITCH / 2)  # no scalefactors: median spacing
    np.testing.assert_array_equal(aligned.counts[:, 0], np.asarray(truth.X)[:30, 0])


def test_match_coordinates_is_one_to_one() -> None:
    truth = np.array([[0.0, 0.0], [100.0, 0.0]])
    pred = np.array([[10.0, 0.0], [3.0, 0.0], [95.0, 0.0], [300.0, 0.0]])
    rows_p, rows_t = match_coordinates(pred, truth, radius=50)
    assert rows_p.tolist() == [1, 2] and rows_t.tolist() == [0, 1]  # the closer claim wins spot 0


def test_transform_normalised_and_nan_genes(pair, tmp_path: Path) -> None:
    """The truth goes through the prediction's own transform; NaN predictions are dropped and listed."""
    _, truth_path, truth = pair
    transform = Transform(normalize="total", target_sum=1000.0, log_base=np.e)
    genes = ["G0", "G1", "G2", "G4"]
    values = perfect(truth, transform, genes)
    values[5, 2] = np.nan
    path = write_prediction(tmp_path / "p.h5ad", values, list(truth.obs_names), genes, truth.obsm["spatial"], transform)
    evaluate([path], [truth_path], out=tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["genes"]["dropped_nonfinite"] == ["G2"] and m["genes"]["n_evaluated"] == 3
    assert m["errors"]["mse"] == pytest.approx(0.0, abs=1e-10)
    assert m["correlation"]["normalised"]["pearson"]["mean"] == pytest.approx(1.0)
    assert "left out, non-finite predictions: G2" in (tmp_path / "out" / "report.md").read_text()


def test_no_shared_genes_or_spots_is_a_user_error(pair, tmp_path: Path) -> None:
    _, truth_path, truth = pair
    path = write_prediction(tmp_path / "p.h5ad", np.zeros((64, 1)), list(truth.obs_names), ["XYZ"], truth.obsm["spatial"])
    with pytest.raises(HingeError, match="no gene"):
        align(read_prediction(path), read_expression(truth_path))
    path = write_prediction(tmp_path / "q.h5ad", np.zeros((3, 1)), ["a", "b", "c"], ["G0"], np.full((3, 2), 9e4))
    with pytest.raises(HingeError, match="only 0 spots"):
        align(read_prediction(path), read_expression(truth_path))


def test_maps_are_drawn_on_the_tissue_image(pair, tmp_path: Path) -> None:
    _, truth_path, truth = pair
    image = np.zeros((600, 600, 3), np.uint8)
    image[..., 0] = 200  # a red "slide"
    values = perfect(truth, Transform(), ["G0", "G1", "G2"])
    path = write_prediction(tmp_path / "p.h5ad", values, list(truth.obs_names), ["G0", "G1", "G2"], truth.obsm["spatial"],
                            image=image)
    evaluate([path], [truth_path], out=tmp_path / "out", genes_to_plot=["G1"])
    with Image.open(tmp_path / "out" / "maps" / "G1.png") as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert ((pixels[:, 0] == 200) & (pixels[:, 1] == 0)).sum() > 500  # background between spots is the slide


def test_cli_several_slides_gives_mean_and_std(pair, tmp_path: Path) -> None:
    pred, truth_path, truth = pair
    noisy = perfect(truth, Transform(), [f"G{j}" for j in range(12)])
    noisy += np.random.default_rng(2).normal(0, 0.5, noisy.shape)
    other = write_prediction(tmp_path / "noisy.h5ad", noisy, list(truth.obs_names), [f"G{j}" for j in range(12)],
                             truth.obsm["spatial"], sample="s2")
    genes_file = tmp_path / "genes.txt"
    genes_file.write_text("G0\nG1\nG2\nG3\nG4\n")
    result = CliRunner().invoke(app, ["eval", "--pred", str(pred), "--truth", str(truth_path), "--pred", str(other),
                                      "--truth", str(truth_path), "--out", str(tmp_path / "out"), "--genes", str(genes_file), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    key = "correlation.model.pearson.mean"
    one, two = summary["slides"]["s1"][key], summary["slides"]["s2"][key]
    assert one == pytest.approx(1.0) and two < 1.0
    assert summary["mean_std"][key]["mean"] == pytest.approx((one + two) / 2)
    assert summary["mean_std"][key]["std"] == pytest.approx(abs(one - two) / np.sqrt(2))
    assert json.loads((tmp_path / "out" / "s2" / "metrics.json").read_text())["genes"]["n_evaluated"] == 5
    assert "mean ± std" in (tmp_path / "out" / "report.md").read_text()


def test_cli_user_errors_exit_2(pair, tmp_path: Path) -> None:
    pred, truth_path, _ = pair
    runner = CliRunner()
    missing = runner.invoke(app, ["eval", "--pred", str(tmp_path / "nope.h5ad"), "--truth", str(truth_path)])
    assert missing.exit_code == 2
    unpaired = runner.invoke(app, ["eval", "--pred", str(pred), "--pred", str(pred), "--truth", str(truth_path)])
    assert unpaired.exit_code == 2


def test_run_directory_holds_the_outputs_and_records_the_stage(pair, tmp_path: Path) -> None:
    pred, truth_path, _ = pair
    run = Run(tmp_path / "run")
    evaluate([pred], [truth_path], run=run)
    assert (tmp_path / "run" / "eval" / "s1" / "report.md").exists()
    stage = run.stage("s1", "eval")
    assert stage["status"] == "ok" and stage["headline"] == pytest.approx(1.0)


def test_existing_results_are_kept_unless_overwrite(pair, tmp_path: Path) -> None:
    pred, truth_path, _ = pair
    out = tmp_path / "out"
    evaluate([pred], [truth_path], out=out, maps=False)
    assert not (out / "maps").exists()  # --no-maps: metrics and report only
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(HingeError, match="already exist.*--overwrite"):
        evaluate([pred], [truth_path], out=out, maps=False)
    assert (out / "metrics.json").read_bytes() == before
    evaluate([pred], [truth_path], out=out, overwrite=True, maps=False)
    assert json.loads((out / "metrics.json").read_text())["sample"] == "s1"


SUMMARY_KEYS = ["mean", "mean_top_variable", "n_genes", "n_excluded", "n_top_variable", "pcc_at_50", "pcc_at_200"]
PER_GENE_KEYS = ["pearson_model", "spearman_model", "pearson_normalised", "spearman_normalised", "pearson_depth_partial",
                 "spearman_depth_partial", "mse", "mae", "var_true", "var_pred", "rvd", "morans_i_true", "morans_i_pred",
                 "within_1std", "crps"]


def test_typed_results_serialise_to_the_metrics_json_layout(pair, tmp_path: Path) -> None:
    """The keys users' scripts read stay where they were; the reader gives back what the writer wrote."""
    pred, truth, _ = pair
    evaluate([pred], [truth], out=tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(m) == ["sample", "pred", "truth", "alignment", "genes", "transform", "headline", "correlation", "errors",
                       "variance", "spatial", "calibration", "per_gene", "pictures", "notes"]
    assert list(m["correlation"]) == ["model", "normalised", "depth_partial", "low_count_spots"]
    for view in (m["correlation"][name] for name in ("model", "normalised", "depth_partial")):
        assert list(view) == ["pearson", "spearman", "coexpression"]
        assert list(view["pearson"]) == SUMMARY_KEYS and list(view["spearman"]) == SUMMARY_KEYS
        assert list(view["coexpression"]) == ["consistency", "mean_abs_diff", "n_genes"]
    assert list(m["errors"]) == ["mse", "mae"]
    assert list(m["variance"]) == ["rvd", "n_genes", "mean_var_true", "mean_var_pred"]
    assert list(m["spatial"]) == ["morans_i_agreement", "morans_i_mean_abs_diff", "morans_i_mean_true",
                                  "morans_i_mean_pred", "n_genes", "weights"]
    assert {k: m["calibration"][k] for k in ("within_1std", "within_2std", "expected_gaussian")} == {
        "within_1std": 1.0, "within_2std": 1.0, "expected_gaussian": {"within_1std": 0.683, "within_2std": 0.954}}
    assert list(m["calibration"]) == ["within_1std", "within_2std", "expected_gaussian", "within_90_interval", "crps",
                                      "energy_score", "pit_histogram", "n_draws", "crps_from", "fair", "observation"]
    assert list(m["per_gene"]) == [f"G{j}" for j in range(12)] and list(m["per_gene"]["G0"]) == PER_GENE_KEYS
    assert list(m["pictures"]) == ["maps", "coexpression_model", "coexpression_depth_partial", "pearson_vs_variance",
                                   "pit_histogram", "chosen"]
    assert m["headline"] == HEADLINE.key == "correlation.depth_partial.pearson.mean"

    scores = read_slide_metrics(tmp_path / "out" / "metrics.json")
    assert scores.correlation.depth_partial.pearson.mean == m["correlation"]["depth_partial"]["pearson"]["mean"]
    write_json(tmp_path / "again.json", scores.to_dict())
    assert json.loads((tmp_path / "again.json").read_text()) == {k: m[k] for k in ("correlation", "errors", "variance",
                                                                                    "spatial", "calibration", "per_gene")}
    for key, value in metric_table(scores).items():  # a table key is the path of its number in the slide's metrics.json
        place = m
        for part in key.split("."):
            place = place[part]
        assert place == (None if value is None or np.isnan(value) else value), key


def test_spots_with_almost_no_counts_are_left_out_of_depth_partial_and_counted() -> None:
    from hinge_cli.eval.align import Aligned
    from hinge_cli.eval.score import score_slide

    rng = np.random.default_rng(0)
    n, g = 60, 5
    counts = rng.poisson(20, size=(n, g)).astype(float)
    totals = counts.sum(1) * 40 + rng.uniform(0, 500, n)
    pred = np.log2(counts + 1) + rng.normal(0, 0.5, (n, g))

    def scored(rows: np.ndarray):
        aligned = Aligned("s", [f"G{j}" for j in range(g)], pred[rows], None, counts[rows], totals[rows],
                          rng.uniform(0, 100, (len(rows), 2)), 10.0, {}, {})
        return score_slide(aligned, Transform()).metrics.correlation

    clean = scored(np.arange(n))
    counts = np.vstack([counts, np.zeros((1, g))])
    totals, pred = np.append(totals, 3.0), np.vstack([pred, np.full((1, g), 9.0)])  # a 3-count spot predicted far off
    with_empty = scored(np.arange(n + 1))
    assert with_empty.low_count_spots == 1 and clean.low_count_spots == 0
    assert with_empty.depth_partial.pearson.mean == pytest.approx(clean.depth_partial.pearson.mean)
    assert with_empty.model.pearson.mean != pytest.approx(clean.model.pearson.mean)  # raw views keep every spot
