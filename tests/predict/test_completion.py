"""Panel completion: genes given per spot are held fixed, condition the rest, and are never scored.

The sampler is checked with stub networks (exact properties), then `hinge generate --given` and
`hinge eval` end to end on a briefly trained tiny model.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse
from stand_in import TINY_GENES as MODEL_GENES
from stand_in import tiny_hinge as tiny_model
from stand_in import trained_tiny
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import GenerateConfig
from hinge_cli.data.expression import Expression, Transform
from hinge_cli.errors import HingeError
from hinge_cli.eval.align import Prediction, align
from hinge_cli.formats.tiles import read_tiles
from hinge_cli.model import MaskSchedule, sample
from hinge_cli.model.checkpoint import load_checkpoint
from hinge_cli.model.sampler import nearest_steps
from hinge_cli.predict import coupling as joint
from hinge_cli.predict.given import GivenSource, read_given
from hinge_cli.predict.predictive import predictive
from hinge_cli.run.directory import Run

runner = CliRunner()
G = 12


def _given(b: int, seed: int = 0, share: float = 0.3, genes: int = G) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, genes, generator=generator) < share
    mask[0] = False  # a spot with nothing given
    return mask, torch.randn(b, genes, generator=generator, dtype=torch.float64)


def test_given_genes_stay_visible_unchanged_and_the_rest_are_revealed_once_at_the_nearest_step():
    schedule = MaskSchedule(10, G)
    mask, values = _given(6)
    calls = []

    def step_oracle(x, visible, t, image):
        calls.append((x.clone(), visible.clone(), t.clone()))
        return t[:, None].to(x.dtype).expand(-1, G) + 100  # "predict" the step number, apart from any given value

    out = sample(step_oracle, torch.zeros(6, 1, dtype=torch.float64), schedule, n_samples=2, keep_samples=True,
                 given=mask, given_values=values)
    rows_given = mask.repeat_interleave(2, 0)
    rows_values = values.repeat_interleave(2, 0)
    for x, visible, _ in calls:
        assert visible[rows_given].all()
        assert torch.equal(x[rows_given], rows_values[rows_given])  # visible from the first step, never overwritten
    draws = out.samples.flatten(0, 1)
    assert torch.equal(draws[rows_given], rows_values[rows_given])
    assert torch.equal(out.mean[mask], values[mask]) and torch.all(out.std[mask] == 0)
    nearest, counts, grid = nearest_steps(schedule), schedule.hidden_counts, schedule.grid()
    plain_steps = [t for t, t_next in zip(grid[:-1], grid[1:], strict=True) if counts[t] > counts[t_next]]
    for row in range(len(draws)):
        told = [int(t[row]) for _, _, t in calls]
        visibles = [visible[row] for _, visible, _ in calls] + [torch.ones(G, dtype=torch.bool)]
        hidden_counts = [int((~v).sum()) for v in visibles]
        assert hidden_counts[0] == G - int(rows_given[row].sum()) and hidden_counts == sorted(hidden_counts, reverse=True)
        assert told == (plain_steps if not rows_given[row].any() else [int(nearest[h]) for h in hidden_counts[:-1]])
        for k in range(len(calls)):
            revealed = ~visibles[k] & visibles[k + 1]
            assert torch.all(draws[row][revealed] == told[k] + 100)  # revealed once, by the step that revealed it


def test_a_spot_given_nothing_is_predicted_as_without_given():
    model = tiny_model()
    image = torch.randn(5, 6)
    mask, values = _given(5, genes=MODEL_GENES)
    mask[:] = False
    plain = model.generate(image, n_samples=3, seed=4, temperature=1.0)
    completed = model.generate(image, n_samples=3, seed=4, temperature=1.0, given=mask, given_values=values)
    assert torch.equal(plain.mean, completed.mean) and torch.equal(plain.std, completed.std)


def test_giving_the_correlated_partner_lowers_the_error():
    """Genes in pairs (2k, 2k+1) with equal values; the stub copies a visible partner, else predicts 0 (no image signal)."""
    schedule = MaskSchedule(10, G)
    truth = torch.randn(200, G // 2, dtype=torch.float64).repeat_interleave(2, 1)
    partner = torch.arange(G) ^ 1

    def copy_partner(x, visible, t, image):
        return torch.where(visible[:, partner], x[:, partner], torch.zeros_like(x))

    image = torch.zeros(200, 1, dtype=torch.float64)
    given = torch.zeros(200, G, dtype=torch.bool)
    given[:, 0::2] = True  # one gene of each pair measured
    alone = sample(copy_partner, image, schedule, n_samples=1, steps=1)
    completed = sample(copy_partner, image, schedule, n_samples=1, steps=1, given=given, given_values=truth)
    error_alone = ((alone.mean - truth)[:, 1::2] ** 2).mean()
    error_completed = ((completed.mean - truth)[:, 1::2] ** 2).mean()
    assert error_alone > 0.5 and error_completed == 0


def test_completion_is_batch_size_independent_and_its_one_shot_point_sees_the_given_genes():
    model = tiny_model()
    assert model.has_spread  # so the draws carry the reveal noise too
    image = torch.randn(6, 6)
    mask, values = _given(6, seed=3, share=0.4, genes=MODEL_GENES)
    values = values.float()
    cfg = GenerateConfig(sampler="reverse", n_samples=3, steps=5, device="cpu")
    whole = predictive(model, image, cfg, torch.arange(6), mask, values)
    parts = [predictive(model, image[i:i + 2], cfg, torch.arange(i, i + 2), mask[i:i + 2], values[i:i + 2]) for i in (0, 2, 4)]
    for name in ("point", "draws", "center"):
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(whole.point[mask], values[mask])
    plain = predictive(model, image, cfg, torch.arange(6))
    assert not torch.allclose(plain.point[~mask][MODEL_GENES:], whole.point[~mask][MODEL_GENES:])  # spots with genes given move


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """A briefly trained tiny model on two synthetic samples; t0's measured counts as the given file."""
    run, made = trained_tiny(tmp_path_factory.mktemp("completion"))
    return run, made[0].spots


