"""Training state that no longer matches its inputs (issue 35): a damaged file hinge wrote, or a changed gene panel.

Every file a stage consumes is truncated to half its size, or overwritten with as many random bytes, in a copy of
a trained run; the stage must stop with one line (exit 2, no traceback) that names the file and says what to do.
A panel changed under a trained run (genes.txt edited, or the warm-up redone on another panel) must be refused by
train, calibrate and generate before they write anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from stand_in import trained_tiny
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import GenerateConfig
from hinge_cli.run.directory import Run
from hinge_cli.stages.generate import Target, generate

pytestmark = pytest.mark.slow  # trains a model, then damages each file

runner = CliRunner()
TRAIN_MORE = ("train", "--epochs", "3", "--device", "cpu")
GENERATE = ("generate", "--sample-id", "t1", "--n-samples", "2", "--device", "cpu", "--overwrite")
# (file in the run, the command that consumes it)
CONSUMERS = [
    ("checkpoints/last.state.safetensors", TRAIN_MORE),
    ("checkpoints/last.state.json", TRAIN_MORE),
    ("checkpoints/last.safetensors", TRAIN_MORE),
    ("checkpoints/last.json", TRAIN_MORE),
    ("checkpoints/warmup.safetensors", ("train", "--epochs", "1", "--device", "cpu", "--overwrite")),
    ("checkpoints/warmup.json", ("train", "--epochs", "1", "--device", "cpu", "--overwrite")),
    ("checkpoints/best.safetensors", GENERATE),
    ("checkpoints/best.json", GENERATE),
    ("checkpoints/selected.safetensors", ("calibrate",)),
    ("checkpoints/ridge.safetensors", (*GENERATE, "--model", "ridge")),
    ("tiles/t1.h5", GENERATE),
    ("embeddings/default/t1.h5", GENERATE),
    ("manifest.json", GENERATE),
    ("hinge.yaml", GENERATE),
    ("genes.txt", GENERATE),
    ("predictions/t1.h5ad", ("eval", "--pred", "{run}/predictions/t1.h5ad", "--truth", "{truth}", "--no-maps")),
    ("predictions/t1.h5ad", ("view", "{run}/predictions/t1.h5ad")),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A briefly trained tiny run on two synthetic samples (stand-in features), and t1 predicted."""
    run, _ = trained_tiny(tmp_path_factory.mktemp("damaged"))
    generate(run, [Target("t1")], GenerateConfig(n_samples=2, device="cpu"))
    return run


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    else:
        path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())


def invoke(run: Path, *args: str) -> object:
    """The command on the run at `run` ({run} and {truth} in its arguments: that run, and t1's measured counts)."""
    truth = Run(run).sample("t1")["expression"]["path"] if "{truth}" in args else None
    args = tuple(a.format(run=run, truth=truth) for a in args)
    return runner.invoke(app, [args[0], *([] if args[0] == "view" else ["--run", str(run)]), *args[1:]])


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize(("name", "command"), CONSUMERS, ids=[f"{name}-{command[0]}" for name, command in CONSUMERS])
def test_a_damaged_file_is_one_line_that_names_it(trained: Run, tmp_path: Path, name: str, command: tuple[str, ...], how: str) -> None:
    run = Path(shutil.copytree(trained.root, tmp_path / "run"))
    damage(run / name, how)
    result = invoke(run, *command)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and Path(name).name in result.output, result.output


def fingerprints(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}


def test_a_hand_edited_panel_is_refused_by_train_calibrate_and_generate_before_they_write(trained: Run, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained.root, tmp_path / "run"))
    listed = run / "genes.txt"
    original = listed.read_text()
    listed.write_text("".join(g + "\n" for g in original.split()[:-2]))
    before = fingerprints(run)
    for command in (TRAIN_MORE, ("calibrate",), GENERATE):
        result = invoke(run, *command)
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert "was trained on another gene panel than" in result.output and "genes.txt" in result.output, result.output
    assert fingerprints(run) == before  # no ridge, calibration or coupling written before the refusal
    listed.write_text(original)
    assert invoke(run, *GENERATE).exit_code == 0


def test_a_second_warmup_on_another_panel_holds_train_and_generate_until_training_again(trained: Run, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained.root, tmp_path / "run"))
    warmup = ("pretrain-warmup", "--n-genes", "9", "--device", "cpu")
    refused = invoke(run, *warmup)
    assert refused.exit_code == 2 and "warmup.safetensors exists" in refused.output
    assert invoke(run, *warmup, "--overwrite").exit_code == 0
    assert len((run / "genes.txt").read_text().split()) == 9
    for command, stale in ((TRAIN_MORE, "last.safetensors"), (GENERATE, "best.safetensors")):
        result = invoke(run, *command)
        assert result.exit_code == 2 and f"{stale} was trained on another gene panel" in result.output, result.output
    assert invoke(run, "train", "--epochs", "1", "--device", "cpu", "--overwrite").exit_code == 0
    result = invoke(run, *GENERATE)
    assert result.exit_code == 0, result.output
