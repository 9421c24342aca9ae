"""Depth-normalised targets on HER2ST: composition models, an image -> depth head, all scored on log2 counts.

    python benchmarks/her2st/benchmark.py --out bench-out/her2st-total --normalize total --methods ridge,mlp,hinge --seeds 1
    python benchmarks/her2st/depth_targets.py --counts bench-out/her2st-v7 --total bench-out/her2st-total

Issue #12 asks whether HINGE should predict library-size-normalised expression (composition)
plus the depth from a separate image head, instead of log2(counts + 1). `benchmark.py
--normalize total` trains and scores every method in the normalised space; this script puts both
target choices on one scale, the held-out section's log2(counts + 1), for each fold:

- ridge and HINGE (seed 0 fold runs of both benchmarks) trained on log counts, as they are;
- ridge and HINGE trained on log2(CP10k + 1), their composition taken as the log-count prediction;
- the same plus each spot's depth from an image head (ridge on the same features -> log total
  counts, penalty by inner leave-one-section-out MSE): log2(de-logged composition x depth / 10^4 + 1).

Reported: the headline depth-partial Pearson (spots under 100 UMI dropped, as eval does), the raw
Pearson, and how well the depth head predicts the held-out spots' log total counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from benchmark import SECTIONS, BaselineInputs, _table, run_baseline
from ridge import choose_lambda, fit_ridge, predict_ridge
from sampling_grid import write_results

from hinge_cli.data.expression import Transform, read_expression
from hinge_cli.eval import Prediction, metrics, read_prediction
from hinge_cli.model.checkpoint import read_checkpoint_card
from hinge_cli.run.directory import Run

COUNTS, TOTAL = Transform("none"), Transform("total")
HEADLINE, RAW = "correlation.depth_partial.pearson.mean", "correlation.model.pearson.mean"
COLUMNS = (("depth-partial Pearson", HEADLINE), ("raw Pearson", RAW))


def depth_head(inputs: BaselineInputs) -> np.ndarray:
    """Each held-out spot's predicted natural-log total counts: ridge on the image features."""
    xs = [x for x, _, _ in inputs.train]
    ys = [np.log(np.maximum(depth, 1.0))[:, None] for _, _, depth in inputs.train]
    lam, _ = choose_lambda(xs, ys, lambda p, t, i: -float(np.mean((p - t) ** 2)))
    return predict_ridge(fit_ridge(np.concatenate(xs), np.concatenate(ys), lam), inputs.features)[:, 0]


def as_counts(pred: Prediction, log_depth: dict[str, float] | None = None) -> Prediction:
    """A point prediction read as log2(counts + 1); a composition one rescaled by predicted depth first if given."""
    values = pred.values.astype(np.float64)
    if log_depth is not None:
        depth = np.exp([log_depth[b] for b in pred.barcodes])
        values = np.log2((np.exp2(values) - 1.0) * depth[:, None] / TOTAL.target_sum + 1.0)
    return replace(pred, values=values.astype(np.float32), transform=COUNTS, std=None, q05=None, q95=None, draws=None)


def fold_rows(counts_bench: Path, total_bench: Path, fold: str) -> list[dict]:
    base = Run(total_bench / "run")
    genes = json.loads((counts_bench / "scores" / "hvg50" / fold / "ridge.json").read_text())["genes"]
    truth_path = Path(base.sample(fold)["expression"]["path"])
    truth = read_expression(truth_path)
    key = read_checkpoint_card(Run(total_bench / "folds" / "hvg50" / fold / "hinge" / "seed0").checkpoint("best")).encoder_key
    inputs = {t.normalize: BaselineInputs.read(base, key, fold, genes, True, t) for t in (COUNTS, TOTAL)}
    log_depth = depth_head(inputs["total"])
    measured = dict(zip(truth.barcodes, truth.totals, strict=True))
    counted = [i for i, b in enumerate(inputs["total"].barcodes) if measured.get(b, 0) >= metrics.MIN_DEPTH]
    depth_r = float(np.corrcoef(log_depth[counted], np.log([measured[inputs["total"].barcodes[i]] for i in counted]))[0, 1])
    by_barcode = dict(zip(inputs["total"].barcodes, log_depth, strict=True))
    rows = []
    for targets, bench in (("log counts", counts_bench), ("CP10k", total_bench)):
        transform = COUNTS if targets == "log counts" else TOTAL
        models = {"ridge": run_baseline("ridge", inputs[transform.normalize], fold, genes, 1)[0],
                  "hinge": read_prediction(bench / "folds" / "hvg50" / fold / "hinge" / "seed0" / f"{fold}.h5ad")}
        for method, pred in models.items():
            variants = {targets: as_counts(pred)}
            if transform == TOTAL:
                variants["CP10k + image depth head"] = as_counts(pred, by_barcode)
            for name, variant in variants.items():
                numbers = _table(variant, truth, truth_path)
                rows.append({"fold": fold, "method": method, "targets": name, "depth_head_pearson": depth_r,
                             **{label: numbers[k] for label, k in COLUMNS}})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    folds = sorted({r["fold"] for r in rows})
    lines = ["# HER2ST: log-count targets against depth-normalised ones (with and without an image depth head)", "",
             f"Folds {', '.join(folds)}, HINGE seed 0; every prediction scored against the held-out section's log2(counts + 1) "
             "(mean ± std over folds, ddof 0 as in the main table).", "", "| method | trained on | " + " | ".join(label for label, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for method, targets in dict.fromkeys((r["method"], r["targets"]) for r in rows):
        mine = [r for r in rows if (r["method"], r["targets"]) == (method, targets)]
        cells = [f"{np.mean([r[label] for r in mine]):.3f} ± {np.std([r[label] for r in mine]):.3f}" for label, _ in COLUMNS]
        lines.append(f"| {method} | {targets} | " + " | ".join(cells) + " |")
    per_fold = {r["fold"]: r["depth_head_pearson"] for r in rows}
    lines += ["", "Image depth head, Pearson with the held-out spots' log total counts: "
              f"{np.mean(list(per_fold.values())):.3f} (" + ", ".join(f"{f} {v:.3f}" for f, v in per_fold.items()) + ")."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=Path, default=Path("bench-out/her2st"), help="benchmark.py's --out (log counts)")
    parser.add_argument("--total", type=Path, required=True, help="benchmark.py's --out with --normalize total")
    parser.add_argument("--folds", default=",".join(SECTIONS))
    parser.add_argument("--out", type=Path, help="the table (default: <total>/depth_targets.md); numbers beside it as .json")
    args = parser.parse_args(argv)
    rows = [row for fold in args.folds.split(",") for row in fold_rows(args.counts, args.total, fold)]
    write_results(args.out or args.total / "depth_targets.md", table(rows) + "\n", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