def _measured(path: Path, out: Path, keep_spots: slice = slice(None), genes: list[str] | None = None,
              rename: dict[str, str] | None = None, barcodes: bool = True) -> Path:
    adata = ad.read_h5ad(path)[keep_spots]
    adata = adata[:, genes] if genes is not None else adata
    adata = adata.copy()
    adata.var_names = [(rename or {}).get(g, g) for g in adata.var_names]
    if not barcodes:
        adata.obs_names = [f"other-{i}" for i in range(adata.n_obs)]
    adata.write_h5ad(out)
    return out


def _generate(run: Run, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["generate", "--sample-id", "t0", "--run", str(run.root), "--out", str(out), "--n-samples", "3",
                               "--steps", "4", "--device", "cpu", "--keep-samples", "-q", *extra])


def test_generate_given_holds_the_measured_genes_and_eval_scores_only_the_others(trained, tmp_path, monkeypatch):
    run, measured = trained
    monkeypatch.setattr(joint, "MIN_TRANSFER_SPOTS", 5)  # the tiny slide has too few spots to judge its image otherwise
    panel = load_checkpoint(run.checkpoint("best")).card.genes
    listed = tmp_path / "given.txt"
    listed.write_text("\n".join([*panel[:4], "NOT_A_GENE"]) + "\n")
    half = _measured(measured, tmp_path / "half.h5ad", keep_spots=slice(0, None, 2))
    out = tmp_path / "t0.h5ad"
    result = _generate(run, out, "--given", str(half), "--given-genes", str(listed))
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(out)
    given = adata.var["given"].to_numpy(bool)
    assert list(adata.var_names[given]) == panel[:4]
    truth = ad.read_h5ad(half)
    card = load_checkpoint(run.checkpoint("best")).card
    rows = adata.obs_names.get_indexer(truth.obs_names)
    assert (rows >= 0).all() and sorted(set(adata.obs["n_given"].to_numpy()[rows])) == [4]
    assert (np.delete(adata.obs["n_given"].to_numpy(), rows) == 0).all()
    counts = np.asarray(truth[:, panel[:4]].X.toarray() if hasattr(truth.X, "toarray") else truth[:, panel[:4]].X)
    totals = np.asarray(truth.X.sum(1)).ravel()
    expected = card.transform.apply(counts, totals)
    np.testing.assert_array_equal(adata.X[rows][:, given], expected)
    for layer in ("q05", "q95"):
        np.testing.assert_array_equal(adata.layers[layer][rows][:, given], expected)
    assert np.all(adata.layers["std"][rows][:, given] == 0)
    np.testing.assert_array_equal(adata.obsm["samples"][rows][:, :, given], np.repeat(expected[:, None], 3, 1))
    hinge = adata.uns["hinge"]
    assert hinge["given"] == str(half.resolve()) and hinge["n_genes_given"] == 4 and len(hinge["given_sha256"]) == 64
    assert 0.0 <= hinge["image_weight"] <= 1.0 and hinge["image_r_genes"] == 4  # the image weighed on this slide
    plain = tmp_path / "plain.h5ad"
    assert _generate(run, plain).exit_code == 0
    image_only = ad.read_h5ad(plain)
    unmatched = np.delete(np.arange(adata.n_obs), rows)
    np.testing.assert_array_equal(adata.X[unmatched], image_only.X[unmatched])  # spots absent from the file: image only
    assert not np.array_equal(adata.X[rows][:, ~given], image_only.X[rows][:, ~given])
    assert "given" not in image_only.var

    scored = runner.invoke(app, ["eval", "--pred", str(out), "--truth", str(measured), "--out", str(tmp_path / "eval"), "--no-maps"])
    assert scored.exit_code == 0, scored.output
    assert "4 given genes not scored" in scored.output
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "4 genes given to the model" in report and "given genes" in report
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["genes"]["n_evaluated"] == len(panel) - 4 and metrics["genes"]["given"] == panel[:4]
    assert not set(metrics["per_gene"]) & set(panel[:4]) and len(metrics["per_gene"]) == len(panel) - 4


