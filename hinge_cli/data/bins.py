"""Visium HD bins pooled into Visium-sized pseudo-spots: the spot-level training data an HD run gives.

A pseudo-spot is a `pool_um` square of the bin grid (55 µm by default: a Visium spot's neighbourhood). Its counts
are the sums of its bins' counts, its centre the centre of its square, and it counts only when at least
`MIN_TISSUE_FRACTION` of the square's bins are in tissue with counts (a square cut by the tissue edge would be a
shallow, partial spot). The pooling is one pass of array operations and one sparse product, whatever the number of
bins; which bins each pseudo-spot holds is kept in `uns['pooling']`.

`generate --visium-hd` predicts the bins themselves: `visium_hd_bins` gives their positions, `bin_frame` the
full-resolution centres and the scale factors of that bin size that its output carries.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from hinge_cli.core.files import atomic_path
from hinge_cli.data.expression import Expression
from hinge_cli.data.samples import SampleSpec, visium_sample_id
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.prediction import SpatialFrame
from hinge_cli.formats.spaceranger import MATRIX_FILE, SHIPPED_IMAGES
from hinge_cli.formats.visium_hd import BINNED, Bins, bin_folder, read_bins
from hinge_cli.run.directory import Run

log = logging.getLogger(__name__)

POOL_UM = 55.0
MIN_TISSUE_FRACTION = 0.5  # of a pseudo-spot's bins, the share that must be in tissue with counts
SIZE_TOLERANCE = 0.02  # how far an image's size may be from what the scale factors say


def pool_windows(array_rc: np.ndarray, bin_um: float, pool_um: float) -> tuple[np.ndarray, np.ndarray]:
    """The `pool_um` squares of a bin grid: each square's (row, column) key, and each bin's square (an index into the
    keys). A square is floor(row / k), floor(column / k) with k = pool_um / bin_um bins a side (not always whole: a
    55 µm square of 16 µm bins holds 3 or 4 a side, and the squares tile the grid 55 µm apart on average)."""
    if not pool_um >= bin_um:
        raise HingeError(f"{setting('pool-um')} {pool_um:g} is smaller than the {bin_um:g} µm bins", f"pool at least {bin_um:g} µm")
    window = np.floor(np.asarray(array_rc) / (pool_um / bin_um)).astype(np.int64)
    keys, of_bin = np.unique(window, axis=0, return_inverse=True)
    return keys, of_bin.ravel()


def window_bins(keys: np.ndarray, bin_um: float, pool_um: float) -> np.ndarray:
    """How many bins of the grid each window of `pool_windows` (row, column key) spans: ceil((k+1)s) - ceil(ks) a side."""
    per_side = pool_um / bin_um
    spans = np.ceil((keys + 1) * per_side - 1e-9) - np.ceil(keys * per_side - 1e-9)
    return spans.prod(axis=1)


def pseudo_spot_names(keys: np.ndarray, pool_um: float) -> list[str]:
    """A pooled square's name from its window key: p55um_00012_00034."""
    return [f"p{pool_um:g}um_{r:05d}_{c:05d}" for r, c in keys]


def pool_bins(bins: Bins, pool_um: float = POOL_UM, min_tissue_fraction: float = MIN_TISSUE_FRACTION) -> ad.AnnData:
    """Pseudo-spots of `pool_um` squares of the bin grid: summed counts, centres in full-resolution pixels (obsm
    'spatial'), obs 'n_bins' and 'tissue_fraction', and each member bin's pseudo-spot in uns['pooling']."""
    keys, of_bin = pool_windows(bins.array_rc, bins.bin_um, pool_um)
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
    names = pseudo_spot_names(keys[kept], pool_um)
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


class HDBins(NamedTuple):
    """A Visium HD capture area's bins of one size, as the spots to predict."""

    outs: Path
    bin_um: int


@dataclass(frozen=True)
class HDImage:
    """The picture an HD sample is tiled on: its file, its pixels per full-resolution pixel, its size (width, height)."""

    path: Path
    scale: float
    size: tuple[int, int]

    def on(self, xy: np.ndarray) -> np.ndarray:
        """Which of the (N, 2) points, in this image's pixels, lie on it."""
        return (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < self.size[0]) & (xy[:, 1] < self.size[1])


