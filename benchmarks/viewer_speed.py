"""Size and load time of `hinge view`'s page at 1k, 5k and 50k spots.

    .venv/bin/python benchmarks/viewer_speed.py [--spots 1000,5000,50000] [--genes 300]

Each size is a synthetic prediction (`make_synthetic_prediction`: X, std, q05, q95 and two draws, smooth
values over a painted tissue image) turned into a page by `hinge view`; the page is then opened in headless
Chromium (Debian's, through selenium) until its script has unpacked the numbers and drawn every spot.
Printed: the .h5ad and page sizes, the seconds `hinge view` took, and the seconds to the first full drawing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import chromium, console_errors, open_page  # noqa: E402

from hinge_cli.eval.viewer import build_view, write_view  # noqa: E402
from hinge_cli.synthetic.slides import make_synthetic_prediction  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spots", default="1000,5000,50000")
    parser.add_argument("--genes", type=int, default=300)
    args = parser.parse_args()
    print(f"{'spots':>7} {'genes':>5} {'h5ad MB':>8} {'page MB':>8} {'view s':>7} {'load + draw s':>13}")
    with tempfile.TemporaryDirectory() as tmp, chromium() as driver:
        for n in (int(s) for s in args.spots.split(",")):
            pred = make_synthetic_prediction(Path(tmp) / f"p{n}.h5ad", n_spots=n, n_genes=args.genes, seed=1)
            started = time.perf_counter()
            page = write_view(Path(tmp) / f"p{n}.html", build_view(pred), overwrite=True)
            made = time.perf_counter() - started
            shown = min(open_page(driver, page, timeout=120) for _ in range(3))
            drawn = driver.execute_script("return window.hinge.drawn")
            assert drawn == n and not console_errors(driver), (drawn, console_errors(driver))
            print(f"{n:7d} {args.genes:5d} {pred.stat().st_size / 2**20:8.1f} {page.stat().st_size / 2**20:8.1f} {made:7.1f} {shown:13.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
