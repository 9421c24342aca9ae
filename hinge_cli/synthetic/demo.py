"""`make demo`: the whole pipeline on synthetic data, through the real `hinge` command line.

Four synthetic sections with spots (one held out) and six expression-only sections
for backbone pre-training. After tile -> embed -> pretrain-warmup -> train ->
generate -> eval, the same held-out section is predicted by an untrained model
(random backbone, no training, the direct image path left at zero rather than started
at the ridge fit), so the printed numbers show what was learned, and
by the closed-form ridge baseline `train` fitted on the same spots, so they show
whether the generator beats it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hinge_cli.config import load_config
from hinge_cli.data.expression import expression_unit
from hinge_cli.eval import HEADLINE, metric_table, read_baseline_metrics, read_slide_metrics
from hinge_cli.formats.genes import read_gene_list
from hinge_cli.run.lineage import GENES_FILE

HELD_OUT = "synth3"


def hinge(*args: str) -> None:
    command = [sys.executable, "-m", "hinge_cli", *args]
    print("\n$ hinge " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


SHOWN = {  # printed name -> metrics.json key
    "mean Pearson (model space)": "correlation.model.pearson.mean",
    "depth-partial Pearson (the headline)": HEADLINE.key,
    "co-expression consistency": "correlation.model.coexpression.consistency",
    "RVD": "variance.rvd",
    "MSE": "errors.mse",
    "CRPS (lower is better)": "calibration.crps",
    "inside the central 68% (0.683 if calibrated)": "calibration.within_1std",
}


def headline(table: dict[str, float | int | None] | None) -> dict[str, float]:
    return {name: float("nan") if table is None or table[key] is None else float(table[key]) for name, key in SHOWN.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    args = parser.parse_args(argv)
    started = time.time()
    data, run, baseline = args.out / "data", args.out / "run", args.out / "untrained"
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"$ python -m hinge_cli.synthetic.slides {data}", flush=True)
    subprocess.run([sys.executable, "-m", "hinge_cli.synthetic.slides", str(data), "--samples", "4", "--corpus", "6"], check=True)
    hinge("tile", "--samples", str(data / "samples.csv"), "--run", str(run), "--config", "tiny")
    hinge("embed", "--run", str(run))
    hinge("pretrain-warmup", "--run", str(run), "--holdout", HELD_OUT, "--corpus", str(data / "corpus" / "*.h5ad"), "--n-genes", "60")
    hinge("train", "--run", str(run))
    prediction = run / "predictions" / f"{HELD_OUT}.h5ad"
    panel = read_gene_list(run / GENES_FILE)
    hinge("generate", "--run", str(run), "--sample-id", HELD_OUT, "--out", str(prediction), "--genes-to-plot", ",".join(panel[:2]))
    ridge = run / "predictions" / f"{HELD_OUT}.ridge.h5ad"
    hinge("generate", "--run", str(run), "--sample-id", HELD_OUT, "--model", "ridge", "--out", str(ridge), "-q")
    hinge("eval", "--pred", str(prediction), "--truth", str(data / f"{HELD_OUT}.h5ad"), "--run", str(run))

    # hinge.yaml stays behind: it recorded the trained run's --corpus, and the baseline's backbone is random
    shutil.copytree(run, baseline, ignore=shutil.ignore_patterns("hinge.yaml", "checkpoints", "logs", "plots", "predictions", "eval"))
    untrained_config = args.out / "untrained.yaml"
    settings = load_config("tiny").to_dict()
    settings["model"]["direct_init"] = "zero"
    untrained_config.write_text(yaml.safe_dump(settings))
    hinge("pretrain-warmup", "--run", str(baseline), "--config", str(untrained_config), "--holdout", HELD_OUT, "--n-genes", "60",
          "--warmup-epochs", "0", "-q")
    untrained = baseline / "predictions" / f"{HELD_OUT}.h5ad"
    hinge("generate", "--run", str(baseline), "--sample-id", HELD_OUT, "--out", str(untrained),
          "--checkpoint", str(baseline / "checkpoints" / "warmup.safetensors"), "-q")
    hinge("eval", "--pred", str(untrained), "--truth", str(data / f"{HELD_OUT}.h5ad"), "--run", str(baseline), "-q")

    metrics = run / "eval" / HELD_OUT / "metrics.json"
    trained_scores = headline(metric_table(read_slide_metrics(metrics)))
    random_scores = headline(metric_table(read_slide_metrics(baseline / "eval" / HELD_OUT / "metrics.json")))
    ridge_scores = headline(read_baseline_metrics(metrics))
    units = expression_unit(**json.loads(metrics.read_text())["transform"])
    print(f"\nheld-out section {HELD_OUT}, values in {units}:")
    print(f"  {'':48}{'trained':>10}{'untrained':>12}{'ridge':>10}")
    for name in trained_scores:
        print(f"  {name:<48}{trained_scores[name]:>10.3f}{random_scores[name]:>12.3f}{ridge_scores[name]:>10.3f}")
    print(f"\ndone in {time.time() - started:.0f}s")
    print(f"  prediction  {prediction}")
    print(f"  report      {run / 'eval' / HELD_OUT / 'report.html'}  (open it in a browser; report.md beside it)")
    print(f"  maps        {run / 'eval' / HELD_OUT / 'maps'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
