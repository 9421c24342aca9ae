"""`hinge eval`: score predictions against measured spot expression, with maps and a report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hinge_cli.data.expression import read_expression
from hinge_cli.errors import HingeError
from hinge_cli.eval.align import align, read_gene_list, read_prediction
from hinge_cli.eval.pictures import draw_pictures
from hinge_cli.eval.report import (
    SlideResult,
    across_slides,
    fmt,
    slide_report,
    summary_report,
    write_slide_metrics,
    write_summary_metrics,
)
from hinge_cli.eval.score import HEADLINE, score_slide
from hinge_cli.files import write_text_atomic
from hinge_cli.progress import SILENT, Progress
from hinge_cli.run import Run

DEFAULT_OUT = Path("hinge-eval")


@dataclass
class EvalSummary:
    slides: list[SlideResult]
    folders: list[Path]
    summary_dir: Path | None = None

    def lines(self) -> list[str]:
        out = [f"{s.sample}: depth-partial Pearson {fmt(HEADLINE.get(s.metrics))}, Pearson "
               f"{fmt(s.metrics.correlation.model.pearson.mean)}, MSE {fmt(s.metrics.errors.mse)} "
               f"({s.alignment['n_matched']} spots, {s.genes['n_evaluated']} genes) -> {folder / 'report.md'}"
               for s, folder in zip(self.slides, self.folders, strict=True)]
        if self.summary_dir is not None:
            out.append(f"across {len(self.slides)} slides -> {self.summary_dir / 'report.md'}")
        return out


def _folders(samples: list[str], out: Path | None, run: Run | None) -> tuple[list[Path], Path]:
    if out is None and run is not None:
        return [run.eval_dir(s) for s in samples], run.root / "eval"
    root = Path(out) if out is not None else DEFAULT_OUT
    return ([root / s for s in samples] if len(samples) > 1 else [root]), root


def evaluate(preds: Sequence[Path], truths: Sequence[Path], out: Path | None = None, run: Run | None = None,
             genes: Path | None = None, genes_to_plot: Sequence[str] = (), overwrite: bool = False,
             progress: Progress = SILENT, layer: str | None = None, maps: bool = True) -> EvalSummary:
    """Score each prediction against its truth (pairs in order) and write metrics.json, report.md and maps/.

    Output folders: with `out` and one pair, `out` itself; with several pairs,
    `out/<sample>/` plus the cross-slide metrics.json and report.md in `out`.
    Without `out`, `<run>/eval/<sample>/` (summary in `<run>/eval/`) when a run
    is given, else ./hinge-eval as `out`.
    """
    if not preds or len(preds) != len(truths):
        raise HingeError(f"{len(preds)} --pred and {len(truths)} --truth files", "give one --truth per --pred, in the same order")
    wanted = read_gene_list(genes) if genes is not None else None
    loaded = [read_prediction(p) for p in preds]
    samples = [p.sample for p in loaded]
    if len(set(samples)) != len(samples):
        raise HingeError(f"two predictions are for the same sample ({', '.join(samples)})", "evaluate each slide once")
    several = len(loaded) > 1
    folders, summary_dir = _folders(samples, out, run)
    existing = [f / "metrics.json" for f in [*folders, *([summary_dir] if several else [])] if (f / "metrics.json").exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise HingeError(f"evaluation results already exist: {existing[0]}{more}", "pass --overwrite to replace them, or give another --out")
    slides: list[SlideResult] = []
    with progress.task("eval", total=len(loaded)) as advance:
        for pred, truth_path, folder in zip(loaded, truths, folders, strict=True):
            aligned = align(pred, read_expression(truth_path, layer), wanted, Path(truth_path))
            unknown = [g for g in genes_to_plot if g not in aligned.genes]
            if unknown:
                raise HingeError(f"--genes-to-plot: {', '.join(unknown)} not evaluated on {pred.sample}",
                                 "choose genes in both the prediction's panel and the truth")
            result = score_slide(aligned, pred.transform)
            pictures = draw_pictures(aligned, pred, result, folder / "maps", genes_to_plot, draw=maps)
            slide = SlideResult(pred.sample, str(pred.path), str(truth_path), aligned.alignment, aligned.gene_report,
                                pred.transform.to_dict(), result.metrics, pictures)
            write_slide_metrics(folder / "metrics.json", slide)
            write_text_atomic(folder / "report.md", slide_report(slide))
            if run is not None:
                run.record_stage(pred.sample, "eval", "ok", metrics=str(folder / "metrics.json"), headline=HEADLINE.get(result.metrics))
            slides.append(slide)
            advance(status=pred.sample)
    if not several:
        return EvalSummary(slides, folders)
    summary = across_slides(slides)
    write_summary_metrics(summary_dir / "metrics.json", slides, summary)
    write_text_atomic(summary_dir / "report.md", summary_report(slides, summary))
    return EvalSummary(slides, folders, summary_dir)
