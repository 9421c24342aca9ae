"""eval's report.html: report.md's facts as HTML around the slide's viewer, in one file that survives an scp.

The tables are built from the same typed results as report.md (no markdown is converted); the per-gene table
sorts on a click of its header, and a click on a gene shows it in the viewer above. The pictures eval drew
(calibration, co-expression) are inlined as PNG.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hinge_cli.data.expression import expression_unit
from hinge_cli.eval.report import SlideResult, comparison, fmt, shift_summary
from hinge_cli.eval.score import HEADLINE, METRICS


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css: str = "", row_genes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for k, row in enumerate(rows):
        attrs = f' class="gene" data-gene="{html.escape(row_genes[k])}"' if row_genes is not None else ""
        body.append(f"<tr{attrs}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _per_gene(slide: SlideResult) -> str:
    genes = slide.metrics.per_gene
    columns = [("Pearson", genes.pearson_model), ("depth-partial", genes.pearson_depth_partial), ("Spearman", genes.spearman_model),
               ("MSE", genes.mse), ("RVD", genes.rvd)]
    if genes.crps is not None:
        columns.append(("CRPS", genes.crps))
    if genes.within_1std is not None:
        columns.append(("within ± 1 std", genes.within_1std))
    rows = [[gene, *(fmt(float(values[j])) for _, values in columns)] for j, gene in enumerate(genes.genes)]
    order = np.argsort(-np.nan_to_num(genes.pearson_depth_partial, nan=-np.inf), kind="stable")
    return _table(["gene", *(name for name, _ in columns)], [rows[j] for j in order], "sortable", [genes.genes[j] for j in order])


def _pictures(slide: SlideResult, folder: Path) -> str:
    out = []
    for name, file in slide.pictures.figures.items():
        path = folder / "maps" / file
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            out.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(name)}</figcaption></figure>')
    return "".join(out)


def slide_report_html(slide: SlideResult, folder: Path) -> str:
    """The report section of one slide's report.html (the viewer is drawn above it)."""
    a, g = slide.alignment, slide.genes
    parts = [f"<h2>hinge eval: {html.escape(slide.sample)}</h2>",
             f"<p><strong>Headline: depth-partial mean Pearson = {fmt(HEADLINE.get(slide.metrics))}</strong> "
             "(gene-specific signal beyond sequencing depth).</p>",
             f"<p>Prediction <code>{html.escape(slide.pred)}</code>, truth <code>{html.escape(slide.truth)}</code>; "
             f"{a['n_matched']} spots matched by {html.escape(str(a['matched_by']))}; {g['n_evaluated']} of {g['n_panel']} genes scored, "
             f"in {html.escape(expression_unit(**slide.transform))}. report.md beside this file defines every number.</p>",
             f"<p>Shift from the training slides: {html.escape(shift_summary(slide.shift))}</p>"]
    if slide.baseline is not None:
        names = (slide.model, slide.baseline.model)
        parts += [f"<h3>{html.escape(names[0])} vs the {html.escape(names[1])} baseline</h3>",
                  _table(["metric", names[0], f"{names[1]} baseline", "better"], comparison([(slide.metrics, slide.baseline.metrics)], names))]
    parts += ["<h3>Metrics</h3>", _table(["metric", slide.sample], [[m.label, fmt(m.get(slide.metrics))] for m in METRICS.values()]),
              "<h3>Per gene</h3><p>Click a column to sort, a gene to see it above.</p>", _per_gene(slide),
              "<h3>Pictures</h3>", _pictures(slide, folder)]
    return "\n".join(parts)
