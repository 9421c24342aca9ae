"""A full disk under every writing stage (issue 31): one line that says the disk is full and where, exit 2, never a
traceback or a crash (an HDF5 write that failed used to end the process with SIGSEGV, exit 139).

A real full file system, not a monkeypatch: a small tmpfs is mounted, a trained tiny run copied onto it, and the
rest of it filled, so that each stage's first write that needs more than FREE bytes fails as it would on a
cluster's scratch disk. Mounting needs root; elsewhere the tests skip and say so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from stand_in import trained_tiny
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import GenerateConfig
from hinge_cli.run.directory import Run
from hinge_cli.stages.generate import Target, generate
from hinge_cli.synthetic.slides import make_synthetic_sample

pytestmark = pytest.mark.slow

runner = CliRunner()
FREE = (8 * 1024, 40 * 1024, 160 * 1024)  # bytes left on the disk before the stage runs: each stage fails at another write
DISK = "64m"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """A trained tiny run with t1 predicted, and a new synthetic slide (with spots) that no stage has seen."""
    root = tmp_path_factory.mktemp("full")
    run, _ = trained_tiny(root)
    generate(run, [Target("t1")], GenerateConfig(n_samples=2, device="cpu"))
    new = make_synthetic_sample(root / "data", "t9", size_px=384, mpp=2.0, seed=29, n_genes=40)
    return run, new.slide


@pytest.fixture
def disk(tmp_path: Path):
    """A 64 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}): the full-disk tests need root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, left: int) -> None:
    """Fill the disk but `left` bytes."""
    free = shutil.disk_usage(mount).free
    (mount / "filler").write_bytes(b"\0" * max(0, free - left))


# (name, command after --run RUN; {slide}, {spots} and {pred} are filled in)
STAGES = [
    ("tile", ("tile", "{slide}", "--spots", "{spots}", "--sample-id", "t9")),
    ("embed", ("embed", "--device", "cpu")),
    ("pretrain-warmup", ("pretrain-warmup", "--n-genes", "12", "--device", "cpu", "--overwrite")),
    ("train", ("train", "--epochs", "1", "--device", "cpu", "--overwrite")),
    ("generate", ("generate", "--sample-id", "t1", "--n-samples", "2", "--device", "cpu", "--overwrite")),
    ("eval", ("eval", "--pred", "{pred}", "--truth", "{spots1}")),
]


@pytest.mark.parametrize("left", FREE)
@pytest.mark.parametrize(("stage", "command"), STAGES, ids=[s for s, _ in STAGES])
def test_a_full_disk_is_one_line_that_says_so_and_where(made: tuple[Run, Path], disk: Path, stage: str, command: tuple[str, ...],
                                                        left: int) -> None:
    run, slide = made
    copy = Path(shutil.copytree(run.root, disk / "run"))
    spots = slide.with_suffix(".h5ad")
    if stage == "embed":  # a tiled sample with no features yet
        assert runner.invoke(app, ["tile", str(slide), "--spots", str(spots), "--sample-id", "t9", "--run", str(copy)]).exit_code == 0
    fill(disk, left)
    values = {"slide": slide, "spots": spots, "pred": copy / "predictions" / "t1.h5ad",
              "spots1": Run(copy).sample("t1")["expression"]["path"]}
    args = [a.format(**values) for a in command]
    result = runner.invoke(app, [args[0], "--run", str(copy), *args[1:]])
    if result.exit_code == 0 and left > min(FREE):
        return  # the stage needed less than that: it finished
    assert result.exit_code == 2, (result.output, result.exception)
    assert "no space left on the device at " + str(disk) in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize(("stage", "command"), [s for s in STAGES if s[0] != "generate"], ids=[s for s, _ in STAGES if s != "generate"])
def test_a_read_only_run_is_one_line_that_says_so(made: tuple[Run, Path], disk: Path, stage: str, command: tuple[str, ...]) -> None:
    """The same writers on a file system remounted read-only (`generate` instead predicts elsewhere: test_generate.py)."""
    run, slide = made
    copy = Path(shutil.copytree(run.root, disk / "run"))
    spots = slide.with_suffix(".h5ad")
    if stage == "embed":
        assert runner.invoke(app, ["tile", str(slide), "--spots", str(spots), "--sample-id", "t9", "--run", str(copy)]).exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    values = {"slide": slide, "spots": spots, "pred": copy / "predictions" / "t1.h5ad",
              "spots1": Run(copy).sample("t1")["expression"]["path"]}
    args = [a.format(**values) for a in command]
    result = runner.invoke(app, [args[0], "--run", str(copy), *args[1:]])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "the file system is read-only at " + str(disk) in result.output and "Traceback" not in result.output, result.output
