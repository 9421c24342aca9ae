"""HEST-1k folders and TRIDENT/HEST patch files, read as they are downloaded or written.

A HEST-1k download keeps one sample per id across `wsis/<id>.tif` (the slide), `st/<id>.h5ad`
(spots, centres in obsm['spatial'] in slide pixels) and `metadata/<id>.json` (the slide's
µm/px among much else). The slide's own resolution tags are often missing or wrong, so the
metadata's estimate is the one to trust.

TRIDENT and HEST store patches differently from hinge's tiles: `coords` are top-left corners
in level-0 pixels (hinge keeps spot centres), features are called `features` (older files and
hinge: `embeddings`), and HEST's `barcode` is shaped (N, 1). `read_patch_file` turns all of
that into centres, one feature matrix and a flat list of barcodes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from hinge_cli.core.files import atomic_path
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.hdf5 import open_for_writing

MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")  # in order of trust
SLIDE_PREFERENCE = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".btf", ".jpg", ".png")
FEATURE_NAMES = ("features", "embeddings")  # TRIDENT, then older files and hinge's
HEST_FIX = f"point {setting('hest')} at the folder that holds wsis/, st/ and metadata/ as HEST-1k downloads them"
PATCH_SIZE_FIX = f"pass the patch side in level-0 pixels ({setting('patch-size-level0')})"


@dataclass(frozen=True)
class HestSample:
    sample_id: str
    slide: Path
    spots: Path  # st/<id>.h5ad
    mpp: float  # µm per level-0 pixel of the slide, from the metadata
    metadata: dict = field(repr=False)


def _folder(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise HingeError(f"{root} has no {name}/ folder", HEST_FIX)
    return path


def _slides(wsis: Path) -> dict[str, Path]:
    """Slide per id; of several files with one stem, the likeliest slide format wins."""
    rank = {suffix: i for i, suffix in enumerate(SLIDE_PREFERENCE)}
    found: dict[str, Path] = {}
    for path in sorted(wsis.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        held = found.get(path.stem)
        if held is None or rank.get(path.suffix.lower(), len(rank)) < rank.get(held.suffix.lower(), len(rank)):
            found[path.stem] = path
    return found


def metadata_mpp(metadata: Mapping, source: Path) -> float:
    """The slide's µm/px: `pixel_size_um_estimated`, else `pixel_size_um_embedded`."""
    for key in MPP_KEYS:
        value = metadata.get(key)
        if value is None:
            continue
        try:
            mpp = float(value)
        except (TypeError, ValueError):
            raise HingeError(f"{source}: {key} is '{value}', not a number", "fix the metadata file") from None
        if math.isfinite(mpp) and mpp > 0:
            return mpp
    raise HingeError(f"{source} gives no µm/px ({' or '.join(MPP_KEYS)})", f"add {MPP_KEYS[0]} (µm per slide pixel) to it")


def hest_ids(root: Path) -> list[str]:
    """Ids of the samples whose slide is in `root`/wsis/."""
    root = Path(root)
    if not root.is_dir():
        raise HingeError(f"HEST folder {root} does not exist or is not a folder", HEST_FIX)
    return sorted(_slides(_folder(root, "wsis")))


def read_hest(root: Path, ids: Sequence[str] | None = None) -> list[HestSample]:
    """Slide, spot file and µm/px of each sample in a HEST-1k folder (all with a slide, or `ids`)."""
    root = Path(root)
    available = hest_ids(root)
    slides = _slides(root / "wsis")
    st, meta = _folder(root, "st"), _folder(root, "metadata")
    wanted = list(dict.fromkeys(ids)) if ids else available
    unknown = [i for i in wanted if i not in slides]
    if unknown:
        shown = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "")
        raise HingeError(f"no slide in {root / 'wsis'} for {', '.join(unknown)}", f"available ids: {shown or 'none'}")
    if not wanted:
        raise HingeError(f"{root / 'wsis'} holds no slides", HEST_FIX)
    samples = []
    for sample_id in wanted:
        spots, meta_path = st / f"{sample_id}.h5ad", meta / f"{sample_id}.json"
        if not spots.is_file():
            raise HingeError(f"{st} has no {spots.name}", f"download the st/ file of {sample_id}, or leave it out with {setting('ids')}")
        if not meta_path.is_file():
            raise HingeError(f"{meta} has no {meta_path.name}", f"download the metadata of {sample_id}: it holds the slide's µm/px")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise HingeError(f"{meta_path} is not valid JSON ({exc})", "download it again") from None
        samples.append(HestSample(sample_id, slides[sample_id], spots, metadata_mpp(metadata, meta_path), metadata))
    return samples


def write_hest_metadata(root: Path, sample_id: str, metadata: Mapping) -> Path:
    """metadata/<id>.json as HEST-1k ships it (the slide and st/ files are written by their owners)."""
    path = Path(root) / "metadata" / f"{sample_id}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(dict(metadata), indent=2))
    return path


