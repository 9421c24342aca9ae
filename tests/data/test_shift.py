"""The shift report: a training slide is inside what training saw (score 0), the score grows with the strength
of a stain shift applied to a new slide, which is flagged once strong, and a blurred scan is flagged by its focus."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFilter
from stand_in import tiled_synthetic

from hinge_cli.config import EmbedConfig
from hinge_cli.data.features import SlideShift
from hinge_cli.data.samples import SampleSpec
from hinge_cli.data.shift import ShiftReference, SlideStats, shift_report, warn_if_outside
from hinge_cli.formats.tiles import read_tiles
from hinge_cli.slide.stats import slide_stats
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.slide.writer import write_pyramidal_tiff
from hinge_cli.stages.embed import embed_samples
from hinge_cli.synthetic.slides import make_synthetic_sample

pytestmark = pytest.mark.slow

MPP = 1.0


def stained(rgb: np.ndarray, strength: float) -> np.ndarray:
    """Every stain darker by `strength` (optical density scaled by 1 + strength), as a heavier staining run makes it."""
    density = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    return np.clip(255.0 * np.exp(-density * (1.0 + strength)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShiftReference, dict[float, SlideStats]]:
    root = tmp_path_factory.mktemp("shift")
    run, training = tiled_synthetic(root, "t", 3, 60, size_px=640, mpp=MPP, n_genes=20)
    names = [s.sample_id for s in training]
    cfg = run.config("tiny")
    cfg.tile.images = False
    new = make_synthetic_sample(root / "data", "new", size_px=640, mpp=MPP, seed=70, n_genes=20)
    base = tifffile.imread(new.slide)
    strengths = (0.0, 0.3, 0.6, 1.2)
    blurred = np.asarray(Image.fromarray(base[..., :3]).filter(ImageFilter.GaussianBlur(1.5)))
    for sample, rgb in [(f"new{int(strength * 10)}", stained(base, strength)) for strength in strengths] + [("blurred", blurred)]:
        slide = write_pyramidal_tiff(root / "data" / f"{sample}.tif", rgb, MPP)
        tile_sample(run, SampleSpec(sample, slide, new.spots), cfg.tile)
        names.append(sample)
    embed_samples(run, EmbedConfig(device="cpu"))
    stats = {s: slide_stats(read_tiles(run.tiles(s)), SlideShift.read(run.embeddings("default", s), s)) for s in names}
    reference = ShiftReference({s: stats[s] for s in names[:3]})
    return reference, {**{strength: stats[f"new{int(strength * 10)}"] for strength in strengths}, "blurred": stats["blurred"]}


def test_a_training_slide_is_inside(slides) -> None:
    reference, _ = slides
    report = shift_report(reference, reference.slides["t1"])
    assert report["score"] == 0 and report["features_outside"] == 0 and not report["outside"]


def test_the_score_grows_with_the_stain_shift_and_a_strong_one_is_flagged(slides, caplog: pytest.LogCaptureFixture) -> None:
    reference, shifted = slides
    reports = {strength: shift_report(reference, stats) for strength, stats in shifted.items() if strength != "blurred"}
    scores = [reports[s]["score"] for s in sorted(reports)]
    assert scores == sorted(scores) and scores[-1] > scores[0], scores
    assert not reports[0.0]["outside"] and reports[1.2]["outside"]
    with caplog.at_level(logging.WARNING):
        warn_if_outside("new12", reports[1.2])
        warn_if_outside("new0", reports[0.0])
    assert caplog.text.count("is outside what the model was trained on") == 1 and "new12" in caplog.text


def test_a_blurred_scan_is_flagged_by_its_focus_which_a_stain_hardly_moves(slides) -> None:
    reference, shifted = slides
    blurred = shift_report(reference, shifted["blurred"])
    assert blurred["outside"] and "blurrier" in blurred["why"]
    assert blurred["sharpness"] < 0.75 * blurred["training_sharpness"][0]
    plain, stained_ = shifted[0.0].sharpness, shifted[1.2].sharpness
    assert abs(stained_ - plain) < 0.15 * plain
    assert "blurrier" not in shift_report(reference, shifted[0.0])["why"]


def test_a_card_without_focus_reports_no_focus(slides) -> None:
    reference, shifted = slides
    older = ShiftReference({name: dataclasses.replace(stats, sharpness=None) for name, stats in reference.slides.items()})
    report = shift_report(older, shifted["blurred"])
    assert "sharpness" not in report and "blurrier" not in report["why"]


def test_the_reference_survives_the_card() -> None:
    stats = SlideStats([0.0, 1.0], [1.0, 1.0], [200.0, 150.0, 210.0], 0.5, 10, 0.1)
    reference = ShiftReference({"a": stats})
    assert ShiftReference.from_dict(dataclasses.asdict(reference)) == reference  # as the model card writes and reads it
    report = shift_report(reference, SlideStats([0.0, 4.0], [1.0, 1.0], [200.0, 150.0, 210.0], 0.56, 10, 0.1))
    assert report["score"] == pytest.approx(np.sqrt(9 / 2), abs=1e-4) and report["most_shifted"] == {"feature 1": 3.0}
    assert "µm/px" in report["why"] and "features" in report["why"]
