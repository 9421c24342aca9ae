"""Every numeric setting is checked where configs are made: flags, YAML and the API fail at once, with one line."""

from __future__ import annotations

import dataclasses
import errno
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hinge_cli import config as config_mod
from hinge_cli.cli.app import app
from hinge_cli.config import HingeConfig, load_config
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run, Shard

runner = CliRunner()
BAD = {config_mod.POSITIVE: [0, -1.0, math.nan, math.inf], config_mod.NON_NEGATIVE: [-1, math.nan],
       config_mod.AT_LEAST_1: [0, -5], config_mod.FRACTION: [-0.1, 1.5], config_mod.OPEN_FRACTION: [0, 1],
       config_mod.FINITE: [math.nan]}


def _checked_fields(cls: type, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], str, object]]:
    out = []
    for fld in dataclasses.fields(cls):
        hint = config_mod.typing.get_type_hints(cls)[fld.name]
        if dataclasses.is_dataclass(hint):
            out += _checked_fields(hint, (*path, fld.name))
        elif "rule" in fld.metadata:
            is_int = int in (hint, *config_mod.typing.get_args(hint))
            bad = [int(v) if is_int else float(v) for v in BAD[fld.metadata["rule"]] if not is_int or float(v).is_integer()]
            out += [(path, fld.name, v) for v in bad]
    return out


CASES = _checked_fields(HingeConfig, ())


def _numeric_fields(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, bool]]:
    """(section path, name, has a rule) of every int or float setting of the config."""
    out = []
    for fld in dataclasses.fields(cls):
        hint = config_mod.typing.get_type_hints(cls)[fld.name]
        if dataclasses.is_dataclass(hint):
            out += _numeric_fields(hint, (*path, fld.name))
        elif {int, float} & {hint, *config_mod.typing.get_args(hint)}:
            out.append((path, fld.name, "rule" in fld.metadata))
    return out


def test_every_numeric_setting_has_a_rule() -> None:
    fields = _numeric_fields(HingeConfig)
    assert len(fields) >= 40 and [f"{'.'.join(p)}.{n}" for p, n, ruled in fields if not ruled] == []


@pytest.mark.parametrize(("path", "name", "value"), CASES, ids=[f"{'.'.join(p)}.{n}={v}" for p, n, v in CASES])
def test_a_bad_value_is_refused_when_the_config_is_made(path: tuple[str, ...], name: str, value: object) -> None:
    override: dict = {name: value}
    for key in reversed(path):
        override = {key: override}
    with pytest.raises(HingeError, match=f"{name} = .* must"):
        load_config("tiny", overrides=override)


def test_an_unknown_feature_norm_names_the_choices() -> None:
    with pytest.raises(HingeError, match="--feature-norm pixel is not one of slide, training"):
        load_config("tiny", overrides={"warmup": {"feature_norm": "pixel"}})


FLAGS = [
    (["tile", "SLIDE"], "--target-mpp", "0"), (["tile", "SLIDE"], "--patch-px", "0"), (["tile", "SLIDE"], "--pitch-um", "0"),
    (["tile", "SLIDE"], "--spot-um", "-55"), (["tile", "SLIDE"], "--min-tissue", "2"), (["tile", "SLIDE"], "--workers", "0"),
    (["tile", "SLIDE"], "--tissue-threshold", "1.5"), (["embed"], "--batch-size", "0"), (["embed"], "--views", "0"),
    (["embed"], "--workers", "0"), (["pretrain-warmup"], "--n-genes", "-5"), (["pretrain-warmup"], "--val-fraction", "0"),
    (["pretrain-warmup"], "--val-fraction", "1"), (["pretrain-warmup"], "--warmup-epochs", "-1"),
    (["pretrain-warmup"], "--warmup-mask-ratio", "2"), (["pretrain-warmup"], "--batch-size", "0"),
    (["pretrain-warmup"], "--lr", "nan"), (["train"], "--epochs", "0"), (["train"], "--batch-size", "0"),
    (["train"], "--lr", "nan"), (["train"], "--lr", "inf"), (["train"], "--lr", "0"), (["train"], "--patience", "0"),
    (["generate", "--slide", "SLIDE"], "--samples", "0"), (["generate", "--slide", "SLIDE"], "--steps", "0"),
    (["generate", "--slide", "SLIDE"], "--batch-size", "0"),
]


