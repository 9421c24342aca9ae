"""The six foundation encoders as their authors publish them: timm's ViTs (open_clip's attentional pooler for
CONCH's tower) and the torchvision transforms of their model cards, over PIL images.

Installed with `pip install -e '.[reference]'`; tests that use `reference()` skip with a message where
they are absent. torchvision's compiled ops cannot load beside the CPU torch wheel, and its import
registers fake kernels for two of them (`nms`, `qnms`); declaring their schemas first lets the pure-Python
transforms import. Nothing here uses those ops.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from hinge_cli.encoders.conch import CONCH_TRUNK, ConchVision
from hinge_cli.encoders.registry import ARCHS, REGISTRY, EncoderSpec
from hinge_cli.encoders.vit import VisionTransformer, ViTArch

REDUCED = {"embed_dim": 96, "depth": 2, "num_heads": 4}  # 96 keeps every family's MLP width an even integer


@dataclass(frozen=True)
class Published:
    timm_name: str
    timm_kwargs: dict[str, Any]
    resize: int | None  # torchvision Resize(int), or no resize
    interpolation: str
    crop: int | None
    pool: str = "token"  # token | token+mean (Virchow2's class token and mean patch token) | conch


def _swiglu() -> dict[str, Any]:
    import timm

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


def published(name: str) -> Published:
    """Each encoder's published construction (timm model and overrides) and evaluation transform."""
    big_swiglu = {"init_values": 1e-5, **_swiglu()}
    return {
        "uni": Published("vit_large_patch16_224", {"init_values": 1e-5, "dynamic_img_size": True}, 224, "bilinear", None),
        "uni2-h": Published("vit_giant_patch14_224", {"patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                                      "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **big_swiglu},
                            224, "bilinear", None),
        "h-optimus-0": Published("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "dynamic_img_size": False, "init_values": 1e-5},
                                 None, "bicubic", None),
        "virchow2": Published("vit_huge_patch14_224", {"mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True,
                                                       **big_swiglu}, 224, "bicubic", 224, pool="token+mean"),
        "gigapath": Published("vit_giant_patch14_dinov2", {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                           "init_values": 1e-5, "mlp_ratio": 5.33334}, 256, "bicubic", 224),
        "conch": Published("vit_base_patch16_224", {"img_size": 448, "global_pool": ""}, 448, "bicubic", 448, pool="conch"),
    }[name]


def reference() -> ModuleType:
    """timm, once torchvision's transforms can import; skips the test where the reference extras are missing."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("the reference implementations are not installed: pip install -e '.[reference]'")
    except RuntimeError as exc:  # its compiled ops did not load: declare the two schemas its import registers fakes for
        if "torchvision::" not in str(exc):
            raise
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        library = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive on the module below
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_TORCHVISION_SCHEMAS"] = library
        importlib.import_module("torchvision")
    try:
        import open_clip  # noqa: F401
        import timm
    except ModuleNotFoundError:
        pytest.skip("the reference implementations are not installed: pip install -e '.[reference]'")
    return timm


class ConchReference(nn.Module):
    """CONCH's image tower as its code builds it: a timm trunk, open_clip's attentional poolers, a norm and a projection."""

    def __init__(self, trunk: nn.Module, width: int):
        super().__init__()
        from open_clip.transformer import AttentionalPooler

        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(512, width, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(512)
        self.proj_contrast = nn.Parameter(torch.randn(512, 512) * width**-0.5)
        self.attn_pool_caption = AttentionalPooler(width, width, n_head=8, n_queries=256)
        self.ln_caption = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk(x))[:, 0])  # encode_image(proj_contrast=False)


def reference_model(name: str, reduced: bool) -> nn.Module:
    """The published model with random weights, every 1-D parameter re-drawn so that LayerScale hides nothing."""
    timm = reference()
    spec = published(name)
    torch.manual_seed(sum(map(ord, name)))
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **{**spec.timm_kwargs, **(REDUCED if reduced else {})})
    if spec.pool == "conch":
        model = ConchReference(model, REDUCED["embed_dim"] if reduced else CONCH_TRUNK.embed_dim)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if key.endswith(("weight", "gamma")) else 0.0))
    return model.eval()


def reference_state(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint as the authors ship it: CONCH's whole model under `visual.` (with a text-tower key beside it)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if name == "conch":
        state = {f"visual.{k}": v for k, v in state.items()} | {"text.token_embedding.weight": torch.zeros(4, 8)}
    return state


def reference_features(name: str, model: nn.Module, patches: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) patches through the published torchvision/PIL transform and the reference model."""
    reference()
    from PIL import Image
    from torchvision import transforms

    spec, hinge = published(name), REGISTRY[name]
    steps = []
    if spec.resize is not None:
        mode = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}[spec.interpolation]
        steps.append(transforms.Resize(spec.resize, interpolation=mode))
    if spec.crop is not None:
        steps.append(transforms.CenterCrop(spec.crop))
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(hinge.mean, hinge.std)])
    x = torch.stack([transform(Image.fromarray(p)) for p in patches])
    with torch.inference_mode():
        if spec.pool == "token+mean":
            tokens = model.forward_features(x)
            return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens :].mean(1)], dim=-1).numpy()
        return model(x).numpy()


def reduced_spec(name: str) -> EncoderSpec:
    """The registry's entry at the reference's reduced size: same transform, names and options, fewer and narrower layers."""
    spec = REGISTRY[name]
    if name == "conch":
        trunk = CONCH_TRUNK.scaled(**REDUCED)
        return replace(spec, build=lambda: ConchVision(trunk))
    arch: ViTArch = ARCHS[name].scaled(**REDUCED)
    return replace(spec, build=lambda: VisionTransformer(arch), arch=arch, dim=arch.out_dim)
