"""The README's quick start runs as written, on synthetic stand-ins for every file it names.

Each tiling command is one shape of data, so each gets its own working folder and run; the features-you-have pair
runs together; then one run is tiled from a sheet of three sections and the embed, train, generate, eval and view
commands follow in the README's order. Each run's hinge.yaml is the tiny preset with 3 training epochs and a 30-gene panel, so the
commands run as typed and in seconds (30 genes: the stand-ins have 40).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.encoders.registry import get_spec
from hinge_cli.run.directory import Run
from hinge_cli.synthetic.fixtures import make_hest_folder, make_spaceranger_outs, make_trident_features, make_visium_hd_section
from hinge_cli.synthetic.slides import make_synthetic_sample

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> list[list[str]]:
    """The `hinge` commands of the README's quick start, in order, as argument lists (comments dropped)."""
    text = README.read_text()
    start = text.index("## Quick start")
    section = text[start:text.index("\n## ", start + 1)]
    return [shlex.split(line.split(" #")[0])[1:] for block in re.findall(r"```bash\n(.*?)```", section, re.S)
            for line in block.splitlines() if line.startswith("hinge ")]


def stand_ins(data: Path) -> None:
    """Every file the quick start names, made synthetically under `data`."""
    for name, stem in (("slide", "slide"), ("new", "new")):
        made = make_synthetic_sample(data, stem, size_px=384, mpp=2.0, seed=5 if name == "new" else 4, n_genes=40)
        made.slide.rename(data / f"{name}.svs")  # a tiled pyramidal TIFF, which OpenSlide opens whatever its name
        if name == "slide":
            made.spots.rename(data / "st.h5ad")
        else:
            made.spots.unlink()  # a new slide comes without spots (and its name is the prediction's)
    rows = ["sample_id,slide,spots"]
    for i, section in enumerate(("C2", "C3", "C4")):
        made = make_synthetic_sample(data / "sections", section, size_px=384, mpp=2.0, seed=10 + i, n_genes=40)
        rows.append(f"{section},{made.slide},{made.spots}")
        if section == "C2":
            shutil.copy(made.spots, data / "C2_st.h5ad")
    (data / "sheet.csv").write_text("\n".join(rows) + "\n")
    make_spaceranger_outs(data / "sample1" / "outs", fullres=data / "sample1" / "fullres.tif")
    make_spaceranger_outs(data / "outs", seed=1)
    for name, seed in (("hd1", 20), ("hd2", 21)):  # HD sections whose genes are the stand-ins' (one synthetic biology)
        make_visium_hd_section(data / name / "outs", size_px=1024, fullres=data / name / "fullres.tif", n_genes=40, seed=seed,
                               sizes=(8, 16))
    hest = make_hest_folder(data / "hest_data", side_px=1536)  # tissue large enough for its spots at 0.5 µm/px
    (data / "trident_features").mkdir()
    for sample in hest.ids:
        make_trident_features(data / "trident_features" / f"{sample}.h5", hest.root / "st" / f"{sample}.h5ad",
                              hest.mpps[sample], dim=get_spec("uni").dim)


def workplace(data: Path, folder: Path) -> Path:
    """A working folder that sees the stand-ins by their names, with a run whose settings are tiny and quick."""
    folder.mkdir()
    for item in data.iterdir():
        (folder / item.name).symlink_to(item)
    cfg = Run(folder / "runs" / "cohort").config("tiny", {"train": {"epochs": 3}, "warmup": {"n_genes": 30}})
    assert cfg.train.epochs == 3 and cfg.warmup.n_genes == 30  # the stand-ins have 40 genes
    return folder


def test_the_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = quick_start()
    assert [c[0] for c in commands] == ["tile"] * 6 + ["embed"] * 2 + ["pretrain-warmup", "train"] + ["generate"] * 4 + \
        ["eval", "generate", "eval", "view"], "the quick start changed: say here how its commands group"
    tiling, imported, (embed, warmup, train), predict = commands[:6], commands[6], commands[7:10], commands[10:]
    data = tmp_path / "data"
    data.mkdir()
    stand_ins(data)

    def hinge(folder: Path, argv: list[str]) -> None:
        monkeypatch.chdir(folder)
        result = CliRunner().invoke(app, [*argv, "-q"], env={"HINGE_RUN": "runs/cohort"})  # the quick start's export
        assert result.exit_code == 0, f"hinge {shlex.join(argv)}: {result.output}"

    for i, argv in enumerate((tiling[0], tiling[2], tiling[3], tiling[4])):  # a slide with spots; Visium; Visium HD; HEST
        hinge(workplace(data, tmp_path / f"shape{i}"), argv)
    have = workplace(data, tmp_path / "features")
    for argv in (tiling[5], imported):  # features you already have: tiled without pixels, then imported
        hinge(have, argv)
    cohort = workplace(data, tmp_path / "cohort")
    for argv in (tiling[1], embed, warmup, train, *predict):  # a sheet of sections, then the rest in order
        hinge(cohort, argv)
    for made in ("new.h5ad", "v1.h5ad", "preds/C2.h5ad", "preds/C2.ridge.h5ad", "bins.h5ad", "new.html"):
        assert (cohort / made).is_file(), made
