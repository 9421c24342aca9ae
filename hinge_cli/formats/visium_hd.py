"""Space Ranger's Visium HD output, `outs/binned_outputs/square_<NNN>um/`: binned counts, bin positions, scale factors.

Each bin size has its own folder holding `filtered_feature_bc_matrix.h5` and `spatial/` with
`tissue_positions.parquet` (barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
pxl_col_in_fullres), `scalefactors_json.json` (bin_size_um, microns_per_pixel, spot_diameter_fullres,
tissue_hires_scalef, tissue_lowres_scalef) and the hires and lowres PNGs. Barcodes read
`s_008um_00123_00456-1` (size, row, column). Other folders beside them (`segmented_outputs/`) are
left alone. Parquet is read with pyarrow.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np

from hinge_cli.core.files import atomic_path, write_text_atomic
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.spaceranger import MATRIX_FILE, POSITION_COLUMNS, POSITIONS_FILE, SHIPPED_IMAGES, read_matrix, write_matrix

log = logging.getLogger(__name__)

BINNED = "binned_outputs"
PARQUET_POSITIONS = "tissue_positions.parquet"
SCALEFACTORS_FILE = "scalefactors_json.json"
FEATURE_SLICE = "feature_slice.h5"  # beside binned_outputs/: its attrs hold the run's metadata (file format, layout)
BIN_FOLDER = re.compile(r"square_(\d{3})um$")
HD_FIX = "point it at the outs/ folder of `spaceranger count` for Visium HD (it holds binned_outputs/)"


@dataclass(frozen=True)
class HDScaleFactors:
    """The scale factors of one bin size, as Space Ranger writes them."""

    bin_size_um: float
    microns_per_pixel: float  # of the full-resolution image
    spot_diameter_fullres: float  # the bin's side in full-resolution pixels
    tissue_hires_scalef: float
    tissue_lowres_scalef: float

    def scale(self, image: str) -> float:
        """Pixels of the shipped `image` ('hires' or 'lowres') per full-resolution pixel."""
        return {"hires": self.tissue_hires_scalef, "lowres": self.tissue_lowres_scalef}[image]


@dataclass(frozen=True)
class Bins:
    """Every bin of one size on the capture area, with its counts where the matrix has them."""

    bin_um: int
    counts: ad.AnnData | None  # bins x genes, int CSR, barcodes as obs_names; None when read for positions alone
    barcodes: np.ndarray  # str, every bin of the positions file
    in_tissue: np.ndarray  # bool
    array_rc: np.ndarray  # (N, 2) int64 row, column on the bin grid
    centres_fullres: np.ndarray  # (N, 2) float64 x, y in full-resolution pixels
    scalefactors: HDScaleFactors


def bin_folder(outs: Path, bin_um: int) -> Path:
    return Path(outs) / BINNED / f"square_{bin_um:03d}um"


def bin_sizes(outs: Path) -> list[int]:
    """The bin sizes (µm) an outs/ folder holds, smallest first."""
    binned = Path(outs) / BINNED
    if not Path(outs).is_dir():
        raise HingeError(f"Visium HD folder {outs} does not exist or is not a folder", HD_FIX)
    if not binned.is_dir():
        raise HingeError(f"{outs} has no {BINNED}/ folder", HD_FIX)
    return sorted(int(m.group(1)) for p in binned.iterdir() if p.is_dir() and (m := BIN_FOLDER.match(p.name)))


def read_hd_scalefactors(spatial: Path) -> HDScaleFactors:
    path = Path(spatial) / SCALEFACTORS_FILE
    if not path.is_file():
        raise HingeError(f"{spatial} has no {SCALEFACTORS_FILE}", "copy the whole binned_outputs/ folder Space Ranger wrote")
    try:
        raw = json.loads(path.read_text())
        factors = HDScaleFactors(*(float(raw[key]) for key in HDScaleFactors.__dataclass_fields__))
    except KeyError as exc:
        raise HingeError(f"{path} has no {exc.args[0]}", "use the scale-factor file Space Ranger wrote for Visium HD") from None
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise HingeError(f"{path} is not a scale-factor file ({exc.__class__.__name__}: {exc})",
                         "use the scale-factor file Space Ranger wrote for Visium HD") from None
    if not all(v > 0 for v in asdict(factors).values()):
        raise HingeError(f"{path} has a scale factor that is not positive", "use the scale-factor file Space Ranger wrote")
    return factors


def _position_table(spatial: Path) -> dict[str, np.ndarray]:
    """The positions' columns: from the parquet file, or the CSV layout older pipelines wrote (read, with a note)."""
    parquet, csv = spatial / PARQUET_POSITIONS, spatial / POSITIONS_FILE
    if parquet.is_file():
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(parquet)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
            raise HingeError(f"{parquet} is not a readable parquet file ({exc.__class__.__name__}: {exc})",
                             "copy the positions file Space Ranger wrote again") from None
        missing = [c for c in POSITION_COLUMNS if c not in table.column_names]
        if missing:
            raise HingeError(f"{parquet} lacks the columns {', '.join(missing)}",
                             f"it needs {', '.join(POSITION_COLUMNS)}, as Space Ranger writes them")
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in POSITION_COLUMNS}
    if csv.is_file():
        import pandas as pd

        log.info("%s: positions in the CSV layout (no %s): read as such", spatial, PARQUET_POSITIONS)
        frame = pd.read_csv(csv, dtype={"barcode": str})
        missing = [c for c in POSITION_COLUMNS if c not in frame.columns]
        if missing:
            raise HingeError(f"{csv} lacks the columns {', '.join(missing)}", f"it needs {', '.join(POSITION_COLUMNS)}")
        return {c: frame[c].to_numpy() for c in POSITION_COLUMNS}
    raise HingeError(f"{spatial} has neither {PARQUET_POSITIONS} nor {POSITIONS_FILE}",
                     "copy the whole binned_outputs/ folder Space Ranger wrote")