def test_given_warnings_and_refusals(trained, tmp_path, caplog):
    run, measured = trained
    panel = load_checkpoint(run.checkpoint("best")).card.genes
    tiles = read_tiles(run.tiles("t0"))
    transform = Transform()
    renamed = _measured(measured, tmp_path / "renamed.h5ad", genes=panel[:3], rename={panel[0]: "FOREIGN1"})
    with caplog.at_level(logging.WARNING):
        given = read_given(GivenSource(renamed), tiles, panel, transform)
    assert given.genes == panel[1:3]
    assert any("not in the model's panel" in r.message and "FOREIGN1" in r.message for r in caplog.records)
    foreign = _measured(measured, tmp_path / "foreign.h5ad", genes=panel[:2], rename={g: f"X{g}" for g in panel[:2]})
    with pytest.raises(HingeError, match="no gene of .* is in the model's"):
        read_given(GivenSource(foreign), tiles, panel, transform)
    elsewhere = _measured(measured, tmp_path / "elsewhere.h5ad", barcodes=False)
    moved = ad.read_h5ad(elsewhere)
    moved.obsm["spatial"] = moved.obsm["spatial"] + 1e6
    moved.write_h5ad(elsewhere)
    with pytest.raises(HingeError, match="no spot of"):
        read_given(GivenSource(elsewhere), tiles, panel, transform)
    by_coordinates = _measured(measured, tmp_path / "coords.h5ad", barcodes=False)
    assert read_given(GivenSource(by_coordinates), tiles, panel, transform).alignment["matched_by"] == "coordinates"