def hd_image(outs: Path, bins: Bins, image: str | Path) -> HDImage:
    """`image` of an HD sample: the full-resolution image beside `outs/` (its size checked against the scale factors),
    or the hires/lowres PNG of the bin size."""
    folder = bin_folder(outs, bins.bin_um)
    fullres = str(image) not in SHIPPED_IMAGES
    if not fullres:
        path, scale = folder / "spatial" / SHIPPED_IMAGES[str(image)], bins.scalefactors.scale(str(image))
        if not path.is_file():
            raise HingeError(f"{path.parent} has no {path.name}", f"pass {setting('image')} with the full-resolution image given to Space Ranger")
    else:
        path, scale = Path(image), 1.0
        if not path.is_file():
            raise HingeError(f"image {path} does not exist", f"pass {setting('image')} with the full-resolution image, or hires or lowres")
    size = _image_size(path)
    if fullres:
        _check_fullres(path, size, folder, bins.scalefactors.tissue_hires_scalef)
    return HDImage(path, scale, size)


def _keep_on_image(sample: str, adata: ad.AnnData, picture: HDImage, outs: Path, what: str) -> ad.AnnData:
    """`adata` less the rows whose obsm['spatial'] lies off the picture (with a warning); none on it is an error."""
    on = picture.on(adata.obsm["spatial"])
    if not on.any():
        raise HingeError(f"no {what} of {outs} lies on {picture.path}", f"check that {setting('image')} is this capture area's image")
    if not on.all():
        log.warning("%s: %d of %d %s lie off %s and are left out", sample, int((~on).sum()), len(on), what, picture.path.name)
        adata = adata[on].copy()
    return adata


def _write_spots(run: Run, sample: str, adata: ad.AnnData, picture: HDImage, factors_mpp: float) -> SampleSpec:
    adata.uns["spaceranger"] = {"image": str(picture.path), "mpp": factors_mpp / picture.scale, "scale": picture.scale}
    spots = run.input_spots(sample)
    with atomic_path(spots) as tmp:
        adata.write_h5ad(tmp)
    return SampleSpec(sample, picture.path, spots, factors_mpp / picture.scale, None)


def visium_hd_sample(run: Run, outs: Path, image: str | Path = "hires", bin_um: int = 8, pool_um: float = POOL_UM,
                     sample_id: str | None = None) -> SampleSpec:
    """The pseudo-spots of a Visium HD `outs/` folder, written to `<run>/inputs/<sample>.h5ad` in the pixels of
    `image` (the full-resolution image beside `outs/`, or the hires/lowres PNG of that bin size)."""
    sample = sample_id or visium_sample_id(outs)
    bins = read_bins(Path(outs), bin_um)
    picture = hd_image(outs, bins, image)
    pooled = pool_bins(bins, pool_um)
    pooled.obsm["spatial"] = pooled.obsm["spatial"] * picture.scale
    pooled = _keep_on_image(sample, pooled, picture, outs, "pseudo-spots")
    log.info("%s: %d pseudo-spots of %g µm from %d µm bins", sample, pooled.n_obs, pool_um, bin_um)
    return _write_spots(run, sample, pooled, picture, bins.scalefactors.microns_per_pixel)


