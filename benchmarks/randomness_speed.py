"""Time of the sampler's per-spot randomness: the counter-based generator against a generator seeded per spot.

    .venv/bin/python benchmarks/randomness_speed.py [--spots 5000] [--samples 8] [--genes 200] [--batch 64] [--repeats 3]

Both give each spot the same draws however spots are batched; the old way needs a Python loop
over spots for it. Timed for the whole slide in one call, and in `generate`'s batches of spots.
Each figure is the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from hinge_cli.model.randomness import spot_randomness


def seeded_per_spot(spot_index: Tensor, seed: int, n_samples: int, n_genes: int) -> tuple[Tensor, Tensor, Tensor]:
    """The sampler's former loop (plus the reveal noise it now needs): one numpy generator per (seed, spot)."""
    keys, fill, reveal = [], [], []
    for spot in spot_index.tolist():
        rng = np.random.default_rng([seed, spot])
        keys.append(rng.random((n_samples, n_genes)))
        fill.append(rng.standard_normal((n_samples, n_genes)))
        reveal.append(rng.standard_normal((n_samples, n_genes)))
    order = torch.from_numpy(np.concatenate(keys))
    return order.argsort(dim=1).argsort(dim=1), torch.from_numpy(np.concatenate(fill)), torch.from_numpy(np.concatenate(reveal))


def best_seconds(draw: Callable[[Tensor, int, int, int], object], spots: int, batch: int, samples: int, genes: int,
                 repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, spots, batch):
            draw(torch.arange(start, min(spots, start + batch)), 0, samples, genes)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spots", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="spots per call in the batched timing (generate's default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.spots} spots x {args.samples} samples x {args.genes} genes, torch {torch.get_num_threads()} threads")
    print(f"{'spots per call':>14} {'seeded per spot s':>17} {'counter-based s':>15} {'speed-up':>8}")
    for batch in (args.spots, args.batch):
        old = best_seconds(seeded_per_spot, args.spots, batch, args.samples, args.genes, args.repeats)
        new = best_seconds(spot_randomness, args.spots, batch, args.samples, args.genes, args.repeats)
        print(f"{batch:14d} {old:17.3f} {new:15.3f} {old / new:8.1f}")


if __name__ == "__main__":
    main()
