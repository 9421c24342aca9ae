"""The command line: every flag a stage used is recorded in hinge.yaml, and help shows the config's own defaults."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pytest
import yaml
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import TileConfig
from hinge_cli.synthetic.slides import make_synthetic_sample

runner = CliRunner()


def ok(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def test_help_shows_the_config_dataclass_default() -> None:
    result = runner.invoke(app, ["tile", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    assert f"(default: {TileConfig().target_mpp}; must be a finite number above 0)" in " ".join(result.output.split())


@pytest.mark.slow
def test_stage_flags_are_recorded_with_resolved_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    samples = [make_synthetic_sample(tmp_path / "data", f"t{i}", size_px=384, mpp=2.0, seed=20 + i, n_genes=40) for i in range(2)]
    for s in samples:
        ok(["tile", str(s.slide), "--spots", str(s.spots), "--run", str(run), "--config", "tiny", "--no-images", "-q"])
    ok(["embed", "--run", str(run), "--device", "cpu", "-q"])
    monkeypatch.chdir(tmp_path)
    Path("panel.txt").write_text("".join(g + "\n" for g in ad.read_h5ad(samples[0].spots).var_names[:12]))
    ok(["pretrain-warmup", "--run", str(run), "--warmup-epochs", "3", "--genes", "panel.txt", "--seed", "5", "-q"])
    recorded = yaml.safe_load((run / "hinge.yaml").read_text())
    assert recorded["warmup"]["epochs"] == 3 and recorded["train"]["seed"] == 5
    assert recorded["warmup"]["genes"] == str((tmp_path / "panel.txt").resolve())
    ok(["generate", "--run", str(run), "--sample-id", "t0", "--checkpoint", str(run / "checkpoints" / "warmup.safetensors"),
        "--n-samples", "3", "--steps", "2", "--device", "cpu", "-q"])
    recorded = yaml.safe_load((run / "hinge.yaml").read_text())
    assert (recorded["generate"]["n_samples"], recorded["generate"]["steps"]) == (3, 2)

    # generate --keep-going: a sample that fails is recorded and summarised, the others are done, exit 3
    result = runner.invoke(app, ["generate", "--run", str(run), "--sample-id", "t0,t1,nope", "--keep-going", "--steps", "1",
                                 "--checkpoint", str(run / "checkpoints" / "warmup.safetensors"), "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "1 done, 1 skipped (already done), 1 failed" in result.output and "failed nope: sample nope is not tiled" in result.output
    assert (run / "predictions" / "t1.h5ad").exists()


def test_a_re_run_that_did_nothing_records_nothing(tmp_path: Path, synth) -> None:
    run = tmp_path / "run"
    ok(["tile", str(synth.slide), "--run", str(run), "--config", "tiny", "--no-images", "-q"])
    before = (run / "hinge.yaml").read_text()
    ok(["tile", str(synth.slide), "--run", str(run), "--patch-px", "96", "--no-images", "-q"])  # already tiled: skipped
    assert (run / "hinge.yaml").read_text() == before  # later stages must not think the tiles are 96 px