def visium_hd_bins(run: Run, outs: Path, image: str | Path = "hires", bin_um: int = 16,
                   sample_id: str | None = None) -> SampleSpec:
    """Every in-tissue bin of one size, as the spots `generate` predicts: positions only (Space Ranger's barcodes,
    centres in `image`'s pixels) in `<run>/inputs/<sample>.h5ad`; bins off the image are left out with a warning.
    The sample is `<folder>_<NNN>um` unless named, apart from the pseudo-spots `tile --visium-hd` made of the same
    capture area; a training sample's name is refused, since its spot file would be replaced."""
    sample = sample_id or f"{visium_sample_id(outs)}_{bin_um:03d}um"
    if run.sample(sample).get("expression"):
        raise HingeError(f"sample {sample} holds training spots of {run.root}, which its bins' positions would replace",
                         f"give the bins another {setting('sample-id')}")
    bins = read_bins(Path(outs), bin_um, counts=False)
    picture = hd_image(outs, bins, image)
    inside = np.flatnonzero(bins.in_tissue)
    if not len(inside):
        raise HingeError(f"no {bin_um} µm bin of {outs} is marked in_tissue", "check the positions file Space Ranger wrote")
    positions = ad.AnnData(obs=pd.DataFrame(index=pd.Index(bins.barcodes[inside].astype(str))))
    positions.obsm["spatial"] = bins.centres_fullres[inside] * picture.scale
    positions = _keep_on_image(sample, positions, picture, outs, "bins")
    log.info("%s: %d in-tissue bins of %d µm to predict", sample, positions.n_obs, bin_um)
    return _write_spots(run, sample, positions, picture, bins.scalefactors.microns_per_pixel)


def is_hd_folder(path: Path) -> bool:
    """Whether `path` is a Visium HD outs/ folder (it holds binned_outputs/)."""
    return Path(path).is_dir() and (Path(path) / BINNED).is_dir()


def hd_truth(outs: Path, bin_um: int) -> Expression:
    """The measured counts of every bin of one size that has any, as eval's truth: barcodes, totals over all genes,
    centres in full-resolution pixels (the frame of a bin prediction's obsm['spatial'])."""
    bins = read_bins(Path(outs), bin_um)
    counts = bins.counts
    rows = pd.Index(bins.barcodes).get_indexer(counts.obs_names)
    if (rows < 0).any():
        raise HingeError(f"{int((rows < 0).sum())} bins of {bin_folder(outs, bin_um) / MATRIX_FILE} are not in its positions file",
                         "copy the whole binned_outputs/ folder Space Ranger wrote")
    matrix = sparse.csr_matrix(counts.X)
    return Expression([str(b) for b in counts.obs_names], [str(g) for g in counts.var_names], matrix,
                      np.asarray(matrix.sum(axis=1)).ravel(), bins.centres_fullres[rows])


BARCODE = re.compile(r"s_(\d{3})um_(\d+)_(\d+)-\d+$")


def bin_grid(barcodes: list[str]) -> np.ndarray:
    """(N, 2) row, column on the bin grid, read from Space Ranger's bin barcodes (s_016um_00123_00456-1)."""
    matches = [BARCODE.match(b) for b in barcodes]
    bad = next((b for b, m in zip(barcodes, matches, strict=True) if m is None), None)
    if bad is not None:
        raise HingeError(f"spot {bad} is not a Visium HD bin barcode (s_016um_00123_00456-1)",
                         f"pool predictions made by {command('generate')} {setting('visium-hd')}")
    return np.array([[int(m.group(2)), int(m.group(3))] for m in matches], dtype=np.int64).reshape(-1, 2)


def bin_frame(outs: Path, bin_um: int, barcodes: list[str]) -> tuple[np.ndarray, SpatialFrame]:
    """Where a bin prediction's `barcodes` lie, as Visium writes it: centres in full-resolution pixels (obsm['spatial'])
    and the bin size's own scale factors and hires/lowres PNGs (uns['spatial'])."""
    from PIL import Image

    bins = read_bins(Path(outs), bin_um, counts=False)
    rows = pd.Index(bins.barcodes).get_indexer(barcodes)
    if (rows < 0).any():
        raise HingeError(f"{int((rows < 0).sum())} predicted bins are not in {outs}'s {bin_um} µm positions",
                         f"predict this capture area again with {setting('overwrite')}")
    images = {}
    for name, file in SHIPPED_IMAGES.items():
        path = bin_folder(outs, bin_um) / "spatial" / file
        if path.is_file():
            with Image.open(path) as png:
                images[name] = np.asarray(png.convert("RGB"))
    if "hires" not in images:
        raise HingeError(f"{bin_folder(outs, bin_um) / 'spatial'} has no {SHIPPED_IMAGES['hires']}",
                         "copy the whole binned_outputs/ folder Space Ranger wrote")
    return bins.centres_fullres[rows], SpatialFrame(images, asdict(bins.scalefactors))
