"""Space Ranger `outs/` folders: the filtered count matrix, spot positions, scale factors and images.

Space Ranger measures spot positions in the full-resolution image it was given, which does
not ship inside `outs/`; the hires and lowres PNGs that do ship are that image scaled by
`tissue_hires_scalef` and `tissue_lowres_scalef`. A Visium spot is 55 µm across, so the
full-resolution µm/px is 55 / `spot_diameter_fullres`. Every image choice therefore comes
with its own µm/px and its own spot coordinates, computed here and nowhere else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse

from hinge_cli.core.files import atomic_path, write_text_atomic
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.hdf5 import open_for_writing

log = logging.getLogger(__name__)

SPOT_UM = 55.0
MATRIX_FILE = "filtered_feature_bc_matrix.h5"
POSITIONS_FILE = "tissue_positions.csv"  # Space Ranger >= 2.0, with a header line
LEGACY_POSITIONS_FILE = "tissue_positions_list.csv"  # older, the same columns without a header
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
SCALEFACTORS_FILE = "scalefactors_json.json"
SHIPPED_IMAGES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
GENE_EXPRESSION = "Gene Expression"
OUTS_FIX = "point it at Space Ranger's outs/ folder (filtered_feature_bc_matrix.h5 and spatial/)"


@dataclass(frozen=True)
class ScaleFactors:
    """The scale factors Space Ranger writes to spatial/scalefactors_json.json."""

    spot_diameter_fullres: float
    tissue_hires_scalef: float
    tissue_lowres_scalef: float
    fiducial_diameter_fullres: float | None = None

    @property
    def mpp_fullres(self) -> float:
        """µm per full-resolution pixel, from the 55 µm spot."""
        return SPOT_UM / self.spot_diameter_fullres

    def scale(self, image: str) -> float:
        """Pixels of the shipped `image` ('hires' or 'lowres') per full-resolution pixel."""
        return {"hires": self.tissue_hires_scalef, "lowres": self.tissue_lowres_scalef}[image]


@dataclass(frozen=True)
class SpotPositions:
    """Every spot of the capture area, on tissue or not, as in the positions file."""

    barcodes: np.ndarray  # str
    in_tissue: np.ndarray  # 0/1, int8 (Visium's meaning)
    array_rc: np.ndarray  # (N, 2) int array_row, array_col
    centres_fullres: np.ndarray  # (N, 2) float64 x, y spot centres in full-resolution pixels


@dataclass
class SpaceRangerOuts:
    """One Space Ranger run: raw counts, spot positions and scale factors."""

    counts: ad.AnnData  # spots x genes, int CSR in X, var['gene_ids'], var_names unique symbols
    positions: SpotPositions
    scalefactors: ScaleFactors

    @property
    def mpp_fullres(self) -> float:
        return self.scalefactors.mpp_fullres


@dataclass(frozen=True)
class VisiumImage:
    """The image to tile for a Space Ranger run, with spot centres in its own pixels."""

    path: Path
    mpp: float
    scale: float  # this image's pixels per full-resolution pixel
    barcodes: np.ndarray
    in_tissue: np.ndarray
    coords: np.ndarray  # (N, 2) float64 x, y


def _spatial_dir(outs: Path) -> Path:
    outs = Path(outs)
    if not outs.is_dir():
        raise HingeError(f"Space Ranger folder {outs} does not exist or is not a folder", OUTS_FIX)
    spatial = outs / "spatial"
    if not spatial.is_dir():
        raise HingeError(f"{outs} has no spatial/ folder", f"{OUTS_FIX}; spatial/ comes from `spaceranger count`")
    return spatial


def _decoded(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)], dtype=object)


def _unique_names(names: np.ndarray, source: Path) -> pd.Index:
    """Gene symbols made unique (`NAME-1`, `NAME-2`, ...), warning how many were renamed."""
    index = pd.Index(names.astype(str))
    unique = ad.utils.make_index_unique(index)
    renamed = int((unique != index).sum())
    if renamed:
        log.warning("%s: %d duplicated gene symbols renamed with a -N suffix to make them unique", source.name, renamed)
    return unique


def read_matrix(path: Path) -> ad.AnnData:
    """A 10x feature-barcode matrix .h5 (Cell/Space Ranger >= 3 layout) as spots x genes raw counts.

    Only 'Gene Expression' features are kept (antibody or CRISPR features are not genes).
    """
    path = Path(path)
    if not path.is_file():
        raise HingeError(f"{path.parent} has no {path.name}", OUTS_FIX)
    with h5py.File(path, "r") as h5:
        if "matrix" not in h5:
            raise HingeError(f"{path} has no 'matrix' group", "use the .h5 written by Space Ranger (Cell Ranger >= 3 layout)")
        group = h5["matrix"]
        n_features, n_barcodes = (int(n) for n in group["shape"][()])
        # stored features x barcodes in CSC, which is barcodes x features in CSR
        matrix = sparse.csr_matrix((group["data"][()], group["indices"][()], group["indptr"][()]), shape=(n_barcodes, n_features))
        features = group["features"]
        names, ids = _decoded(features["name"][()]), _decoded(features["id"][()])
        types = _decoded(features["feature_type"][()]) if "feature_type" in features else np.full(n_features, GENE_EXPRESSION, object)
        barcodes = _decoded(group["barcodes"][()])
    genes = np.flatnonzero(types == GENE_EXPRESSION)
    var = pd.DataFrame({"gene_ids": ids[genes]}, index=_unique_names(names[genes], path))
    obs = pd.DataFrame(index=pd.Index(barcodes.astype(str), name=None))
    return ad.AnnData(X=matrix[:, genes].tocsr(), obs=obs, var=var)


def write_matrix(path: Path, counts: ad.AnnData, genome: str = "GRCh38") -> None:
    """Write spots x genes integer counts as a 10x feature-barcode matrix .h5 (features x barcodes, CSC)."""
    matrix = sparse.csr_matrix(counts.X).astype(np.int32)
    gene_ids = counts.var.get("gene_ids", counts.var_names)
    n = counts.n_vars
    with atomic_path(Path(path)) as tmp, open_for_writing(tmp) as h5:
        group = h5.create_group("matrix")
        group["data"], group["indices"], group["indptr"] = matrix.data, matrix.indices.astype(np.int64), matrix.indptr.astype(np.int64)
        group["shape"] = np.array([n, counts.n_obs], np.int32)
        group["barcodes"] = np.array(counts.obs_names, dtype="S")
        features = group.create_group("features")
        features["name"] = np.array(counts.var_names, dtype="S")
        features["id"] = np.array(gene_ids, dtype="S")
        features["feature_type"] = np.array([GENE_EXPRESSION] * n, dtype="S")
        features["genome"] = np.array([genome] * n, dtype="S")


def read_positions(spatial: Path) -> SpotPositions:
    """Spot positions from tissue_positions.csv, or else the older tissue_positions_list.csv."""
    spatial = Path(spatial)
    found = [(spatial / name, header) for name, header in ((POSITIONS_FILE, 0), (LEGACY_POSITIONS_FILE, None))
             if (spatial / name).is_file()]
    if not found:
        raise HingeError(
            f"{spatial} has neither {POSITIONS_FILE} nor {LEGACY_POSITIONS_FILE}",
            "copy the whole spatial/ folder that `spaceranger count` wrote into outs/",
        )
    path, header = found[0]
    try:
        table = pd.read_csv(path, header=header, names=None if header == 0 else list(POSITION_COLUMNS), dtype={"barcode": str})
        table = table[list(POSITION_COLUMNS)]
        positions = SpotPositions(
            table["barcode"].astype(str).to_numpy(object),
            table["in_tissue"].to_numpy(np.int8),
            table[["array_row", "array_col"]].to_numpy(np.int64),
            table[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64),
        )
    except (KeyError, ValueError) as exc:
        raise HingeError(f"{path} is not a Space Ranger positions table ({exc})", f"it needs the columns {', '.join(POSITION_COLUMNS)}") from None
    return positions


def write_positions(spatial: Path, positions: SpotPositions, legacy: bool = False) -> Path:
    """Write tissue_positions.csv (with header) or, `legacy`, the headerless tissue_positions_list.csv."""
    table = pd.DataFrame({
        "barcode": positions.barcodes,
        "in_tissue": positions.in_tissue.astype(np.int8),
        "array_row": positions.array_rc[:, 0],
        "array_col": positions.array_rc[:, 1],
        "pxl_row_in_fullres": np.round(positions.centres_fullres[:, 1]).astype(np.int64),
        "pxl_col_in_fullres": np.round(positions.centres_fullres[:, 0]).astype(np.int64),
    })
    path = Path(spatial) / (LEGACY_POSITIONS_FILE if legacy else POSITIONS_FILE)
    write_text_atomic(path, table.to_csv(index=False, header=not legacy))
    return path


def read_scalefactors(spatial: Path) -> ScaleFactors:
    path = Path(spatial) / SCALEFACTORS_FILE
    if not path.is_file():
        raise HingeError(f"{spatial} has no {SCALEFACTORS_FILE}", "copy the whole spatial/ folder that `spaceranger count` wrote into outs/")
    try:
        raw = json.loads(path.read_text())
        factors = ScaleFactors(
            float(raw["spot_diameter_fullres"]),
            float(raw["tissue_hires_scalef"]),
            float(raw["tissue_lowres_scalef"]),
            float(raw["fiducial_diameter_fullres"]) if raw.get("fiducial_diameter_fullres") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HingeError(f"{path} is not a Space Ranger scale-factor file ({exc.__class__.__name__}: {exc})", "use the file `spaceranger count` wrote") from None
    if not all(v > 0 for v in (factors.spot_diameter_fullres, factors.tissue_hires_scalef, factors.tissue_lowres_scalef)):
        raise HingeError(f"{path} has a scale factor that is not positive", "use the file `spaceranger count` wrote")
    return factors


def write_scalefactors(spatial: Path, factors: ScaleFactors) -> None:
    write_text_atomic(Path(spatial) / SCALEFACTORS_FILE, json.dumps(asdict(factors), indent=2))


def read_spaceranger(outs: Path) -> SpaceRangerOuts:
    """Counts, positions and scale factors of a Space Ranger outs/ folder."""
    spatial = _spatial_dir(outs)
    return SpaceRangerOuts(read_matrix(Path(outs) / MATRIX_FILE), read_positions(spatial), read_scalefactors(spatial))


def visium_image(outs: Path, image: str | Path = "hires", in_tissue_only: bool = True) -> VisiumImage:
    """The image to tile, its µm/px and the spot centres in its pixels.

    `image` is 'hires' or 'lowres' (the PNGs in spatial/, coordinates and µm/px rescaled by
    their scale factor) or the path of the full-resolution image given to Space Ranger.
    """
    spatial = _spatial_dir(outs)
    factors = read_scalefactors(spatial)
    spots = read_positions(spatial)
    if str(image) in SHIPPED_IMAGES:
        path, scale = spatial / SHIPPED_IMAGES[str(image)], factors.scale(str(image))
        if not path.is_file():
            other = "lowres" if image == "hires" else "hires"
            raise HingeError(f"{spatial} has no {path.name}", f"pass {setting('image')} with the full-resolution image given to Space Ranger, or {setting('image')} {other}")
    else:
        path, scale = Path(image), 1.0
        if not path.is_file():
            raise HingeError(f"image {path} does not exist", f"pass {setting('image')} with the full-resolution image given to Space Ranger, or hires or lowres")
    keep = spots.in_tissue == 1 if in_tissue_only else np.ones(len(spots.barcodes), bool)
    if not keep.any():
        raise HingeError(f"no spot of {outs} is marked in_tissue", "check the positions file, or include spots off the tissue")
    return VisiumImage(path, factors.mpp_fullres / scale, scale, spots.barcodes[keep], spots.in_tissue[keep], spots.centres_fullres[keep] * scale)


def spot_expression(data: SpaceRangerOuts, image: VisiumImage) -> ad.AnnData:
    """Raw counts of the image's spots that have any, with obsm['spatial'] in the image's pixels."""
    row = {b: i for i, b in enumerate(data.counts.obs_names)}
    have = np.array([b in row for b in image.barcodes], bool)
    if not have.any():
        raise HingeError("no spot of the positions file is in the count matrix", "check that the matrix and spatial/ come from the same run")
    if (~have).any():
        log.info("%d spots have no counts in %s and are left out", int((~have).sum()), MATRIX_FILE)
    adata = data.counts[[row[b] for b in image.barcodes[have]]].copy()
    adata.obs["in_tissue"] = image.in_tissue[have]
    adata.obsm["spatial"] = image.coords[have]
    adata.uns["spaceranger"] = {"image": str(image.path), "mpp": image.mpp, "scale": image.scale}
    return adata


def write_spaceranger(
    outs: Path,
    data: SpaceRangerOuts,
    images: dict[str, np.ndarray],
    legacy_positions: bool = False,
) -> Path:
    """Write an outs/ folder in Space Ranger's layout: matrix .h5, positions, scale factors, PNGs.

    `images` maps 'hires' / 'lowres' to RGB uint8 arrays already scaled by their scale factor.
    """
    outs = Path(outs)
    spatial = outs / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    write_matrix(outs / MATRIX_FILE, data.counts)
    write_positions(spatial, data.positions, legacy_positions)
    write_scalefactors(spatial, data.scalefactors)
    for name, pixels in images.items():
        with atomic_path(spatial / SHIPPED_IMAGES[name]) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    return outs
