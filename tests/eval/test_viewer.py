"""`hinge view`: the self-contained page, opened in headless Chromium.

The page must load with no console error, draw every spot, switch to a gene typed into the picker (the drawn
colours follow that gene's values, read back from the canvas pixels), show the gene's range on the colour bar,
and, with the truth, show truth − prediction as the error layer. Then the bad inputs: no coordinates, a slide
that moved, a truth with other spots.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from browser import chromium, console_errors, open_page
from matplotlib import colormaps
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.data.expression import Transform
from hinge_cli.eval.viewer import MISSING, quantise
from hinge_cli.synthetic.slides import make_synthetic_prediction

pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    """A 300-spot prediction, and a truth that shares 250 of its spots (plus 20 of its own) and 15 of its 20 genes."""
    root = tmp_path_factory.mktemp("view")
    pred = make_synthetic_prediction(root / "pred.h5ad", n_spots=300, n_genes=20, seed=4)
    adata = ad.read_h5ad(pred)
    rng = np.random.default_rng(0)
    genes = list(adata.var_names[:15]) + ["OTHER1", "OTHER2"]
    barcodes = list(adata.obs_names[:250]) + [f"extra{i}" for i in range(20)]
    counts = rng.poisson(20, (len(barcodes), len(genes))).astype(np.float32)
    truth = ad.AnnData(X=counts, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes))
    truth.obsm["spatial"] = np.vstack([adata.obsm["spatial"][:250], np.full((20, 2), 1e6)])
    truth.write_h5ad(root / "truth.h5ad")
    page = root / "pred.html"
    result = runner.invoke(app, ["view", str(pred), "--truth", str(root / "truth.h5ad"), "--out", str(page)])
    assert result.exit_code == 0, result.output
    return pred, root / "truth.h5ad", page, adata, truth


def _pixel(driver, i: int) -> str:
    """The canvas colour at spot i's centre, as #rrggbb."""
    return driver.execute_script("""
        const [x, y] = window.hinge.screen(arguments[0]), c = document.getElementById('canvas'), r = c.width / c.getBoundingClientRect().width;
        const p = c.getContext('2d').getImageData(Math.round(x * r), Math.round(y * r), 1, 1).data;
        return '#' + [p[0], p[1], p[2]].map(v => v.toString(16).padStart(2, '0')).join('');""", i)


def test_the_page_draws_every_spot_and_follows_the_gene_typed(files) -> None:
    pred, _, page, adata, _ = files
    values = np.asarray(adata.X)
    with chromium() as driver:
        open_page(driver, page)
        assert console_errors(driver) == []
        assert driver.execute_script("return window.hinge.drawn") == adata.n_obs
        # opaque spots on a blank background: the pixel at a spot's centre is its colour
        driver.execute_script("document.getElementById('tissue').click(); const o = document.getElementById('opacity');"
                              "o.value = 1; o.dispatchEvent(new Event('input'));")
        before = [_pixel(driver, i) for i in (0, 150, 299)]
        gene = "GENE013"
        box = driver.find_element("id", "gene")
        box.clear()
        box.send_keys("gene01")  # the list offers GENE010..GENE019; the arrow keys walk it and Enter picks
        assert driver.execute_script("return document.querySelectorAll('#matches li').length") == 10
        box.send_keys("\ue015" * 3 + "\ue007")  # ↓ ↓ ↓ Enter
        assert driver.execute_script("return window.hinge.gene") == gene
        j = list(adata.var_names).index(gene)
        codes, lo, hi = quantise(values[:, [j]].astype(np.float64))
        viridis = colormaps["viridis"]
        for i in (0, 150, 299):
            expected = "#%02x%02x%02x" % tuple(int(255 * c) for c in viridis(round(codes[0, i] / (MISSING - 1) * 255) / 255)[:3])
            assert driver.execute_script("return window.hinge.colour(arguments[0])", i) == expected
            assert _pixel(driver, i) == expected
        assert [_pixel(driver, i) for i in (0, 150, 299)] != before
        assert driver.execute_script("return window.hinge.range") == pytest.approx([lo[0], hi[0]], rel=1e-6)
        assert driver.find_element("id", "bar-lo").text == f"{lo[0]:.2f}" and driver.find_element("id", "bar-hi").text == f"{hi[0]:.2f}"
        assert "GENE013" in driver.find_element("id", "bar-title").text and "log2(counts + 1)" in driver.find_element("id", "bar-title").text


