"""Small synthetic datasets in other tools' layouts (Space Ranger, HEST-1k, TRIDENT), for tests and demos.

Each is drawn so that a reader's mistakes show: the tissue is a disc on a white background,
so spot coordinates that were scaled wrongly land on white; the count matrix lists its spots
in a different order from the positions file; two genes share a symbol; and only the spots
on the tissue have counts, as in Space Ranger's filtered matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse

from hinge_cli.core.files import atomic_path
from hinge_cli.formats.hest import PatchFile, write_hest_metadata, write_patch_file
from hinge_cli.formats.spaceranger import (
    ScaleFactors,
    SpaceRangerOuts,
    SpotPositions,
    write_spaceranger,
)
from hinge_cli.formats.visium_hd import Bins, HDScaleFactors, hd_barcode, write_bins, write_feature_slice
from hinge_cli.slide.writer import write_pyramidal_tiff

BACKGROUND = (244, 242, 246)
TISSUE = (205, 120, 175)
PITCH_UM = 100.0  # Visium's centre-to-centre spot distance
SPOT_UM = 55.0


@dataclass(frozen=True)
class SyntheticTissue:
    """Where the drawn tissue is, in the pixels of the image it was drawn in."""

    centre: tuple[float, float]  # x, y
    radius: float

    def contains(self, xy: np.ndarray) -> np.ndarray:
        return np.hypot(xy[:, 0] - self.centre[0], xy[:, 1] - self.centre[1]) < self.radius


@dataclass(frozen=True)
class SyntheticVisium:
    outs: Path
    fullres: Path | None  # the full-resolution image, when one was written
    mpp_fullres: float
    n_spots: int
    n_in_tissue: int
    tissue: SyntheticTissue  # in full-resolution pixels


def _tissue_image(rng: np.random.Generator, side: int, tissue: SyntheticTissue, grain: int = 4) -> np.ndarray:
    """A pink disc with blotchy texture (`grain`-pixel blocks) on a white background, side x side RGB."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    inside = np.hypot(xx - tissue.centre[0], yy - tissue.centre[1]) < tissue.radius
    blocks = -(-side // grain)
    texture = np.kron(rng.normal(0, 18, (blocks, blocks)), np.ones((grain, grain), np.float32))[:side, :side]
    image = np.where(inside[..., None], np.asarray(TISSUE, np.float32) + texture[..., None], np.asarray(BACKGROUND, np.float32))
    return np.clip(image, 0, 255).astype(np.uint8)


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Distinct Visium-like barcodes: 16 bases and the '-1' suffix."""
    seen: set[str] = set()
    while len(seen) < n:
        seen.add("".join(rng.choice(list("ACGT"), 16)) + "-1")
    return rng.permutation(sorted(seen)).astype(object)


def _visium_lattice(side: int, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Visium's hexagonal spot grid: array (row, col) with row + col even, and x, y centres."""
    row_step = pitch * math.sqrt(3) / 2
    cells = [
        (row, col)
        for row in range(int((side - pitch) / row_step) + 1)
        for col in range(int(2 * (side - pitch) / pitch) + 1)
        if (row + col) % 2 == 0
    ]
    array_rc = np.array(cells, np.int64)
    centres = np.stack([pitch / 2 + array_rc[:, 1] * pitch / 2, pitch / 2 + array_rc[:, 0] * row_step], axis=1)
    return array_rc, centres


def _counts(rng: np.random.Generator, centres: np.ndarray, side: int, n_genes: int) -> sparse.csr_matrix:
    """Poisson counts whose rates follow position, so that neighbouring spots are alike."""
    programme = rng.gamma(1.0, 2.0, (3, n_genes))
    weights = np.stack([centres[:, 0] / side, centres[:, 1] / side, np.ones(len(centres))], axis=1)
    return sparse.csr_matrix(rng.poisson(weights @ programme).astype(np.int32))


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    """A square image scaled by `scale` (box filter), as Space Ranger makes its hires and lowres PNGs."""
    side = max(round(image.shape[0] * scale), 1)
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX))


