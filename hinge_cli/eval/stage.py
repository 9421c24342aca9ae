"""`hinge eval`: score predictions against measured spot expression, with maps and a report.

When a prediction has a baseline (the ridge prediction `hinge generate --model ridge` wrote
beside it, or one given), the baseline is scored on the same spots and genes and the two are
printed and reported side by side.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hinge_cli.core.files import reading, write_text_atomic
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.data.bins import hd_truth, is_hd_folder
from hinge_cli.data.expression import Expression, read_truth
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.eval import metrics
from hinge_cli.eval.align import Aligned, Prediction, align, read_prediction
from hinge_cli.eval.html_report import slide_report_html
from hinge_cli.eval.pictures import draw_pictures
from hinge_cli.eval.pooling import pooling_curve
from hinge_cli.eval.report import (
    Baseline,
    SlideResult,
    across_slides,
    comparison_lines,
    fmt,
    json_ready,
    slide_report,
    summary_report,
    write_slide_metrics,
    write_summary_metrics,
)
from hinge_cli.eval.score import HEADLINE, score_slide
from hinge_cli.eval.viewer import view_of, write_view
from hinge_cli.formats.genes import read_gene_list
from hinge_cli.formats.prediction import ridge_prediction_path
from hinge_cli.run.directory import Run

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("hinge-eval")


@dataclass
class EvalSummary:
    slides: list[SlideResult]
    folders: list[Path]
    summary_dir: Path | None = None

    def lines(self) -> list[str]:
        out = []
        for s, folder in zip(self.slides, self.folders, strict=True):
            low = s.metrics.correlation.low_count_spots
            dropped = f"; {low} under {metrics.MIN_DEPTH:.0f} counts left out of depth-partial" if low else ""
            given = s.genes.get("given", [])
            dropped += f"; only the genes not given: {len(given)} given genes not scored" if given else ""
            out.append(f"{s.sample}: depth-partial Pearson {fmt(HEADLINE.get(s.metrics))}, Pearson "
                       f"{fmt(s.metrics.correlation.model.pearson.mean)}, MSE {fmt(s.metrics.errors.mse)} "
                       f"({s.alignment['n_matched']} spots{dropped}, {s.genes['n_evaluated']} genes) -> {folder / 'report.html'}")
            if s.baseline is not None:
                out += comparison_lines(s, s.baseline)
        if self.summary_dir is not None:
            out.append(f"across {len(self.slides)} slides -> {self.summary_dir / 'report.md'}")
        return out


def _folders(samples: list[str], out: Path | None, run: Run | None) -> tuple[list[Path], Path]:
    if out is None and run is not None:
        return [run.eval_dir(s) for s in samples], run.root / "eval"
    root = Path(out) if out is not None else DEFAULT_OUT
    return ([root / s for s in samples] if len(samples) > 1 else [root]), root


def baselines_beside(preds: Sequence[Prediction]) -> list[Path | None]:
    """Each HINGE prediction's ridge baseline where `hinge generate --model ridge` wrote it beside it."""
    found = [ridge_prediction_path(p.path) if p.model != "ridge" else None for p in preds]
    return [path if path is not None and path.is_file() else None for path in found]


def _score_baseline(path: Path, pred: Prediction, truth: Expression, aligned: Aligned, truth_path: Path) -> Baseline:
    """A baseline of `pred`'s slide scored on the genes `pred` was scored on."""
    baseline = read_prediction(path)
    if baseline.sample != pred.sample:
        raise HingeError(f"baseline {path} is of sample {baseline.sample}, the prediction {pred.path} of {pred.sample}",
                         f"give each {setting('baseline')} in the order of its {setting('pred')}")
    scored = align(baseline, truth, aligned.genes, truth_path)
    if scored.alignment["n_matched"] != aligned.alignment["n_matched"]:
        raise HingeError(f"baseline {path} covers {scored.alignment['n_matched']} of the truth's spots, the prediction "
                         f"{aligned.alignment['n_matched']}", f"predict both from the same tiles (`{command('generate')}` and "
                         f"`{command('generate')} {setting('model')} ridge` on the same sample)")
    return Baseline(str(path), baseline.model, score_slide(scored, baseline.transform).metrics)


def _unfinished(existing: Sequence[Path], summary_dir: Path, preds: Sequence[Path], truths: Sequence[Path]) -> bool:
    """Whether the slides' metrics.json found are those of this same evaluation, killed before its summary: no summary,
    and each made from one of these predictions with its truth (scoring them again gives the same figures)."""
    if (summary_dir / "metrics.json").exists():
        return False
    pairs = {(str(p), str(t)) for p, t in zip(preds, truths, strict=True)}
    for path in existing:
        with reading(path, f"pass {setting('overwrite')} to evaluate again"):
            made = json.loads(path.read_text())
        if (str(made.get("pred")), str(made.get("truth"))) not in pairs:
            return False
    return True