@dataclass(frozen=True)
class PatchFile:
    """Patches of one slide as TRIDENT or HEST store them, with coordinates made into centres."""

    barcodes: list[str]
    centres: np.ndarray  # (N, 2) float64 x, y patch centres in level-0 pixels
    patch_size_level0: float  # patch side in level-0 pixels
    features: np.ndarray | None  # (N, D) float32, None for a coordinates-only file
    attrs: dict = field(default_factory=dict, repr=False)  # the coords dataset's attributes

    @property
    def topleft(self) -> np.ndarray:
        return self.centres - self.patch_size_level0 / 2


def _attr_sources(h5: h5py.File) -> list[Mapping]:
    return [h5[name].attrs for name in ("coords", *FEATURE_NAMES, "img") if name in h5] + [h5.attrs]


def _attr(sources: list[Mapping], key: str) -> float | None:
    for attrs in sources:
        if key in attrs:
            value = float(np.asarray(attrs[key]).reshape(-1)[0])
            if math.isfinite(value) and value > 0:
                return value
    return None


def patch_size_from_attrs(sources: list[Mapping]) -> float | None:
    """The patch side in level-0 pixels from TRIDENT/HEST attributes, or None when they do not say.

    Tried in order: `patch_size_level0` (TRIDENT), `patch_size_src` (HEST), and `patch_size` x
    `level0_magnification` / `target_magnification` (TRIDENT writes -1 when a magnification is
    unknown, which counts as missing). Attributes are looked up on `coords`, the features dataset,
    `img`, then the file itself.
    """
    for key in ("patch_size_level0", "patch_size_src"):
        value = _attr(sources, key)
        if value is not None:
            return value
    size, level0, target = (_attr(sources, k) for k in ("patch_size", "level0_magnification", "target_magnification"))
    return size * level0 / target if size and level0 and target else None


def _barcodes(h5: h5py.File, topleft: np.ndarray) -> list[str]:
    """`barcode` shaped (N,) or (N, 1), bytes or str; else `<x>_<y>` of the top-left corners."""
    if "barcode" not in h5:
        return [f"{x}_{y}" for x, y in np.rint(topleft).astype(np.int64)]
    values = np.asarray(h5["barcode"][()]).reshape(len(topleft), -1)[:, 0]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_patch_file(path: Path, patch_size_level0: float | None = None) -> PatchFile:
    """Read a TRIDENT/HEST patch-coordinate or feature .h5; `patch_size_level0` overrides the attributes.

    Without it and without the attributes `patch_size_from_attrs` looks for, the centres
    cannot be known and a HingeError asks for the patch size.
    """
    path = Path(path)
    if not path.is_file():
        raise HingeError(f"patch file {path} does not exist", "check the path")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise HingeError(f"{path} is not an HDF5 file ({exc})", "give a .h5 written by TRIDENT or HEST") from None
    with h5:
        if "coords" not in h5:
            raise HingeError(f"{path} has no 'coords' dataset", "give a .h5 written by TRIDENT or HEST (coords of patch top-left corners)")
        topleft = np.asarray(h5["coords"][()], dtype=np.float64)
        if topleft.ndim != 2 or topleft.shape[1] < 2:
            raise HingeError(f"{path}: coords has shape {topleft.shape}, not (N, 2)", "give a .h5 written by TRIDENT or HEST")
        topleft = topleft[:, :2]
        size = patch_size_level0 if patch_size_level0 is not None else patch_size_from_attrs(_attr_sources(h5))
        if size is None:
            raise HingeError(f"{path} does not say its patch size in level-0 pixels (patch_size_level0, patch_size_src)", PATCH_SIZE_FIX)
        name = next((n for n in FEATURE_NAMES if n in h5), None)
        features = np.asarray(h5[name][()], dtype=np.float32) if name else None
        if features is not None:
            features = features.reshape(len(features), -1)
            if len(features) != len(topleft):
                raise HingeError(f"{path}: {len(features)} rows of {name} but {len(topleft)} coords", "give an unmodified TRIDENT/HEST file")
        barcodes = _barcodes(h5, topleft)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5["coords"].attrs.items()}
    return PatchFile(barcodes, topleft + size / 2, float(size), features, attrs)


def write_patch_file(path: Path, patches: PatchFile, features_name: str = "features", hest_barcodes: bool = True) -> Path:
    """Write in TRIDENT/HEST's convention: top-left int `coords` with their attributes, `barcode` (N, 1) bytes.

    `patch_size_level0` is always written on `coords`, beside any other attributes in `patches.attrs`;
    `hest_barcodes=False` writes no `barcode` dataset, as TRIDENT does.
    """
    if features_name not in FEATURE_NAMES:
        raise ValueError(f"features_name must be one of {FEATURE_NAMES}")
    with atomic_path(Path(path)) as tmp, open_for_writing(tmp) as h5:
        coords = h5.create_dataset("coords", data=np.round(patches.topleft).astype(np.int64))
        coords.attrs.update({**patches.attrs, "patch_size_level0": patches.patch_size_level0})
        if patches.features is not None:
            h5.create_dataset(features_name, data=patches.features.astype(np.float32))
        if hest_barcodes:
            h5.create_dataset("barcode", data=np.array(patches.barcodes, dtype="S").reshape(-1, 1))
    return Path(path)
