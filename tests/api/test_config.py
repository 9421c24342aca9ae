"""Config resolution: preset < the run's hinge.yaml < flags, with typed validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hinge_cli.config import load_config
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run


def test_presets_differ_and_flags_win() -> None:
    tiny, default = load_config("tiny"), load_config("default")
    assert tiny.model.d_model < default.model.d_model and tiny.preset == "tiny"
    assert load_config("tiny", overrides={"tile": {"patch_px": 32, "grid": None}}).tile.patch_px == 32


def test_run_yaml_sits_between_preset_and_flags(tmp_path: Path) -> None:
    run = Run(tmp_path)
    assert run.config("tiny").tile.patch_px == 64
    data = yaml.safe_load(run.config_path.read_text())
    data["tile"]["patch_px"] = 96  # a user's edit of hinge.yaml
    run.config_path.write_text(yaml.safe_dump(data))
    assert run.config().tile.patch_px == 96  # no preset named: the run's own
    assert run.config("tiny").tile.patch_px == 96  # same preset: the edit stays
    assert run.config("tiny", {"tile": {"patch_px": 128}}).tile.patch_px == 128
    assert run.config().tile.patch_px == 128  # flags are recorded for later commands
    assert run.config("small").preset == "small"  # another preset starts from it
    assert run.config().model.d_model == load_config("small").model.d_model


def test_typos_and_wrong_types_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tile:\n  patch_pix: 10\n")
    with pytest.raises(HingeError, match="unknown config key 'tile.patch_pix'"):
        load_config(bad)
    bad.write_text("train:\n  epochs: many\n")
    with pytest.raises(HingeError, match="train.epochs"):
        load_config(bad)
    with pytest.raises(HingeError, match="unknown config preset"):
        load_config("huge")
    with pytest.raises(HingeError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_unset_flags_never_replace_values() -> None:
    cfg = load_config("tiny", overrides={"embed": {"encoder": None, "batch_size": 8}, "tile": {"tissue": {"threshold": None}}})
    assert cfg.embed.encoder == "default" and cfg.embed.batch_size == 8 and cfg.tile.tissue.threshold is None


def test_later_commands_keep_the_runs_preset(tmp_path: Path, synth) -> None:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    runner = CliRunner()
    run_dir = str(tmp_path / "run")
    assert runner.invoke(app, ["tile", str(synth.slide), "--run", run_dir, "--config", "tiny", "--no-images", "-q"]).exit_code == 0
    assert runner.invoke(app, ["embed", "--run", run_dir, "--device", "cpu", "-q"]).exit_code == 0
    assert Run(run_dir).config().preset == "tiny"


def test_a_failed_command_does_not_record_its_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    run = Run(tmp_path / "run")
    run.config("tiny")
    before = run.config_path.read_text()
    result = CliRunner().invoke(app, ["train", "--run", str(run.root), "--epochs", "7", "-q"])
    assert result.exit_code == 2 and "warmup" in result.output  # nothing to train from
    assert run.config_path.read_text() == before
    assert run.config().train.epochs != 7


def test_list_values_and_an_old_runs_keys(tmp_path: Path) -> None:
    cfg = load_config("tiny", overrides={"warmup": {"holdout": ["s1", "s2"]}})
    assert cfg.warmup.holdout == ["s1", "s2"] and cfg.warmup.epochs == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("warmup:\n  holdout: s1\n")
    with pytest.raises(HingeError, match="warmup.holdout .* should be a list"):
        load_config(bad)
    old = tmp_path / "hinge.yaml"  # written before the warm-up had its own section
    old.write_text("preset: tiny\ntrain:\n  warmup_epochs: 7\n  warmup_mask_ratio: 0.3\n")
    cfg = load_config(None, old)
    assert (cfg.warmup.epochs, cfg.warmup.mask_ratio) == (7, 0.3)
