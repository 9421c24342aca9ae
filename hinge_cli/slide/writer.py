"""Write an RGB image as a tiled pyramidal TIFF that OpenSlide opens, with its µm/px."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from hinge_cli.core.files import atomic_path


def write_pyramidal_tiff(
    path: Path,
    image: np.ndarray,
    mpp: float,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    min_side: int = 512,
) -> Path:
    """Level 0 plus 2x reductions down to `min_side`, each tiled, resolution in px/cm."""
    levels = [np.ascontiguousarray(image)]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        prev = levels[-1]
        size = (prev.shape[1] // 2, prev.shape[0] // 2)
        levels.append(np.asarray(Image.fromarray(prev).resize(size, Image.Resampling.BOX)))
    args = {"compressionargs": {"level": quality}} if compression == "jpeg" else {}
    with atomic_path(Path(path)) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
            for i, level in enumerate(levels):
                px_per_cm = 1e4 / (mpp * 2**i)
                tif.write(
                    level,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression=compression,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1,
                    metadata=None,
                    **args,
                )
    return Path(path)
