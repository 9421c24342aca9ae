"""Each command of the pipeline killed at every atomic write, then typed again as it was (no --overwrite): the run ends
as an uninterrupted run of that command left it, whole: outputs, manifest, hinge.yaml, logs and no leftovers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kills import differences, folder_record, kill_every_write
from stand_in import tiled_synthetic, trained_tiny, write_features
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import GenerateConfig
from hinge_cli.run.directory import Run
from hinge_cli.stages.generate import Target, generate
from hinge_cli.stages.train import pretrain_warmup
from hinge_cli.synthetic.slides import make_synthetic_sample

pytestmark = pytest.mark.slow


def _hinge(argv: list[str]) -> None:
    """One command as a user types it; a kill goes through (it is no Exception), a failure is the test's."""
    result = CliRunner().invoke(app, [*argv, "-q"])
    assert result.exit_code == 0, result.output


def _same_as_uninterrupted(base: Path, root: Path, argv) -> None:
    for n, killed, ref in kill_every_write(base, root, lambda folder: _hinge(argv(folder))):
        changed = differences(folder_record(killed), folder_record(ref))
        assert not changed, f"killed at write {n}: " + "; ".join(changed[:5])


def test_tile_of_two_slides(tmp_path: Path) -> None:
    """The audit's case: killed before hinge.yaml landed, the re-run skipped both slides and never wrote it."""
    rows = ["sample_id,slide"]
    for i in range(2):
        s = make_synthetic_sample(tmp_path / "data", f"s{i}", size_px=256, mpp=2.0, seed=40 + i, n_genes=20)
        rows.append(f"{s.sample_id},{s.slide}")
    table = tmp_path / "data" / "samples.csv"
    table.write_text("\n".join(rows) + "\n")
    (tmp_path / "base").mkdir()
    _same_as_uninterrupted(tmp_path / "base", tmp_path, lambda folder: [
        "tile", "--samples", str(table), "--run", str(folder / "run"), "--config", "tiny", "--pitch-um", "60"])


@pytest.fixture(scope="module")
def warmup_ready(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiled samples with stand-in features and the tiny config recorded: what `pretrain-warmup` starts from."""
    run, samples = tiled_synthetic(tmp_path_factory.mktemp("warmup"), "w", 2, 40, size_px=384, mpp=2.0, n_genes=40)
    for i, s in enumerate(samples):
        write_features(run, s.sample_id, i)
    return run.root


def test_pretrain_warmup(warmup_ready: Path, tmp_path: Path) -> None:
    """The audit's case: killed after the warm-up landed but before its record, the re-run refused ("pass --overwrite")."""
    _same_as_uninterrupted(warmup_ready, tmp_path, lambda run: [
        "pretrain-warmup", "--run", str(run), "--n-genes", "12", "--warmup-epochs", "1", "--val-fraction", "0.2"])


def test_train(warmup_ready: Path, tmp_path: Path) -> None:
    """The audit's case: killed after the last epoch's commit but before its log line, the log kept one record of two."""
    run = Run(tmp_path / "warm")
    shutil.copytree(warmup_ready, run.root)
    cfg = run.config()
    cfg.warmup.n_genes, cfg.warmup.epochs, cfg.warmup.val_fraction = 12, 1, 0.2
    pretrain_warmup(run, cfg)
    _same_as_uninterrupted(run.root, tmp_path, lambda folder: ["train", "--run", str(folder), "--epochs", "2"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    root = tmp_path_factory.mktemp("trained")
    run, _ = trained_tiny(root, pitch_um=150.0)
    return run, make_synthetic_sample(root / "data", "new", size_px=256, mpp=2.0, seed=30, n_genes=40).slide


def test_generate_of_a_new_slide(trained: tuple[Run, Path], tmp_path: Path) -> None:
    """The audit's case: the re-run reused tiles and features that were never recorded, and the manifest kept "running"."""
    run, slide = trained
    _same_as_uninterrupted(run.root, tmp_path, lambda folder: [
        "generate", str(slide), "--sample-id", "fresh", "--run", str(folder), "--n-samples", "1", "--steps", "2",
        "--device", "cpu"])


def test_eval_of_two_slides(trained: tuple[Run, Path], tmp_path: Path) -> None:
    """The audit's case: killed before report.md landed, the re-run refused ("results already exist")."""
    run, _ = trained
    predicted = Run(tmp_path / "predicted")
    shutil.copytree(run.root, predicted.root)
    generate(predicted, [Target("t0"), Target("t1")], GenerateConfig(n_samples=2, steps=2, device="cpu"))
    truths = [predicted.sample(s)["expression"]["path"] for s in ("t0", "t1")]

    def argv(folder: Path) -> list[str]:
        preds = [str(Run(folder).prediction(s)) for s in ("t0", "t1")]
        return ["eval", "--pred", preds[0], "--pred", preds[1], "--truth", truths[0], "--truth", truths[1],
                "--out", str(folder / "scored"), "--no-maps"]

    _same_as_uninterrupted(predicted.root, tmp_path, argv)
