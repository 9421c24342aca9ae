"""Epoch time and peak memory of warm-up and training, `small` config, HER2ST patient C.

    python benchmarks/train_speed.py --hest data/her2st-hest [--run bench-out/train] [--epochs 3] [--device cpu]

Trains on four sections (C3-C6; C2 held out) with the default encoder's features and a
random backbone (speed does not depend on where the weights came from). The run's
tiles and embeddings are made on first use and reused after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from hinge_cli.data.sources import read_sample_sheet
from hinge_cli.run.directory import Run
from hinge_cli.stages.embed import embed_samples
from hinge_cli.stages.tile import tile_samples
from hinge_cli.stages.train import pretrain_warmup, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hest", type=Path, required=True, help="folder written by benchmarks/her2st/prepare.py")
    parser.add_argument("--run", type=Path, default=Path("bench-out/train"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run = Run(args.run)
    cfg = run.config("small", {"train": {"device": args.device, "epochs": args.epochs}})
    tile_samples(run, read_sample_sheet(args.hest / "patient_c.csv"), cfg.tile)
    embed_samples(run, cfg.embed)
    for stale in ("checkpoints", "logs"):
        shutil.rmtree(run.root / stale, ignore_errors=True)
    started = time.time()
    cfg.warmup.holdout, cfg.warmup.n_genes, cfg.warmup.epochs = ["C2"], args.genes, 1
    pretrain_warmup(run, cfg)
    warm = time.time() - started
    started = time.time()
    train(run, cfg)
    total = time.time() - started
    history = [json.loads(line) for line in run.log("train").read_text().splitlines()]
    meta = json.loads(run.checkpoint("best").with_suffix(".json").read_text())["extra"]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; small config, "
          f"{meta['n_train_spots']} training spots, {args.genes} genes")
    print(f"warm-up (1 epoch, incl. data assembly): {warm:.1f}s")
    for r in history:
        print(f"train epoch {r['epoch']}: {r['seconds']:.1f}s  peak memory {r['peak_memory_mb']:.0f} MiB  "
              f"train loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}")
    print(f"train total (incl. data assembly and checkpoints): {total:.1f}s")


if __name__ == "__main__":
    main()
