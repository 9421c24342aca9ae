"""How long pooling Visium HD bins into pseudo-spots takes at the size of a whole capture area.

A 6.5 x 6.5 mm capture area holds about 660,000 bins of 8 µm (812 x 812). This makes that many bins in memory
(in tissue: a disc over 70% of the area; 50 genes, a few UMI per bin, sparse), pools them into 55 µm
pseudo-spots with `hinge_cli.data.bins.pool_bins`, and prints the time and peak memory against the target
(issue 33: <= 60 s on 2 CPU cores). Reading the files is not timed here: it is pyarrow's and h5py's.

    python benchmarks/visium_hd_pool.py [--side-mm 6.5] [--bin-um 8] [--genes 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from hinge_cli.data.bins import pool_bins
from hinge_cli.formats.visium_hd import Bins, HDScaleFactors, hd_barcode

TARGET_S = 60.0


def capture_area(side_mm: float, bin_um: int, n_genes: int, seed: int = 0) -> Bins:
    rng = np.random.default_rng(seed)
    cells = int(side_mm * 1000 // bin_um)
    row, col = (a.ravel() for a in np.mgrid[0:cells, 0:cells])
    in_tissue = np.hypot(row - cells / 2, col - cells / 2) < 0.47 * cells
    on = np.flatnonzero(in_tissue)
    counts = sparse.random(len(on), n_genes, density=0.1, format="csr", random_state=seed,
                           data_rvs=lambda n: rng.integers(1, 4, n)).astype(np.int32)
    barcodes = hd_barcode(bin_um, row, col)
    matrix = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(barcodes[on].astype(str))),
                        var=pd.DataFrame(index=pd.Index([f"G{i}" for i in range(n_genes)])))
    mpp = 0.2737
    centres = np.stack([(col + 0.5) * bin_um / mpp, (row + 0.5) * bin_um / mpp], axis=1)
    return Bins(bin_um, matrix, barcodes, in_tissue, np.stack([row, col], axis=1), centres,
                HDScaleFactors(float(bin_um), mpp, bin_um / mpp, 0.1, 0.01))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side-mm", type=float, default=6.5)
    parser.add_argument("--bin-um", type=int, default=8)
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--pool-um", type=float, default=55.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    bins = capture_area(args.side_mm, args.bin_um, args.genes)
    made = time.perf_counter() - started
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        pooled = pool_bins(bins, args.pool_um)
        times.append(time.perf_counter() - started)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    best = min(times)
    print(f"{len(bins.barcodes):,} bins of {args.bin_um} µm ({int(bins.in_tissue.sum()):,} in tissue, {args.genes} genes; "
          f"made in {made:.1f} s) -> {pooled.n_obs:,} pseudo-spots of {args.pool_um:g} µm")
    print(f"pooling: best {best:.2f} s of {args.repeats} (median {float(np.median(times)):.2f} s); target <= {TARGET_S:g} s: "
          f"{best / TARGET_S:.3f} of it; peak memory of the process {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
