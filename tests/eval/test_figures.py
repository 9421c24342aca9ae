"""matplotlib figures write valid PNGs, and importing the package does not import matplotlib."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hinge_cli.core import figures
from hinge_cli.data.expression import expression_unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_width: int = 200) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))  # written atomically, nothing left behind
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[1] >= min_width
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # a drawing, not a blank canvas
    return pixels


def hex_grid(n: int = 6, pitch: float = 20.0) -> np.ndarray:
    rows, cols = np.mgrid[0:n, 0:n]
    return np.column_stack([(cols * pitch + (rows % 2) * pitch / 2 + 30).ravel(), (rows * pitch * 0.87 + 30).ravel()])


@pytest.mark.slow
def test_importing_the_package_does_not_import_matplotlib() -> None:
    code = "import hinge_cli, hinge_cli.eval, hinge_cli.core.figures, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_expression_unit_names_the_transform() -> None:
    assert expression_unit("none", 1e4, 2.0) == "log2(counts + 1)"
    assert expression_unit("total", 1e4, 2.0) == "log2(counts per 10000 + 1)"


@pytest.mark.parametrize("with_image", [False, True])
def test_spot_maps_give_each_panel_its_own_scale(tmp_path: Path, with_image: bool) -> None:
    xy = hex_grid()
    truth = np.sin(xy[:, 0] / 30)
    panels = [figures.MapPanel("true", truth, "log2(counts + 1)"),
              figures.MapPanel("predicted", 100 + 0.01 * truth, "log2(counts + 1)"),  # a far smaller, shifted range
              figures.MapPanel("error", np.append(truth[1:] - truth[:-1], np.nan), "log2(counts + 1)", diverging=True)]
    image = np.full((200, 200, 3), 230, np.uint8) if with_image else None
    pixels = assert_png(figures.spot_maps(tmp_path / "map.png", xy, 18.0, panels, "G1  Pearson r = 0.5", image), 600)
    assert pixels.shape[1] > 2 * pixels.shape[0]  # panels side by side
    # the prediction spans a narrow range; on its own scale it still uses the whole colour map
    third = pixels.shape[1] // 3
    middle = pixels[:, third:2 * third].reshape(-1, 3).astype(int)
    assert np.ptp(middle[:, 1]) > 150


def test_each_colour_bar_spans_its_panels_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale a reader reads off each colour bar is the 1st-99th percentile of that panel's values (± the 99th
    |percentile| for a diverging one), not only a PNG that exists."""
    drawn = []
    real_save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: (drawn.append(fig), real_save(fig, path))[1])
    xy = hex_grid()
    truth = np.sin(xy[:, 0] / 30)
    error = np.append(truth[1:] - truth[:-1], np.nan)
    panels = [figures.MapPanel("true", truth, "u"), figures.MapPanel("predicted", 100 + 0.01 * truth, "u"),
              figures.MapPanel("error", error, "u", diverging=True)]
    figures.spot_maps(tmp_path / "map.png", xy, 18.0, panels, "G1", None)
    bars = [ax for ax in drawn[0].axes if getattr(ax, "_colorbar", None) is not None]  # matplotlib marks a colour bar's axes
    assert len(bars) == 3
    for bar, panel in zip(bars, panels, strict=True):
        values = panel.values[np.isfinite(panel.values)]
        if panel.diverging:
            bound = np.percentile(np.abs(values), 99)
            expected = (-bound, bound)
        else:
            expected = tuple(np.percentile(values, [1, 99]))
        np.testing.assert_allclose(sorted(bar.get_ylim()), expected, rtol=1e-9, err_msg=panel.title)


def test_generate_maps_put_the_he_first(tmp_path: Path) -> None:
    xy = hex_grid()
    image = np.zeros((200, 200, 3), np.uint8)
    image[..., 0] = 200
    panels = [figures.MapPanel("predicted mean", xy[:, 0], "log2(counts + 1)"),
              figures.MapPanel("std over samples", xy[:, 1], "log2(counts + 1)")]
    pixels = assert_png(figures.spot_maps(tmp_path / "g.png", xy, 18.0, panels, "s: G", image, image_panel=True), 600)
    assert ((pixels[..., 0] == 200) & (pixels[..., 1] == 0)).sum() > 1000  # the H&E panel, at full strength


@pytest.mark.parametrize("n_genes", [5, 60])
def test_heatmaps_carry_gene_labels(tmp_path: Path, n_genes: int) -> None:
    values = np.random.default_rng(0).normal(size=(40, n_genes))
    corr = np.corrcoef(values.T)
    labels = [f"GENE{j}" for j in range(n_genes)]
    pixels = assert_png(figures.heatmaps(tmp_path / "h.png", [("true", corr), ("predicted", corr.T)], labels, "co-expression"))
    assert pixels.shape[0] > 300


def test_scatter_and_loss_curves(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 20)
    assert_png(figures.scatter(tmp_path / "s.png", {"Pearson": (x, x**2), "partial": (x, np.append(x[:-1], np.nan))},
                               "per gene", "variance", "r"))
    assert_png(figures.loss_curves(tmp_path / "l.png", {"train": [1.0, 0.8, 0.7], "validation": [None, 0.9, 0.85],
                                                        "absent": [None, None, None]}, "train: masked loss"))


def test_slide_thumbnail_has_outline_patches_and_scale_bar(tmp_path: Path) -> None:
    image = np.full((300, 400, 3), 245, np.uint8)
    tissue = np.zeros((30, 40), bool)
    tissue[5:25, 8:30] = True
    image[50:250, 80:300] = (200, 120, 180)
    centres = np.column_stack([np.linspace(100, 280, 10), np.full(10, 150.0)])
    pixels = assert_png(figures.slide_thumbnail(tmp_path / "t.png", image, tissue, 10.0, centres, 8.0, 4.0), 400)
    green = (pixels[..., 1] > 150) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    assert green.sum() > 100  # the tissue outline


def test_scale_bar_is_a_round_length() -> None:
    assert figures._scale_bar_um(1600 * 4.0) == 1000
    assert figures._scale_bar_um(123.0) == 20