def make_spaceranger_outs(
    outs: Path,
    side_px: int = 1200,
    mpp: float = 2.0,
    hires_scalef: float = 0.5,
    lowres_scalef: float = 0.15,
    legacy_positions: bool = False,
    fullres: Path | None = None,
    n_genes: int = 20,
    seed: int = 0,
) -> SyntheticVisium:
    """An outs/ folder in Space Ranger's layout; `fullres` also writes the full-resolution image there.

    The hires and lowres PNGs are the full-resolution drawing scaled by their scale factors, and
    the full-resolution image is a pyramidal TIFF carrying `mpp` in its tags.
    """
    rng = np.random.default_rng(seed)
    tissue = SyntheticTissue((side_px * 0.5, side_px * 0.45), side_px * 0.3)
    drawing = _tissue_image(rng, side_px, tissue)
    array_rc, centres = _visium_lattice(side_px, PITCH_UM / mpp)
    in_tissue = tissue.contains(centres).astype(np.int8)
    barcodes = _barcodes(rng, len(centres))
    on = np.flatnonzero(in_tissue)
    order = on[np.argsort(barcodes[on])]  # the matrix lists spots sorted by barcode
    genes = [f"GENE{i}" for i in range(n_genes - 1)] + ["GENE0"]  # one symbol twice, as in real references
    with warnings.catch_warnings():  # the duplicated symbol is deliberate
        warnings.simplefilter("ignore", UserWarning)
        counts = ad.AnnData(
            X=_counts(rng, centres[order], side_px, n_genes),
            obs=pd.DataFrame(index=pd.Index(barcodes[order].astype(str))),
            var=pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(n_genes)]}, index=pd.Index(genes)),
        )
    factors = ScaleFactors(SPOT_UM / mpp, hires_scalef, lowres_scalef, 1.6 * SPOT_UM / mpp)
    data = SpaceRangerOuts(counts, SpotPositions(barcodes, in_tissue, array_rc, centres), factors)
    images = {"hires": resized(drawing, hires_scalef), "lowres": resized(drawing, lowres_scalef)}
    write_spaceranger(outs, data, images, legacy_positions)
    if fullres is not None:
        write_pyramidal_tiff(fullres, drawing, mpp)
    return SyntheticVisium(Path(outs), fullres, mpp, len(barcodes), len(on), tissue)


@dataclass(frozen=True)
class SyntheticHest:
    root: Path
    ids: list[str]
    mpps: dict[str, float]  # the metadata's pixel_size_um_estimated per id
    n_spots: dict[str, int]


