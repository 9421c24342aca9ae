"""One interface over whole-slide images: OpenSlide formats, and plain JPEG/PNG/TIFF.

Everything is addressed in level-0 pixels, as spot coordinates are. Pixel size
(µm/px) comes from the file or from the caller; it is never guessed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from hinge_cli.errors import HingeError, setting

log = logging.getLogger(__name__)

HIRES_MAX_SIDE = 2000  # the side of Space Ranger's "hires" image, which scanpy users expect

PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}  # OpenSlide's own formats
_CM_PER_UNIT = {"centimeter": 1.0, "inch": 2.54, "3": 1.0, "2": 2.54}


def _mpp_from_resolution(resolution: float | None, unit: str | None) -> float | None:
    """µm/px from TIFF XResolution (pixels per unit) and ResolutionUnit."""
    if not resolution or unit is None or str(unit).lower() not in _CM_PER_UNIT:
        return None
    return _CM_PER_UNIT[str(unit).lower()] * 1e4 / float(resolution)


class Slide:
    """A slide's pyramid in level-0 coordinates; subclasses provide the pixels."""

    path: Path
    mpp: float | None
    mpp_source: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `level`, top-left at level-0 (x, y); outside is white."""
        raise NotImplementedError

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as `downsample` (never upsample)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide at about `downsample` (level-0 px per thumbnail px), RGB uint8."""
        level = self.best_level(downsample)
        lw, lh = self.level_dimensions[level]
        image = Image.fromarray(self.read(0, 0, level, lw, lh))
        width, height = self.dimensions
        size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        return np.asarray(image.resize(size, Image.BOX))

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSlideSlide(Slide):
    def __init__(self, path: Path, handle: object, mpp: float | None):
        self.path = path
        self._osr = handle
        self.level_dimensions = list(handle.level_dimensions)
        self.level_downsamples = [float(d) for d in handle.level_downsamples]
        props = handle.properties
        found = props.get("openslide.mpp-x")
        if found is None:
            found = _mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "user"
        elif found is not None:
            self.mpp, self.mpp_source = float(found), "metadata"
        else:
            self.mpp, self.mpp_source = None, "none"

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            rgba = np.asarray(self._osr.read_region((int(x), int(y)), level, (int(width), int(height))))
        except openslide.OpenSlideError as exc:  # e.g. "Corrupt JPEG data": the file is damaged, not the request
            raise HingeError(f"slide {self.path} is corrupt or truncated ({exc})",
                             "re-download (or re-export) the file and check its size or checksum against the source") from None
        alpha = rgba[..., 3:4].astype(np.uint16)
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # OpenSlide returns premultiplied-free RGBA with transparent areas outside the scan.
        rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        self._osr.close()


class PlainImageSlide(Slide):
    """A single-resolution image decoded once; coarser levels are made on demand.

    Memory stays at one decoded image plus small reductions, however many
    patches are read.
    """

    def __init__(self, path: Path, mpp: float | None):
        self.path = path
        pixels, found = self._decode(path)
        self._levels = [pixels]
        self.level_dimensions = [(pixels.shape[1], pixels.shape[0])]
        self.level_downsamples = [1.0]
        height, width = pixels.shape[:2]
        factor = 2
        while min(width, height) // factor >= 512:
            self.level_dimensions.append((width // factor, height // factor))
            self.level_downsamples.append(float(factor))
            self._levels.append(None)
            factor *= 2
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "user"
        elif found is not None:
            self.mpp, self.mpp_source = found, "metadata"
        else:
            self.mpp, self.mpp_source = None, "none"

    @staticmethod
    def _decode(path: Path) -> tuple[np.ndarray, float | None]:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                pixels = page.asarray()
                tags = page.tags
                res = tags.get("XResolution")
                unit = tags.get("ResolutionUnit")
                found = None
                if res is not None and unit is not None:
                    num, den = res.value
                    found = _mpp_from_resolution(num / den if den else None, str(int(unit.value)))
        else:
            Image.MAX_IMAGE_PIXELS = None  # real slides are far above Pillow's bomb limit
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            found = None  # JPEG/PNG dpi is a placeholder (often 72), never a scan resolution
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        if pixels.dtype != np.uint8 or pixels.shape[2] not in (3, 4):
            raise HingeError(f"{path} is not an 8-bit RGB image ({pixels.dtype}, shape {pixels.shape})", "convert it to 8-bit RGB")
        return np.ascontiguousarray(pixels[..., :3]), found

    def _level(self, level: int) -> np.ndarray:
        if self._levels[level] is None:
            previous = self._level(level - 1)
            width, height = self.level_dimensions[level]
            image = Image.fromarray(previous).resize((width, height), Image.BOX)
            self._levels[level] = np.asarray(image)
        return self._levels[level]

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        pixels = self._level(level)
        d = self.level_downsamples[level]
        out = np.full((int(height), int(width), 3), 255, np.uint8)
        lx, ly = math.floor(x / d), math.floor(y / d)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + int(width), pixels.shape[1]), min(ly + int(height), pixels.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = pixels[y0:y1, x0:x1]
        return out


def open_slide(path: Path | str, mpp: float | None = None) -> Slide:
    """Open any supported slide; a corrupt or unknown file is a HingeError."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"slide {path} does not exist", "check the path")
    if mpp is not None and not (0.01 <= mpp <= 100):
        raise HingeError(f"{setting('mpp')} {mpp} is not a plausible pixel size", "give micrometres per pixel, e.g. 0.25 for a 40x scan")
    import openslide

    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        handle = None
    except openslide.OpenSlideError as exc:
        raise HingeError(f"slide {path} is corrupt or unreadable ({exc})", "re-export or re-download the file") from None
    if handle is not None:
        return OpenSlideSlide(path, handle, mpp)
    if path.suffix.lower() in SLIDE_SUFFIXES:
        raise HingeError(f"slide {path} cannot be opened although it is a {path.suffix} file: it is corrupt or truncated",
                         "re-download (or re-export) the file and check its size or checksum against the source")
    if path.suffix.lower() not in PLAIN_SUFFIXES:
        raise HingeError(f"{path} is neither a slide OpenSlide can open nor a JPEG/PNG/TIFF image", "convert it to a tiled TIFF")
    try:
        return PlainImageSlide(path, mpp)
    except HingeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise HingeError(f"image {path} is corrupt or unreadable ({exc.__class__.__name__}: {exc})", "re-export the file") from None


def require_mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise HingeError(
            f"{slide.path.name} carries no pixel size (µm/px) in its metadata",
            f"pass {setting('mpp')} (e.g. {setting('mpp', '0.25')} for a 40x scan), or an mpp column in {setting('samples')}",
        )
    return slide.mpp


def hires_image(slide_path: Path, mpp: float) -> tuple[np.ndarray, float]:
    """The whole slide downsampled to about HIRES_MAX_SIDE px, and its scale factor from level-0 px."""
    if not Path(slide_path).exists():
        raise HingeError(f"the slide {slide_path} is gone; the output needs its image", "restore the slide at that path")
    with open_slide(slide_path, mpp) as slide:
        width, height = slide.dimensions
        image = slide.thumbnail(max(1.0, max(width, height) / HIRES_MAX_SIDE))
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8), image.shape[1] / width
