"""Convert the HER2ST data (shared/data/her2st) into a HEST-like folder hinge reads.

    python benchmarks/her2st/prepare.py --out data/her2st-hest

writes
    wsis/C2.tif ... C6.tif     pyramidal JPEG-compressed TIFFs with µm/px in their tags
    st/<ID>.h5ad               all 36 sections: raw counts of the selected (under-tissue)
                               spots, obsm['spatial'] = spot centres in image pixels
    metadata/<ID>.json         pixel size and provenance
    patient_c.csv              sample sheet for `hinge tile --samples`
    corpus.txt                 the 31 other-patient .h5ad files, for `pretrain-warmup --corpus`

It never writes into the source folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse

from hinge_cli.core.files import atomic_path
from hinge_cli.slide.writer import write_pyramidal_tiff

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "her2st"
PATIENT_C = ("C2", "C3", "C4", "C5", "C6")
MPP = 0.69  # fit of pixel_x against array x: ~291 px per 200 µm step (data README)


def section(source: Path, sid: str) -> ad.AnnData:
    """Selected spots of one section with raw counts and pixel coordinates."""
    counts = pd.read_csv(source / "counts" / f"{sid}.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(source / "spots" / f"{sid}_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = [f"{int(x)}x{int(y)}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    spots = spots[spots.index.isin(counts.index)]
    counts = counts.loc[spots.index]
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=spots[["x", "y", "new_x", "new_y"]].rename(columns={"x": "array_x", "y": "array_y"}),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.var_names_make_unique()
    adata.obsm["spatial"] = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    adata.uns["her2st"] = {"section": sid, "patient": sid[0], "mpp": MPP, "spot_diameter_um": 100.0}
    return adata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the shared her2st folder (read-only)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the HEST-like folder")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    source, out = args.source.resolve(), args.out.resolve()
    if not (source / "counts").is_dir():
        sys.exit(f"error: {source} does not look like the her2st data folder (no counts/); pass --source")
    if out == source or source in out.parents:
        sys.exit("error: --out must be outside the source folder, which is read-only")
    for sub in ("wsis", "st", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sections = sorted(p.name.split(".")[0] for p in (source / "counts").glob("*.tsv.gz"))
    for sid in sections:
        target = out / "st" / f"{sid}.h5ad"
        if target.exists() and not args.overwrite:
            continue
        started = time.time()
        adata = section(source, sid)
        with atomic_path(target) as tmp:
            adata.write_h5ad(tmp)
        meta = {"section": sid, "pixel_size_um": MPP, "spot_diameter_um": 100.0, "n_spots": adata.n_obs, "source": str(source)}
        (out / "metadata" / f"{sid}.json").write_text(json.dumps(meta, indent=1))
        print(f"{sid}: {adata.n_obs} spots x {adata.n_vars} genes ({time.time() - started:.1f}s)")
    for sid in PATIENT_C:
        target = out / "wsis" / f"{sid}.tif"
        if target.exists() and not args.overwrite:
            continue
        started = time.time()
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(source / "images" / f"{sid}.jpg") as image:
            rgb = np.asarray(image.convert("RGB"))
        write_pyramidal_tiff(target, rgb, MPP)
        print(f"{sid}: slide {rgb.shape[1]}x{rgb.shape[0]} px -> {target.name} ({time.time() - started:.1f}s)")
    rows = [f"{sid},wsis/{sid}.tif,st/{sid}.h5ad,{MPP}" for sid in PATIENT_C]
    (out / "patient_c.csv").write_text("sample_id,slide,spots,mpp\n" + "\n".join(rows) + "\n")
    corpus = [str(out / "st" / f"{sid}.h5ad") for sid in sections if sid[0] != "C"]
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    print(f"wrote {out}: {len(sections)} sections, {len(PATIENT_C)} slides, {len(corpus)} corpus files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