@pytest.mark.parametrize(("command", "flag", "value"), FLAGS, ids=[f"{c[0]} {f} {v}" for c, f, v in FLAGS])
def test_a_bad_flag_fails_before_any_work(tmp_path: Path, command: list[str], flag: str, value: str) -> None:
    slide = tmp_path / "slide.svs"
    slide.write_bytes(b"not read: the flag fails first")
    run = tmp_path / "run"
    args = [str(slide) if a == "SLIDE" else a for a in command] + [flag, value, "--run", str(run), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "must" in result.output and "Traceback" not in result.output
    assert not (run / "hinge.yaml").exists() and not (run / "tiles").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_errors_a_user_can_fix_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    import hinge_cli.stages.tile

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, errno.errorcode[code], str(tmp_path / "run" / "tiles" / "s.h5"))

    monkeypatch.setattr(hinge_cli.stages.tile, "tile_samples", fail)
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"x")
    result = runner.invoke(app, ["tile", str(slide), "--run", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "s.h5" in lines[0]
    assert {errno.ENOSPC: "free disk space", errno.EROFS: "writable", errno.EACCES: "permissions"}[code] in lines[0]


def test_slurm_variables_that_are_not_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "abc")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    with pytest.raises(HingeError, match="SLURM_ARRAY_TASK_ID='abc'"):
        Shard.parse(None)


@pytest.mark.parametrize("sample", ["../escape", "a/b", ".hidden", "x..y", ""])
def test_sample_ids_cannot_leave_the_run(tmp_path: Path, sample: str) -> None:
    with pytest.raises(HingeError, match="cannot name a file"):
        Run(tmp_path).tiles(sample)
    assert Run(tmp_path).tiles("TENX95_rep-1.a").name == "TENX95_rep-1.a.h5"


def test_damaged_slides_say_corrupt_or_truncated(tmp_path: Path) -> None:
    import openslide

    from hinge_cli.slide.reader import OpenSlideSlide, open_slide

    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(HingeError, match="corrupt or truncated") as info:
        open_slide(truncated)
    assert "re-download" in str(info.value) and "tiled TIFF" not in str(info.value)

    class CorruptJpeg:
        level_dimensions, level_downsamples, properties = [(64, 64)], [1.0], {"openslide.mpp-x": "0.5"}

        def read_region(self, *args: object) -> None:
            raise openslide.OpenSlideError("Corrupt JPEG data: 12 extraneous bytes before marker 0xd9")

    with pytest.raises(HingeError, match="corrupt or truncated .*Corrupt JPEG"):
        OpenSlideSlide(truncated, CorruptJpeg(), None).read(0, 0, 0, 8, 8)


def test_spot_and_expression_files_that_cannot_work(tmp_path: Path) -> None:
    import anndata as ad
    import numpy as np

    from hinge_cli.data.expression import read_expression
    from hinge_cli.slide.tiling import read_spots

    one_column = ad.AnnData(np.ones((3, 2), np.float32), obsm={"spatial": np.zeros((3, 1))})
    one_column.write_h5ad(tmp_path / "one.h5ad")
    with pytest.raises(HingeError, match=r"shape \(3, 1\)"):
        read_spots(tmp_path / "one.h5ad")
    ad.AnnData(np.zeros((0, 2), np.float32)).write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(HingeError, match="empty"):
        read_expression(tmp_path / "empty.h5ad")
    twice = ad.AnnData(np.ones((2, 3), np.float32))
    twice.var_names = ["A", "B", "A"]
    twice.write_h5ad(tmp_path / "twice.h5ad")
    assert read_expression(tmp_path / "twice.h5ad").genes == ["A", "B", "A-1"]


def test_a_sidecar_without_its_hash_is_refused(tmp_path: Path) -> None:
    import json

    from hinge_cli.model.card import FORMAT, read_card

    (tmp_path / "m.json").write_text(json.dumps({"format": FORMAT, "architecture": {}}))
    with pytest.raises(HingeError, match="no sha256"):
        read_card(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({"format": FORMAT, "sha256": "ab"}))
    with pytest.raises(HingeError, match="incomplete or malformed"):
        read_card(tmp_path / "m.json")


def test_a_relative_config_path_is_recorded_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.yaml").write_text("train:\n  epochs: 3\n")
    monkeypatch.chdir(tmp_path)
    run = Run(tmp_path / "run")
    run.config("mine.yaml")
    monkeypatch.chdir(tmp_path / "run")  # a later stage, started elsewhere
    cfg = Run(tmp_path / "run").config()
    assert cfg.preset == str(tmp_path / "mine.yaml") and cfg.train.epochs == 3


def test_a_legacy_non_zip_state_dict_loads(tmp_path: Path) -> None:
    import torch

    from hinge_cli.encoders.weights import read_state_dict

    torch.save({"w": torch.arange(3.0)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "old.pth")["w"], torch.arange(3.0))


def test_samples_with_no_shared_gene_names_are_told_so() -> None:
    import numpy as np
    from scipy import sparse

    from hinge_cli.data.expression import Expression, Transform
    from hinge_cli.data.panel import select_panel

    def sample(genes: list[str]) -> Expression:
        return Expression(["a", "b"], genes, sparse.csr_matrix(np.ones((2, len(genes)), np.float32)), np.full(2, 2.0), None)

    with pytest.raises(HingeError, match="share no gene names .*ENSG0001.*ERBB2") as info:
        select_panel([sample(["ENSG0001", "ENSG0002"]), sample(["ERBB2", "ESR1"])], 1, "hvg", Transform())
    assert "fewer genes" not in str(info.value)


def test_a_sample_naming_genes_in_another_namespace_is_told_so_not_to_fill_zeros() -> None:
    from scipy import sparse

    from hinge_cli.data.expression import Expression

    ensembl = Expression(["a", "b"], ["ENSG00000141510", "ENSG00000146648", "ENSG00000012048"], sparse.csr_matrix(np.ones((2, 3))),
                         np.full(2, 3.0), None)
    with pytest.raises(HingeError, match="names its genes as Ensembl ids .* where the panel has symbols") as caught:
        ensembl.columns(["TP53", "EGFR"])
    assert "--fill-missing zero would leave this sample with no expression" in str(caught.value)
    with pytest.raises(HingeError, match="pass --fill-missing zero"):  # symbols missing from symbols: the plain advice
        Expression(["a"], ["TP53"], sparse.csr_matrix(np.ones((1, 1))), np.ones(1), None).columns(["TP53", "EGFR"])


def test_a_run_keeps_its_settings_when_the_config_file_it_started_from_is_gone(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("train:\n  epochs: 3\nmodel:\n  d_model: 64\n")
    first = Run(tmp_path / "run").config(str(tmp_path / "mine.yaml"))
    (tmp_path / "mine.yaml").unlink()
    cfg = Run(tmp_path / "run").config()  # no --config: the run's hinge.yaml is enough
    assert cfg == first and cfg.train.epochs == 3 and cfg.model.d_model == 64


def test_a_rerun_that_skipped_everything_still_records_a_missing_hinge_yaml(tmp_path: Path, synth) -> None:
    from hinge_cli import api

    run = Run(tmp_path / "run")
    api.tile([synth.slide], spots=synth.spots, run=run.root, config="tiny", settings={"tile": {"images": False}})
    run.config_path.unlink()  # as a kill just before hinge.yaml was renamed into place leaves it
    again = api.tile([synth.slide], spots=synth.spots, run=run.root, config="tiny", settings={"tile": {"images": False}})
    assert not again.done and run.config_path.exists() and Run(run.root).config().tile.patch_px == load_config("tiny").tile.patch_px


@pytest.mark.parametrize(("text", "says"), [(b"train: 5\n", "config section 'train' must be a mapping, not int"),
                                            (b"train:\n  epochs: 3\n\xff\xfe\n", "is not valid YAML (UnicodeDecodeError)")])
def test_a_config_file_that_cannot_be_a_config_is_one_line(tmp_path: Path, text: bytes, says: str) -> None:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    (tmp_path / "bad.yaml").write_bytes(text)
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "bad.yaml"), "--run", str(tmp_path / "run")])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output
