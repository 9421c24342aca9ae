"""Quality per forward pass: `hinge generate` on one HER2ST fold at steps x samples.

    python benchmarks/her2st/sampling_grid.py --fold bench-out/her2st-v3/folds/hvg50/C2/hinge/seed0 --test C2

Takes a fold that benchmark.py trained (its run folder, whose best checkpoint never saw the
held-out section) and predicts that section with every (steps, samples) pair, timing each
call of `predict_sample` (sampling and writing the .h5ad; the features are cached). Each
prediction is scored by `hinge eval`'s metrics: the depth-partial Pearson of X (the one-shot
mean) and of the samples' mean, the CRPS, the energy score and the ±1 std coverage; and the
co-expression consistency of a single sample against that of the point prediction. Prints a
markdown table and writes it, with the numbers as JSON, beside --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hinge_cli.config import GenerateConfig
from hinge_cli.core.files import write_text_atomic
from hinge_cli.core.progress import SILENT
from hinge_cli.data.expression import read_expression
from hinge_cli.eval import align, metric_table, read_prediction, score_slide
from hinge_cli.formats.tiles import read_tiles
from hinge_cli.predict.trained import load_trained_model
from hinge_cli.run.directory import Run
from hinge_cli.stages.generate import predict_sample

STEPS = (1, 5, 10, 25, 50)
SAMPLES = (1, 4, 16)
HEADLINE = "correlation.depth_partial.pearson.mean"
COEXPRESSION = "correlation.model.coexpression.consistency"
COLUMNS = (("depth-partial (X)", HEADLINE), ("CRPS", "calibration.crps"), ("energy score", "calibration.energy_score"),
           ("inside ±1 std", "calibration.within_1std"), ("co-expression (X)", COEXPRESSION))


def scores_of(pred, truth, truth_path: Path) -> dict:
    return metric_table(score_slide(align(pred, truth, truth_path=truth_path), pred.transform).metrics)


def grid_point(run: Run, test: str, model, cfg: GenerateConfig, out: Path, truth, truth_path: Path) -> dict:
    """One (steps, samples): seconds, X's metrics, and the samples' mean and a single sample scored as predictions."""
    started = time.perf_counter()
    predict_sample(run, test, model, out, cfg, progress=SILENT)
    seconds = time.perf_counter() - started
    pred = read_prediction(out)
    row = {"steps": cfg.steps, "samples": cfg.n_samples, "seconds": seconds, **scores_of(pred, truth, truth_path)}
    draws = pred.draws
    row["depth-partial (samples' mean)"] = scores_of(replace(pred, values=draws.mean(1)), truth, truth_path)[HEADLINE]
    row["co-expression (one sample)"] = scores_of(replace(pred, values=draws[:, 0], std=None, draws=None, q05=None, q95=None),
                                                  truth, truth_path)[COEXPRESSION]
    return row


def table(rows: list[dict], n_spots: int) -> str:
    names = ["steps", "samples", "seconds", "spots/s", *(label for label, _ in COLUMNS), "depth-partial (samples' mean)",
             "co-expression (one sample)"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [str(r["steps"]), str(r["samples"]), f"{r['seconds']:.1f}", f"{n_spots / r['seconds']:.1f}",
                 *(_fmt(r.get(key)) for _, key in COLUMNS), _fmt(r["depth-partial (samples' mean)"]),
                 _fmt(r["co-expression (one sample)"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.3f}"


def write_results(out: Path, text: str, rows: list[dict]) -> None:
    """The markdown table at `out` and its rows as JSON beside it; the table printed."""
    write_text_atomic(out, text)
    write_text_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1, default=float))
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fold", type=Path, required=True, help="a fold run folder of benchmark.py")
    parser.add_argument("--test", required=True, help="its held-out section")
    parser.add_argument("--out", type=Path, help="where the table goes (default: <fold>/sampling_grid.md)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--samples", default=",".join(map(str, SAMPLES)))
    args = parser.parse_args(argv)
    run = Run(args.fold)
    model = load_trained_model(run.checkpoint("best"), "cpu")
    truth_path = Path(run.sample(args.test)["expression"]["path"])
    truth = read_expression(truth_path)
    base = model.card.config.generate if model.card.config is not None else GenerateConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (int(v) for v in args.steps.split(",")):
            for samples in (int(v) for v in args.samples.split(",")):
                cfg = replace(base, steps=steps, n_samples=samples, seed=0, keep_samples=True, device="cpu")
                rows.append(grid_point(run, args.test, model, cfg, Path(tmp) / f"{steps}-{samples}.h5ad", truth, truth_path))
                print(json.dumps({k: rows[-1][k] for k in ("steps", "samples", "seconds", HEADLINE)}), flush=True)
    n_spots = len(read_tiles(run.tiles(args.test)).barcodes)
    text = f"Fold {args.test}, {n_spots} spots, {torch.get_num_threads()} CPU threads.\n\n" + table(rows, n_spots) + "\n"
    write_results(args.out or args.fold / "sampling_grid.md", text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