def _read_truth(path: Path, layer: str | None, pred: Prediction) -> Expression:
    """The measured counts: an .h5ad, or for a prediction of Visium HD bins the HD outs/ folder at the bins' size."""
    if not is_hd_folder(path):
        return read_truth(path, layer)
    if pred.bin_um is None:
        raise HingeError(f"{setting('truth')} {path} is a Visium HD folder, but {pred.path} does not predict its bins",
                         f"predict them with `{command('generate')} {setting('visium-hd')}`, or give the truth as an .h5ad")
    return hd_truth(path, pred.bin_um)


def evaluate(preds: Sequence[Path], truths: Sequence[Path], out: Path | None = None, run: Run | None = None,
             genes: Path | None = None, genes_to_plot: Sequence[str] = (), overwrite: bool = False,
             progress: Progress = SILENT, layer: str | None = None, maps: bool = True,
             baselines: Sequence[Path] | None = None) -> EvalSummary:
    """Score each prediction against its truth (pairs in order) and write metrics.json, report.md, report.html and maps/.

    baselines: one per prediction, scored alongside it (default: the `<name>.ridge.h5ad` beside a `<name>.h5ad`
    where `hinge generate --model ridge` wrote one).

    Output folders: with `out` and one pair, `out` itself; with several pairs,
    `out/<sample>/` plus the cross-slide metrics.json and report.md in `out`.
    Without `out`, `<run>/eval/<sample>/` (summary in `<run>/eval/`) when a run
    is given, else ./hinge-eval as `out`.
    """
    if not preds or len(preds) != len(truths):
        raise HingeError(f"{len(preds)} {setting('pred')} and {len(truths)} {setting('truth')} files", f"give one {setting('truth')} per {setting('pred')}, in the same order")
    wanted = read_gene_list(genes) if genes is not None else None
    loaded = [read_prediction(p) for p in preds]
    if baselines is not None and len(baselines) != len(preds):
        raise HingeError(f"{len(baselines)} {setting('baseline')} and {len(preds)} {setting('pred')} files", f"give one {setting('baseline')} per {setting('pred')}, in the same order")
    paired = list(baselines) if baselines is not None else baselines_beside(loaded)
    samples = [p.sample for p in loaded]
    if len(set(samples)) != len(samples):
        raise HingeError(f"two predictions are for the same sample ({', '.join(samples)})", "evaluate each slide once")
    several = len(loaded) > 1
    folders, summary_dir = _folders(samples, out, run)
    existing = [f / "metrics.json" for f in [*folders, *([summary_dir] if several else [])] if (f / "metrics.json").exists()]
    if existing and not overwrite:
        if several and _unfinished(existing, summary_dir, preds, truths):
            log.info("an earlier `hinge eval` of these predictions did not finish (no %s): evaluating them again",
                     summary_dir / "metrics.json")
        else:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise HingeError(f"evaluation results already exist: {existing[0]}{more}", f"pass {setting('overwrite')} to replace them, or give another {setting('out')}")
    slides: list[SlideResult] = []
    with progress.task("eval", total=len(loaded)) as advance:
        for pred, truth_path, folder, baseline in zip(loaded, truths, folders, paired, strict=True):
            truth = _read_truth(Path(truth_path), layer, pred)
            aligned = align(pred, truth, wanted, Path(truth_path))
            unknown = [g for g in genes_to_plot if g not in aligned.genes]
            if unknown:
                raise HingeError(f"{setting('genes-to-plot')}: {', '.join(unknown)} not evaluated on {pred.sample}",
                                 "choose genes in both the prediction's panel and the truth")
            result = score_slide(aligned, pred.transform)
            pooling = None if pred.bin_um is None else pooling_curve(aligned, result.metrics, pred.transform, pred.bin_um)
            pictures = draw_pictures(aligned, pred, result, folder / "maps", genes_to_plot, draw=maps)
            slide = SlideResult(pred.sample, str(pred.path), str(truth_path), aligned.alignment, aligned.gene_report,
                                pred.transform.to_dict(), result.metrics, pictures, pred.model,
                                None if baseline is None else _score_baseline(Path(baseline), pred, truth, aligned, Path(truth_path)),
                                json_ready(pred.provenance.get("shift")), pooling)
            write_text_atomic(folder / "report.md", slide_report(slide))
            write_view(folder / "report.html", view_of(pred, truth, Path(truth_path)), slide_report_html(slide, folder), overwrite=True)
            write_slide_metrics(folder / "metrics.json", slide)  # last: it marks the slide's evaluation as done
            if run is not None:
                run.record_stage(pred.sample, "eval", "ok", metrics=str(folder / "metrics.json"), headline=HEADLINE.get(result.metrics))
            slides.append(slide)
            advance(status=pred.sample)
    if not several:
        return EvalSummary(slides, folders)
    summary = across_slides(slides)
    write_text_atomic(summary_dir / "report.md", summary_report(slides, summary))
    write_summary_metrics(summary_dir / "metrics.json", slides, summary)  # last: it marks the evaluation as done
    return EvalSummary(slides, folders, summary_dir)
