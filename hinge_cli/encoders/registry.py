"""Patch encoders: a registry of named (architecture, preprocessing, output dim) entries.

`build_encoder("uni", weights=...)` gives an `Encoder` that turns batches of
uint8 RGB patches into float32 features, with test-time augmentation (dihedral
views), device placement, channels-last and bf16 autocast on CUDA handled once
here rather than in every caller. The weight-free default encoder also encodes
a whole slide's spots at once (`Encoder.encode_slide_rows`), which is how
`hinge embed` runs it: its fields overlap so much that per-patch work is
almost all repeated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hinge_cli.core import devices
from hinge_cli.encoders.conch import CONCH_UNUSED, ConchVision
from hinge_cli.encoders.handcrafted import HandcraftedEncoder, TilePlan
from hinge_cli.encoders.preprocess import Preprocess
from hinge_cli.encoders.vit import VisionTransformer, ViTArch
from hinge_cli.encoders.weights import find_in_hf_cache, hf_cache_dirs, load_into, read_state_dict, select_keys
from hinge_cli.errors import HingeError, command, setting

log = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
NO_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
DEFAULT_ENCODER = "default"
MAX_VIEWS = 8
SLIDE_TILE_PX = 512  # tile side at each field's scale: skips most empty context of sparse sections; margins add < 30%
SLIDE_ROWS = 8192  # spots pooled from the block maps at a time: a few tens of MB, whatever the number of spots


@dataclass(frozen=True)
class Field:
    """What one encoder input shows: `px` square pixels at `mpp` µm/px read around the spot centre.

    mpp=None means "the tile's own patch", resized to `px`; the learned encoders
    use that, so they see exactly what `hinge tile` cut. A fixed mpp makes the
    encoder read its own field from the slide (the default encoder's context).
    """

    px: int
    mpp: float | None = None

    @property
    def um(self) -> float | None:
        return None if self.mpp is None else self.px * self.mpp


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    dim: int
    fields: tuple[Field, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], nn.Module]
    description: str
    hf_repo: str | None = None  # None: no weights needed
    key_prefix: str = ""  # checkpoint prefix of the part we rebuild
    drop_keys: tuple[str, ...] = ()  # checkpoint keys of that part that features never use
    autocast: bool = True  # bf16 on CUDA; the default encoder's statistics stay fp32
    arch: ViTArch | None = None
    preprocess: Preprocess | None = None  # the published eval transform; None: fields arrive at their size

    @property
    def needs_weights(self) -> bool:
        return self.hf_repo is not None

    def __post_init__(self) -> None:
        if self.preprocess is not None and any(f.px != self.preprocess.crop for f in self.fields):
            raise ValueError(f"{self.name}: its transform crops {self.preprocess.crop} px, its fields are {[f.px for f in self.fields]} px")

    def transform(self, fld: Field) -> Preprocess:
        return self.preprocess or Preprocess(fld.px, interpolation="bilinear")


def _vit(arch: ViTArch) -> Callable[[], nn.Module]:
    return lambda: VisionTransformer(arch)


def _default_encoder() -> nn.Module:
    return MultiFieldHandcrafted(DEFAULT_FIELDS)


class MultiFieldHandcrafted(nn.Module):
    """The handcrafted statistics of each field, concatenated (fine detail + wide context)."""

    def __init__(self, fields: Sequence[Field], tile_px: int = SLIDE_TILE_PX):
        super().__init__()
        self.fields = tuple(fields)
        self.tile_px = tile_px
        self.parts = nn.ModuleList(HandcraftedEncoder(mpp=f.mpp) for f in self.fields)
        self.out_dim = sum(p.dim for p in self.parts)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part, x in zip(self.parts, images, strict=True)], dim=1)

    def view_invariant(self) -> bool:
        return all(part.view_invariant(f.px) for part, f in zip(self.parts, self.fields, strict=True))

    def plan_slide(self, centres: np.ndarray, slide_mpp: float, tile_px: int | None = None) -> list[TilePlan]:
        """One tile plan per field for spots at `centres` ((N, 2) level-0 x, y of a slide at `slide_mpp`)."""
        tile_px = tile_px or self.tile_px
        return [part.plan(centres * (slide_mpp / f.mpp), f.px, tile_px) for part, f in zip(self.parts, self.fields, strict=True)]

    def block_maps(
        self,
        plans: Sequence[TilePlan],
        read: Callable[[Field, TilePlan], Iterable[np.ndarray]],
        advance: Callable[..., None] | None = None,
    ) -> list[torch.Tensor]:
        """Each field's block map of the planned area; `read(field, plan)` yields each planned tile's pixels in order."""
        return [part.block_map(plan, read(f, plan), advance) for part, f, plan in zip(self.parts, self.fields, plans, strict=True)]

    def pool(self, maps: Sequence[torch.Tensor], plans: Sequence[TilePlan], rows: slice = slice(None)) -> torch.Tensor:
        """(n, dim) for the planned spots `rows`, from the fields' block maps."""
        return torch.cat([part.pool(m, plan, rows) for part, m, plan in zip(self.parts, maps, plans, strict=True)], dim=1)


# Chosen on HER2ST by the ridge benchmark's inner (training-section-only) cross-validation among
# 0.5 µm/px x 128 µm, 1 µm/px x 448 µm, 2 µm/px x 896 µm, 4 µm/px x 1.8 mm fields and their pairs:
# wide context at low magnification carried most of the signal.
DEFAULT_FIELDS = (Field(448, 2.0), Field(448, 4.0))

ARCHS = {
    "uni": ViTArch(224, 16, 1024, 24, 16, 4.0, init_values=1e-5),
    "uni2-h": ViTArch(224, 14, 1536, 24, 24, 2.66667 * 2, swiglu=True, init_values=1e-5, reg_tokens=8, no_embed_class=True),
    "h-optimus-0": ViTArch(224, 14, 1536, 40, 24, 2.66667 * 2, swiglu=True, init_values=1e-5, reg_tokens=4, no_embed_class=True),
    "virchow2": ViTArch(224, 14, 1280, 32, 16, 5.3375, swiglu=True, init_values=1e-5, reg_tokens=4, pool="token+mean"),
    "gigapath": ViTArch(224, 16, 1536, 40, 24, 5.33334, swiglu=True, init_values=1e-5),
}


# The published evaluation transforms (short-side resize, centre crop): the model cards' torchvision code,
# or timm's pretrained config where the card defers to it.
PUBLISHED = {
    "uni": Preprocess(224, 224, "bilinear", "UNI model card: Resize(224)"),
    "uni2-h": Preprocess(224, 224, "bilinear", "UNI2-h model card: Resize(224)"),
    "h-optimus-0": Preprocess(224, None, "bicubic", "H-optimus-0 model card: 224 px patches, no resize"),
    "virchow2": Preprocess(224, 224, "bicubic", "Virchow2's timm config: bicubic, crop_pct 1.0"),
    "gigapath": Preprocess(224, 256, "bicubic", "Prov-GigaPath README: Resize(256, bicubic), CenterCrop(224)"),
    "conch": Preprocess(448, 448, "bicubic", "CONCH's open_clip transform: Resize(448, bicubic), CenterCrop(448)"),
}


def _registry() -> dict[str, EncoderSpec]:
    vits = [("uni", 1024, IMAGENET, "UNI ViT-L/16 (MahmoodLab)", "MahmoodLab/UNI"),
            ("uni2-h", 1536, IMAGENET, "UNI2-h ViT-H/14, 8 registers (MahmoodLab)", "MahmoodLab/UNI2-h"),
            ("h-optimus-0", 1536, H_OPTIMUS, "H-optimus-0 ViT-g/14 (Bioptimus)", "bioptimus/H-optimus-0"),
            ("virchow2", 2560, IMAGENET, "Virchow2 ViT-H/14: class token + mean patch token (Paige)", "paige-ai/Virchow2"),
            ("gigapath", 1536, IMAGENET, "Prov-GigaPath tile encoder ViT-g/16", "prov-gigapath/prov-gigapath")]
    specs = [
        EncoderSpec(
            DEFAULT_ENCODER, _default_encoder().out_dim, DEFAULT_FIELDS, *NO_NORM, _default_encoder,
            "weight-free: H&E stain, nuclei and texture statistics, spot and context", autocast=False,
        ),
        *(EncoderSpec(name, dim, (Field(224),), *norm, _vit(ARCHS[name]), text, hf_repo=repo, arch=ARCHS[name], preprocess=PUBLISHED[name])
          for name, dim, norm, text, repo in vits),
        EncoderSpec("conch", 512, (Field(448),), *OPENAI_CLIP, ConchVision, "CONCH image tower ViT-B/16 at 448 px (MahmoodLab)",
                    hf_repo="MahmoodLab/CONCH", key_prefix="visual.", drop_keys=CONCH_UNUSED, preprocess=PUBLISHED["conch"]),
    ]
    return {s.name: s for s in specs}


REGISTRY: dict[str, EncoderSpec] = _registry()


def get_spec(name: str) -> EncoderSpec:
    key = name.strip().lower()
    if key not in REGISTRY:
        raise HingeError(f"unknown encoder '{name}'", f"choose from {', '.join(REGISTRY)} (see {command('embed')} {setting('list')})")
    return REGISTRY[key]


def parse_encoders(text: str) -> list[EncoderSpec]:
    """`uni,conch` -> specs in that order (their features are concatenated in that order)."""
    names = [n for n in (part.strip() for part in text.split(",")) if n]
    if not names:
        raise HingeError(f"{setting('encoder')} is empty", f"give one or more of {', '.join(REGISTRY)}, comma-separated")
    if len(set(names)) != len(names):
        raise HingeError(f"{setting('encoder')} '{text}' names an encoder twice", "list each encoder once")
    return [get_spec(n) for n in names]


def encoder_key(specs: Sequence[EncoderSpec]) -> str:
    """The folder name under embeddings/: the encoder names joined in order (`uni+conch`)."""
    return "+".join(s.name for s in specs)


def locate_weights(spec: EncoderSpec, given: Path | None = None) -> Path | None:
    """The weights file for `spec`: `given`, else the local Hugging Face cache; None if not found."""
    if not spec.needs_weights:
        return None
    if given is not None:
        return Path(given)
    return find_in_hf_cache(spec.hf_repo)


def weights_status(spec: EncoderSpec, given: Path | None = None) -> str:
    """What `embed --list` says of an encoder's weights: none needed, the file it would load, or what is wrong."""
    if not spec.needs_weights:
        return "no weights needed"
    path = locate_weights(spec, given)
    if path is None:
        return "weights not found"
    return str(path) if path.is_file() else f"{path} does not exist"


def missing_weights_error(spec: EncoderSpec) -> HingeError:
    looked = ", ".join(str(d / f"models--{spec.hf_repo.replace('/', '--')}") for d in hf_cache_dirs())
    return HingeError(
        f"no weights found for encoder '{spec.name}' (looked in {looked})",
        f"download {spec.hf_repo} from Hugging Face (gated; accept its terms) and pass {setting('weights')} {spec.name}=FILE, "
        f"or set HF_HOME to the cache that holds it; or use {setting('encoder')} default, which needs no weights",
    )


@dataclass
class Encoder:
    """A ready encoder: module on its device, with preprocessing and views."""

    spec: EncoderSpec
    module: nn.Module
    device: torch.device
    weights: Path | None = None
    weights_sha256: str | None = None
    _norm: tuple[torch.Tensor, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        self._norm = (mean, std)
        devices.place_module(self.module, self.device)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _prepare(self, patches: np.ndarray | torch.Tensor, fld: Field, views: int) -> torch.Tensor:
        """uint8 (B, P, P, 3) -> the normalised network input: the published resize and crop on uint8 (on the CPU,
        so every device sees the same pixels), then ToTensor and Normalize on the device."""
        x = self.spec.transform(fld)(torch.as_tensor(patches, device="cpu").permute(0, 3, 1, 2))
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        x = dihedral_views(x, views)
        x = (x - self._norm[0]) / self._norm[1]
        return devices.images_layout(x, self.device)

    @torch.inference_mode()
    def __call__(self, fields: Sequence[np.ndarray | torch.Tensor], views: int = 1) -> np.ndarray:
        """One uint8 (B, P, P, 3) batch per field -> float32 (B, views, dim)."""
        if len(fields) != len(self.spec.fields):
            raise ValueError(f"{self.spec.name} takes {len(self.spec.fields)} fields, got {len(fields)}")
        inputs = [self._prepare(p, f, views) for p, f in zip(fields, self.spec.fields, strict=True)]
        with devices.autocast(self.device, enabled=self.spec.autocast):
            out = self.module(*inputs)
        b = out.shape[0] // views
        return out.float().view(views, b, -1).transpose(0, 1).cpu().numpy()

    @property
    def reads_slide(self) -> bool:
        """Whether this encoder works from whole-slide block maps (the default encoder) rather than patch batches."""
        return isinstance(self.module, MultiFieldHandcrafted)

    def plan_slide(self, centres: np.ndarray, slide_mpp: float, tile_px: int | None = None) -> list[TilePlan]:
        return self.module.plan_slide(centres, slide_mpp, tile_px)

    @torch.inference_mode()
    def encode_slide_rows(
        self,
        plans: Sequence[TilePlan],
        read: Callable[[Field, TilePlan], Iterable[np.ndarray]],
        views: int = 1,
        advance: Callable[..., None] | None = None,
        chunk: int = SLIDE_ROWS,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 (n, views, dim)) for a slide's planned spots, `chunk` spots at a time: the block maps are the
        slide's, the rows a chunk's, so memory does not grow with the number of spots (a capture area's bins).

        The statistics are exactly invariant to the 8 dihedral views of a field
        (`HandcraftedEncoder.view_invariant`, proven numerically in the tests), so
        every view is the same vector: computing them 8 times would change nothing.
        """
        if views > 1 and not self.module.view_invariant():
            raise HingeError(f"encoder '{self.spec.name}' is not invariant to the dihedral views with these fields",
                             f"use {setting('views', '1')} for it")
        maps = self.module.block_maps(plans, read, advance)
        n = len(plans[0].starts) if plans else 0
        for start in range(0, n, chunk):
            feats = self.module.pool(maps, plans, slice(start, min(n, start + chunk))).cpu().numpy()
            yield start, np.repeat(feats[:, None], views, axis=1)

    def encode_slide(
        self,
        plans: Sequence[TilePlan],
        read: Callable[[Field, TilePlan], Iterable[np.ndarray]],
        views: int = 1,
        advance: Callable[..., None] | None = None,
    ) -> np.ndarray:
        """Float32 (N, views, dim) for a slide's planned spots, all at once (`encode_slide_rows` joined)."""
        parts = [feats for _, feats in self.encode_slide_rows(plans, read, views, advance)]
        return np.concatenate(parts) if parts else np.zeros((0, views, self.dim), np.float32)


def dihedral_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """(B, C, H, W) -> (views*B, C, H, W): view k is rot90^(k mod 4), transposed for k >= 4."""
    if views == 1:
        return x
    if views != MAX_VIEWS:
        raise HingeError(f"{setting('views')} {views} is not supported", f"use {setting('views', '1')} or {setting('views', '8')} (the dihedral group)")
    out = []
    for k in range(MAX_VIEWS):
        v = x.transpose(-1, -2) if k >= 4 else x
        out.append(torch.rot90(v, k % 4, dims=(-2, -1)))
    return torch.cat(out, dim=0)


def build_encoder(name: str, weights: Path | None = None, device: str = "cpu") -> Encoder:
    """The named encoder with its weights loaded (HingeError if a learned encoder has none)."""
    from hinge_cli.core.files import sha256_file

    spec = get_spec(name)
    dev = devices.resolve_device(device)
    path = locate_weights(spec, weights)
    if spec.needs_weights and path is None:
        raise missing_weights_error(spec)
    if path is None:
        return Encoder(spec, spec.build(), dev)
    with torch.device("meta"):
        module = spec.build()
    state = select_keys(read_state_dict(path), spec.key_prefix, spec.drop_keys)
    load_into(module, state, spec.name, path)
    return Encoder(spec, module.float(), dev, path, sha256_file(path))
