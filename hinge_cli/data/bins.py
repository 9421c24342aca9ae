"""Visium HD bins pooled into Visium-sized pseudo-spots: the spot-level training data an HD run gives.

A pseudo-spot is a `pool_um` square of the bin grid (55 µm by default: a Visium spot's neighbourhood). Its counts
are the sums of its bins' counts, its centre the centre of its square, and it counts only when at least
`MIN_TISSUE_FRACTION` of the square's bins are in tissue with counts (a square cut by the tissue edge would be a
shallow, partial spot). The pooling is one pass of array operations and one sparse product, whatever the number of
bins; which bins each pseudo-spot holds is kept in `uns['pooling']`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from hinge_cli.core.files import atomic_path
from hinge_cli.data.samples import SampleSpec, visium_sample_id
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.spaceranger import SHIPPED_IMAGES
from hinge_cli.formats.visium_hd import Bins, bin_folder, read_bins
from hinge_cli.run.directory import Run

log = logging.getLogger(__name__)

POOL_UM = 55.0
MIN_TISSUE_FRACTION = 0.5  # of a pseudo-spot's bins, the share that must be in tissue with counts
SIZE_TOLERANCE = 0.02  # how far an image's size may be from what the scale factors say


def pool_bins(bins: Bins, pool_um: float = POOL_UM, min_tissue_fraction: float = MIN_TISSUE_FRACTION) -> ad.AnnData:
    """Pseudo-spots of `pool_um` squares of the bin grid: summed counts, centres in full-resolution pixels (obsm
    'spatial'), obs 'n_bins' and 'tissue_fraction', and each member bin's pseudo-spot in uns['pooling']."""
    if not pool_um >= bins.bin_um:
        raise HingeError(f"{setting('pool-um')} {pool_um} is smaller than the {bins.bin_um} µm bins", f"pool at least {bins.bin_um} µm")
    per_side = pool_um / bins.bin_um
    window = np.floor(bins.array_rc / per_side).astype(np.int64)
    keys, of_bin = np.unique(window, axis=0, return_inverse=True)
    of_bin = of_bin.ravel()
    row = pd.Index(bins.counts.obs_names).get_indexer(bins.barcodes)
    counted = bins.in_tissue & (row >= 0)
    total = np.bincount(of_bin, minlength=len(keys))
    inside = np.bincount(of_bin[counted], minlength=len(keys))
    fraction = inside / total
    kept = np.flatnonzero(fraction >= min_tissue_fraction)
    if not len(kept):
        raise HingeError(f"no {pool_um:g} µm square of the {bins.bin_um} µm bins has {min_tissue_fraction:.0%} of its bins in tissue",
                         "check that the bins are marked in_tissue, or pool a larger square")
    spot_of_window = np.full(len(keys), -1, np.int64)
    spot_of_window[kept] = np.arange(len(kept))
    member = spot_of_window[of_bin]
    take = counted & (member >= 0)
    indicator = sparse.csr_matrix((np.ones(int(take.sum()), np.int64), (member[take], row[take])),
                                  shape=(len(kept), bins.counts.n_obs))
    summed = (indicator @ sparse.csr_matrix(bins.counts.X)).astype(np.int64)
    centres = np.stack([np.bincount(of_bin, bins.centres_fullres[:, axis], len(keys)) for axis in (0, 1)], axis=1)
    centres = centres[kept] / total[kept, None]
    names = [f"p{pool_um:g}um_{r:05d}_{c:05d}" for r, c in keys[kept]]
    pooled = ad.AnnData(X=sparse.csr_matrix(summed), obs=pd.DataFrame({"n_bins": inside[kept], "tissue_fraction": fraction[kept]},
                                                                      index=pd.Index(names)), var=bins.counts.var.copy())
    pooled.obsm["spatial"] = centres
    pooled.uns["pooling"] = {"bin_um": bins.bin_um, "pool_um": float(pool_um), "min_tissue_fraction": min_tissue_fraction,
                             "bins": bins.barcodes[take].astype(str), "spot": member[take]}
    return pooled


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header: TIFF (BigTIFF too) by tifffile, the rest by Pillow."""
    if Path(path).suffix.lower() in (".tif", ".tiff", ".btf"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            height, width = tif.pages[0].shape[:2]
        return int(width), int(height)
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _check_fullres(path: Path, size: tuple[int, int], folder: Path, factors_hires: float) -> None:
    """A full-resolution image (`size`: its width, height) must be the one the scale factors describe: its size times
    tissue_hires_scalef is the hires PNG's size."""
    from PIL import Image

    hires = folder / "spatial" / SHIPPED_IMAGES["hires"]
    if not hires.is_file():
        return
    with Image.open(hires) as png:
        expected = np.array(png.size) / factors_hires
    size = np.array(size)
    off = np.abs(size / expected - 1)
    if (off > SIZE_TOLERANCE).any():
        raise HingeError(f"{path} is {size[0]} x {size[1]} px, but the scale factors (tissue_hires_scalef "
                         f"{factors_hires:g} and the {hires.name} of {hires.parent}) describe a {expected[0]:.0f} x {expected[1]:.0f} px image",
                         f"pass {setting('image')} with the full-resolution image given to Space Ranger for this capture area")


def visium_hd_sample(run: Run, outs: Path, image: str | Path = "hires", bin_um: int = 8, pool_um: float = POOL_UM,
                     sample_id: str | None = None) -> SampleSpec:
    """The pseudo-spots of a Visium HD `outs/` folder, written to `<run>/inputs/<sample>.h5ad` in the pixels of
    `image` (the full-resolution image beside `outs/`, or the hires/lowres PNG of that bin size)."""
    sample = sample_id or visium_sample_id(outs)
    bins = read_bins(Path(outs), bin_um)
    folder = bin_folder(outs, bin_um)
    factors = bins.scalefactors
    fullres = str(image) not in SHIPPED_IMAGES
    if not fullres:
        path, scale = folder / "spatial" / SHIPPED_IMAGES[str(image)], factors.scale(str(image))
        if not path.is_file():
            raise HingeError(f"{path.parent} has no {path.name}", f"pass {setting('image')} with the full-resolution image given to Space Ranger")
    else:
        path, scale = Path(image), 1.0
        if not path.is_file():
            raise HingeError(f"image {path} does not exist", f"pass {setting('image')} with the full-resolution image, or hires or lowres")
    width, height = _image_size(path)
    if fullres:
        _check_fullres(path, (width, height), folder, factors.tissue_hires_scalef)
    pooled = pool_bins(bins, pool_um)
    pooled.obsm["spatial"] = pooled.obsm["spatial"] * scale
    xy = pooled.obsm["spatial"]
    on = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)
    if not on.any():
        raise HingeError(f"no pseudo-spot of {outs} lies on {path}", f"check that {setting('image')} is this capture area's image")
    if not on.all():
        log.warning("%s: %d of %d pseudo-spots lie off %s and are left out", sample, int((~on).sum()), len(on), path.name)
        pooled = pooled[on].copy()
    pooled.uns["spaceranger"] = {"image": str(path), "mpp": factors.microns_per_pixel / scale, "scale": scale}
    spots = run.input_spots(sample)
    with atomic_path(spots) as tmp:
        pooled.write_h5ad(tmp)
    log.info("%s: %d pseudo-spots of %g µm from %d µm bins", sample, pooled.n_obs, pool_um, bin_um)
    return SampleSpec(sample, path, spots, factors.microns_per_pixel / scale, None)