def read_bins(outs: Path, bin_um: int, counts: bool = True) -> Bins:
    """The counts, positions and scale factors of one bin size; an absent size is an error that lists those present.
    Without `counts` the matrix is not read (prediction needs the positions; a real matrix is gigabytes)."""
    present = bin_sizes(outs)
    if bin_um not in present:
        sizes = ", ".join(f"{s} µm" for s in present) or "none"
        raise HingeError(f"{outs} has no {bin_um} µm bins (present: {sizes})", f"pass {setting('bin-um')} with one of them")
    folder = bin_folder(outs, bin_um)
    spatial = folder / "spatial"
    columns = _position_table(spatial)
    factors = read_hd_scalefactors(spatial)
    return Bins(bin_um, read_matrix(folder / MATRIX_FILE) if counts else None, columns["barcode"].astype(str).astype(object),
                columns["in_tissue"].astype(bool), np.column_stack([columns["array_row"], columns["array_col"]]).astype(np.int64),
                np.column_stack([columns["pxl_col_in_fullres"], columns["pxl_row_in_fullres"]]).astype(np.float64), factors)


def hd_barcode(bin_um: int, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Space Ranger's bin barcodes: s_008um_00123_00456-1."""
    return np.array([f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(row, col, strict=True)], dtype=object)


def write_bins(outs: Path, bins: Bins, images: dict[str, np.ndarray], csv_positions: bool = False) -> Path:
    """Write one bin size in Space Ranger's layout (the writer of test fixtures); `csv_positions`: the CSV layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder = bin_folder(outs, bins.bin_um)
    spatial = folder / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    write_matrix(folder / MATRIX_FILE, bins.counts)
    columns = {"barcode": bins.barcodes.astype(str), "in_tissue": bins.in_tissue.astype(np.int32),
               "array_row": bins.array_rc[:, 0], "array_col": bins.array_rc[:, 1],
               "pxl_row_in_fullres": bins.centres_fullres[:, 1], "pxl_col_in_fullres": bins.centres_fullres[:, 0]}
    if csv_positions:
        import pandas as pd

        write_text_atomic(spatial / POSITIONS_FILE, pd.DataFrame(columns).to_csv(index=False))
    else:
        with atomic_path(spatial / PARQUET_POSITIONS) as tmp:
            pq.write_table(pa.table(columns), tmp)
    write_text_atomic(spatial / SCALEFACTORS_FILE, json.dumps(asdict(bins.scalefactors), indent=2))
    for name, pixels in images.items():
        with atomic_path(spatial / SHIPPED_IMAGES[name]) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    return folder


def write_feature_slice(outs: Path, file_format: str = "1.0") -> None:
    """The outs/ folder's feature_slice.h5 with the metadata Space Ranger stores in its attributes (the file format of
    the HD layout); readers such as spatialdata-io find the run by it. The per-gene slices themselves are left out."""
    import h5py

    metadata = {"hd_layout_json": json.dumps({"file_format": file_format})}
    with atomic_path(Path(outs) / FEATURE_SLICE) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["metadata_json"] = json.dumps(metadata)