def test_the_error_layer_is_truth_minus_prediction_and_unmatched_spots_are_counted(files) -> None:
    pred, _, page, adata, truth = files
    gene = "GENE002"
    j, k = list(adata.var_names).index(gene), list(truth.var_names).index(gene)
    counts = np.asarray(truth.X)
    measured = Transform().apply(counts, counts.sum(1))[:, k]
    with chromium() as driver:
        open_page(driver, page)
        assert driver.execute_script("return window.hinge.pick(arguments[0]) && window.hinge.setLayer('error')", gene)
        error = np.array(driver.execute_script("return Array.from({length: 300}, (_, i) => window.hinge.value(i))"), dtype=float)
        want = measured[:250] - np.asarray(adata.X)[:250, j]
        step = (want.max() - want.min()) / (MISSING - 1)
        np.testing.assert_allclose(error[:250], want, atol=step / 2 + 1e-6)
        assert np.isnan(error[250:]).all()  # spots the truth does not have
        assert driver.execute_script("return window.hinge.drawn") == 250
        assert driver.execute_script("window.hinge.setLayer('truth'); return window.hinge.pick('GENE019') && window.hinge.drawn") == 0
        facts = driver.find_element("id", "facts").text
        assert "prediction spots without truth 50" in facts and "truth spots not in the prediction 20" in facts
        assert "genes measured 15 of 20" in facts
        assert console_errors(driver) == []


def test_a_prediction_without_coordinates_is_one_line(files, tmp_path) -> None:
    pred = tmp_path / "bare.h5ad"
    adata = ad.read_h5ad(files[0])
    del adata.obsm["spatial"]
    adata.write_h5ad(pred)
    result = runner.invoke(app, ["view", str(pred)])
    assert result.exit_code == 2 and "has no spot coordinates" in result.output and "Traceback" not in result.output
    assert not pred.with_suffix(".html").exists()


def test_existing_pages_are_kept_without_overwrite(files) -> None:
    pred, _, page, _, _ = files
    before = page.read_bytes()
    result = runner.invoke(app, ["view", str(pred), "--out", str(page)])
    assert result.exit_code == 2 and "--overwrite" in result.output and page.read_bytes() == before


def test_a_moved_slide_draws_without_tissue_and_says_why(files, tmp_path) -> None:
    pred = tmp_path / "moved.h5ad"
    adata = ad.read_h5ad(files[0])
    del adata.uns["spatial"]
    adata.uns["hinge"]["slide"] = str(tmp_path / "gone.svs")
    adata.write_h5ad(pred)
    page = tmp_path / "moved.html"
    assert runner.invoke(app, ["view", str(pred), "--out", str(page)]).exit_code == 0
    with chromium() as driver:
        open_page(driver, page)
        note = driver.find_element("id", "note")
        assert note.is_displayed() and "gone.svs" in note.text and "No tissue image" in note.text
        assert driver.execute_script("return window.hinge.drawn") == adata.n_obs
        assert console_errors(driver) == []


def test_quantisation_keeps_each_gene_to_its_range_and_marks_missing_values() -> None:
    values = np.array([[0.0, 5.0, np.nan], [1.0, 5.0, 2.0], [2.0, 5.0, 4.0]])
    codes, lo, hi = quantise(values)
    assert codes.shape == (3, 3) and codes.dtype == np.uint8
    assert codes[0].tolist() == [0, 127, 254] and lo.tolist() == [0, 5, 2] and hi.tolist() == [2, 5, 4]
    assert codes[1].tolist() == [0, 0, 0] and codes[2].tolist() == [MISSING, 0, 254]


def test_eval_writes_report_html_with_sortable_genes_that_show_in_the_viewer(files, tmp_path) -> None:
    pred, truth, _, _, _ = files
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--pred", str(pred), "--truth", str(truth), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out / "report.html"
    assert page.exists() and (out / "report.md").exists() and "report.html" in result.output
    with chromium() as driver:
        open_page(driver, page)
        rows = driver.find_elements("css selector", "#report tr.gene")
        assert len(rows) == 15  # the genes both files have
        first = driver.execute_script("return Array.from(document.querySelectorAll('#report table.sortable tbody tr')).map(r => r.dataset.gene)")
        driver.find_element("css selector", "#report table.sortable th:first-child").click()  # sort by gene name
        by_name = driver.execute_script("return Array.from(document.querySelectorAll('#report table.sortable tbody tr')).map(r => r.dataset.gene)")
        assert sorted(by_name) in (by_name, by_name[::-1]) and sorted(first) == sorted(by_name)
        driver.execute_script("document.querySelector('#report tr.gene[data-gene=\"GENE007\"]').click()")
        assert driver.execute_script("return window.hinge.gene") == "GENE007"
        assert "Headline: depth-partial mean Pearson" in driver.find_element("id", "report").text
        assert console_errors(driver) == []