def test_the_genes_only_ridge_completes_from_the_given_genes_alone(trained, tmp_path):
    run, measured = trained
    panel = load_checkpoint(run.checkpoint("best")).card.genes
    listed = tmp_path / "given.txt"
    listed.write_text("\n".join(panel[:4]) + "\n")
    half = _measured(measured, tmp_path / "half.h5ad", keep_spots=slice(0, None, 2))
    out, image = tmp_path / "t0.ridge.h5ad", tmp_path / "image.ridge.h5ad"
    result = _generate(run, out, "--given", str(half), "--given-genes", str(listed), "--model", "ridge")
    assert result.exit_code == 0, result.output
    assert _generate(run, image, "--model", "ridge").exit_code == 0
    adata, image_only = ad.read_h5ad(out), ad.read_h5ad(image)
    given = adata.var["given"].to_numpy(bool)
    assert list(adata.var_names[given]) == panel[:4] and adata.uns["hinge"]["ridge_inputs"].startswith("the given genes alone")
    rows = adata.obs_names.get_indexer(ad.read_h5ad(half).obs_names)
    others = np.delete(np.arange(adata.n_obs), rows)
    assert np.all(adata.layers["std"][rows][:, given] == 0) and np.all(adata.layers["std"][rows][:, ~given] > 0)
    np.testing.assert_array_equal(adata.X[others], image_only.X[others])  # spots the file leaves out: the image ridge
    # on the measured spots the rest of the panel is a linear function of the given genes alone
    inputs = np.column_stack([adata.X[rows][:, given], np.ones(len(rows))])
    target = adata.X[rows][:, ~given].astype(np.float64)
    residual = target - inputs @ np.linalg.lstsq(inputs, target, rcond=None)[0]
    assert np.abs(residual).max() < 1e-4 and not np.allclose(adata.X[rows][:, ~given], image_only.X[rows][:, ~given])


def test_eval_refuses_a_prediction_whose_every_gene_was_given(tmp_path):
    genes = ["A", "B"]
    pred = Prediction(tmp_path / "p.h5ad", "s", ["x", "y", "z"], genes, np.zeros((3, 2)), None, None, Transform(), given=genes)
    truth = Expression(["x", "y", "z"], genes, sparse.csr_matrix(np.ones((3, 2))), np.full(3, 2.0), None)
    with pytest.raises(HingeError, match="every gene"):
        align(pred, truth)


def test_benchmark_chooses_genes_and_imputes_from_the_nearest_training_spots():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "her2st"))
    import completion

    rng = np.random.default_rng(0)
    genes = [f"G{j}" for j in range(8)]
    targets = rng.normal(size=(300, 8)) * np.arange(1, 9)  # gene j has variance (j + 1)²
    assert completion.choose_genes(genes, targets, 3, "variable", 0) == ["G5", "G6", "G7"]
    picked = completion.choose_genes(genes, targets, 3, "random", 0)
    assert picked == completion.choose_genes(genes, targets, 3, "random", 0) and len(set(picked)) == 3
    neighbours = completion._knn(targets[:, :2], targets, targets[:5, :2], 1)
    np.testing.assert_array_equal(neighbours[:, 0], targets[:5])  # a training spot's nearest spot is itself


def test_completion_table_averages_seeds_within_a_fold_before_the_spread_over_folds():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "her2st"))
    import completion

    key = completion.COLUMNS[0][1]
    rows = [{"fold": f, "model_seed": s, "k": 10, "choice": "random", "method": "HINGE + given", key: v, **{
        k: 0.5 for _, k in completion.COLUMNS[1:]}} for f, s, v in
            [("C2", 0, 0.40), ("C2", 1, 0.44), ("C3", 0, 0.50), ("C3", 1, 0.54)]]
    line = completion.table(rows).splitlines()[-1]
    # fold means 0.42 and 0.52: mean 0.470, std 0.071; seed means 0.45 and 0.49: spread 0.020
    assert line.startswith("| 10 | random | HINGE + given | 0.470 ± 0.071 (seeds ±0.020) |"), line
