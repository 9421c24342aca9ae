"""Each encoder's published evaluation transform, applied to uint8 patches exactly as PIL and torchvision apply it.

The published recipes are torchvision pipelines over PIL images: `Resize(size, interpolation)` of the short
side, `CenterCrop(crop)`, `ToTensor()`, `Normalize(mean, std)`. PIL resamples in two separable passes and
rounds to uint8 after each; a float resize of the same pixels overshoots where PIL clamps, which moved
GigaPath's and CONCH's features more than a planted architecture error does. So the resize runs on uint8
tensors, on the CPU, through torch's antialiased uint8 kernels (written to match PIL's): the same numbers on
every device, then the crop, the division by 255 and the normalisation on the encoder's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize` (`interpolation`, antialiased as PIL does), then centre-crop `crop` px.

    `resize=None` feeds patches of `crop` px as they are (the recipe has no resize) and resizes any other
    size straight to `crop`; `source` says where the recipe was published.
    """

    crop: int
    resize: int | None = None
    interpolation: str = "bicubic"
    source: str = ""

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the CPU -> uint8 (B, 3, crop, crop), as the published PIL pipeline gives them."""
        h, w = patches.shape[-2:]
        target = self.resize if self.resize is not None else (None if (h, w) == (self.crop, self.crop) else self.crop)
        if target is not None:
            size = _short_side(h, w, target) if self.resize is not None else (self.crop, self.crop)
            if size != (h, w):  # PIL returns a copy when the size does not change
                patches = F.interpolate(patches, size=size, mode=self.interpolation, antialias=True, align_corners=False)
        return center_crop(patches, self.crop)


def _short_side(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): the short side becomes `size`, the long one keeps the aspect ratio (truncated)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """torchvision's CenterCrop on a tensor at least `crop` px each way (offsets rounded as it rounds them)."""
    h, w = x.shape[-2:]
    if (h, w) == (crop, crop):
        return x
    if h < crop or w < crop:
        raise ValueError(f"a {h}x{w} patch is smaller than the {crop} px crop")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return x[..., top : top + crop, left : left + crop]