def make_hest_folder(root: Path, ids: tuple[str, ...] = ("TENX001", "MEND002"), side_px: int = 512, seed: int = 0) -> SyntheticHest:
    """A HEST-1k-like folder: wsis/<id>.tif, st/<id>.h5ad and metadata/<id>.json per id.

    Each slide's TIFF tags carry a slightly wrong µm/px (`pixel_size_um_embedded`), as often in
    HEST-1k; the metadata's `pixel_size_um_estimated` is the true one.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    mpps, n_spots = {}, {}
    for i, sample_id in enumerate(ids):
        mpp = 0.5 + 0.25 * i
        tissue = SyntheticTissue((side_px / 2, side_px / 2), side_px * 0.4)
        write_pyramidal_tiff(root / "wsis" / f"{sample_id}.tif", _tissue_image(rng, side_px, tissue), mpp * 1.1)
        _, centres = _visium_lattice(side_px, PITCH_UM / mpp)
        centres = centres[tissue.contains(centres)]
        adata = ad.AnnData(X=_counts(rng, centres, side_px, 12), obs=pd.DataFrame(index=[f"{sample_id}_{k}" for k in range(len(centres))]))
        adata.obsm["spatial"] = centres
        with atomic_path(root / "st" / f"{sample_id}.h5ad") as tmp:
            adata.write_h5ad(tmp)
        metadata = {
            "id": sample_id,
            "st_technology": "Visium",
            "pixel_size_um_estimated": mpp,
            "pixel_size_um_embedded": mpp * 1.1,
            "spots_under_tissue": len(centres),
            "fullres_px_width": side_px,
            "fullres_px_height": side_px,
        }
        write_hest_metadata(root, sample_id, metadata)
        mpps[sample_id], n_spots[sample_id] = mpp, len(centres)
    return SyntheticHest(root, list(ids), mpps, n_spots)


def make_trident_features(
    path: Path,
    spots: Path,
    mpp: float,
    dim: int = 16,
    patch_px: int = 224,
    target_mpp: float = 0.5,
    features_name: str = "features",
    hest_barcodes: bool = True,
    seed: int = 0,
) -> PatchFile:
    """Patch features of a spot file's spots in TRIDENT's layout (top-left coords, magnification attrs)."""
    adata = ad.read_h5ad(spots)
    size_level0 = patch_px * target_mpp / mpp
    level0_mag = 10.0 / mpp
    patches = PatchFile(
        barcodes=[str(b) for b in adata.obs_names],
        centres=np.asarray(adata.obsm["spatial"], np.float64)[:, :2],
        patch_size_level0=size_level0,
        features=np.random.default_rng(seed).normal(size=(adata.n_obs, dim)).astype(np.float32),
        attrs={"patch_size": patch_px, "level0_magnification": level0_mag, "target_magnification": 10.0 / target_mpp},
    )
    write_patch_file(path, patches, features_name, hest_barcodes)
    return patches


@dataclass(frozen=True)
class SyntheticHD:
    outs: Path
    fullres: Path | None
    mpp: float  # of the full-resolution image
    tissue: SyntheticTissue | None  # in full-resolution pixels, for the disc of `make_visium_hd`
    counts_2um: np.ndarray  # (rows, cols, genes): every 2 µm bin's counts, from which the larger bins are summed


def make_visium_hd(outs: Path, side_um: int = 480, mpp: float = 1.0, fullres: Path | None = None, n_genes: int = 12,
                   seed: int = 0, sizes: tuple[int, ...] = (2, 8, 16), hires_scalef: float = 0.5,
                   lowres_scalef: float = 0.1, csv_positions: bool = False) -> SyntheticHD:
    """A Visium HD outs/ folder: `binned_outputs/square_<size>um/` for each size, whose counts are the sums of one set
    of 2 µm bins (as Space Ranger bins them), parquet positions (or the CSV layout), scale factors and PNGs; `fullres`
    also writes the full-resolution image. The tissue is a disc, its expression smooth gradients across it."""
    rng = np.random.default_rng(seed)
    side_px = round(side_um / mpp)
    tissue = SyntheticTissue((side_px * 0.5, side_px * 0.5), side_px * 0.35)
    drawing = _tissue_image(rng, side_px, tissue)
    n = side_um // 2
    row, col = (a.ravel() for a in np.mgrid[0:n, 0:n])
    programme = rng.gamma(1.0, 2.0, (3, n_genes))
    weights = np.stack([col / n, row / n, np.ones(n * n)], axis=1)
    inside = tissue.contains(np.stack([(col + 0.5) * 2 / mpp, (row + 0.5) * 2 / mpp], axis=1))
    fine = (rng.poisson(0.05 * weights @ programme).astype(np.int32) * inside[:, None]).reshape(n, n, n_genes)
    genes = pd.Index([f"GENE{i}" for i in range(n_genes)])
    _write_hd(outs, drawing, mpp, fine, genes, tissue.contains, sizes, (hires_scalef, lowres_scalef), csv_positions, fullres)
    return SyntheticHD(Path(outs), fullres, mpp, tissue, fine)


def make_visium_hd_section(outs: Path, size_px: int = 2048, mpp: float = 0.5, fullres: Path | None = None, n_genes: int = 30,
                           seed: int = 0, sizes: tuple[int, ...] = (2, 8, 16), umi_per_2um: float = 4.0) -> SyntheticHD:
    """A Visium HD outs/ folder of a synthetic H&E section (`synthetic.slides`: tumour, stroma, immune and fat painted
    as in H&E), each 2 µm bin counted from what lies in it and around it, so a model that reads the histology finds
    real signal at every bin size. `umi_per_2um`: mean UMI of a 2 µm bin in tissue (about 16 µm: 250)."""
    from hinge_cli.synthetic.slides import hd_section

    rng = np.random.default_rng(seed)
    outline, drawing, fine, genes = hd_section(rng, size_px, mpp, n_genes, umi_per_2um)

    def in_tissue(xy: np.ndarray) -> np.ndarray:
        x, y = (np.clip(xy[:, k].astype(np.int64), 0, size_px - 1) for k in (0, 1))
        return outline[y, x]

    _write_hd(outs, drawing, mpp, fine, genes, in_tissue, sizes, (2000 / size_px / 2, 2000 / size_px / 8), False, fullres)
    return SyntheticHD(Path(outs), fullres, mpp, None, fine)


def _write_hd(outs: Path, drawing: np.ndarray, mpp: float, fine: np.ndarray, genes: pd.Index,
              in_tissue: Callable[[np.ndarray], np.ndarray], sizes: tuple[int, ...], scales: tuple[float, float],
              csv_positions: bool, fullres: Path | None) -> None:
    """Space Ranger's HD layout from the counts of every 2 µm bin (`fine`: rows, columns, genes) of `drawing`: each
    size's bins sum the 2 µm bins they hold; `in_tissue` says which bin centres (full-resolution x, y) are in tissue."""
    n = fine.shape[0]
    flat = fine.reshape(n * n, -1)
    row, col = (a.ravel() for a in np.mgrid[0:n, 0:n])
    images = {"hires": resized(drawing, scales[0]), "lowres": resized(drawing, scales[1])}
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(len(genes))]}, index=genes)
    for size in sizes:
        per = size // 2
        r, c = row // per, col // per
        cells = n // per
        whole = (r < cells) & (c < cells)
        key = r[whole] * cells + c[whole]
        summed = sparse.csr_matrix((np.ones(len(key)), (key, np.flatnonzero(whole))), shape=(cells * cells, n * n)) @ flat
        grid_r, grid_c = (a.ravel() for a in np.mgrid[0:cells, 0:cells])
        centres = np.stack([(grid_c + 0.5) * size / mpp, (grid_r + 0.5) * size / mpp], axis=1)
        inside = in_tissue(centres)
        barcodes = hd_barcode(size, grid_r, grid_c)
        counts = ad.AnnData(X=sparse.csr_matrix(summed[inside].astype(np.int32)),
                            obs=pd.DataFrame(index=pd.Index(barcodes[inside].astype(str))), var=var.copy())
        factors = HDScaleFactors(float(size), mpp, size / mpp, *scales)
        write_bins(outs, Bins(size, counts, barcodes, inside, np.stack([grid_r, grid_c], axis=1), centres, factors), images,
                   csv_positions)
    write_feature_slice(outs)
    if fullres is not None:
        write_pyramidal_tiff(fullres, drawing, mpp)
