"""Encoders: published key names and shapes, real forwards at small size, weight loading, the default encoder."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hinge_cli.encoders import registry as enc
from hinge_cli.encoders.conch import CONCH_TRUNK, ConchVision
from hinge_cli.encoders.embedding import read_plan_tiles
from hinge_cli.encoders.handcrafted import CHANNELS, MAPS, SPREAD_MAPS, TISSUE_MAPS, HandcraftedEncoder
from hinge_cli.encoders.registry import ARCHS, REGISTRY, Encoder, build_encoder, dihedral_views, get_spec, parse_encoders
from hinge_cli.encoders.vit import VisionTransformer, ViTArch
from hinge_cli.encoders.weights import find_in_hf_cache, read_state_dict, select_keys
from hinge_cli.errors import HingeError
from hinge_cli.slide.patches import iter_patch_batches
from hinge_cli.slide.reader import open_slide
from hinge_cli.synthetic.slides import SyntheticSample, make_synthetic_sample


def vit_keys(d: int, depth: int, patch: int, n_pos: int, fc1: int, fc2_in: int, reg: int = 0, layer_scale: bool = True,
             prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The key -> shape list of a timm VisionTransformer checkpoint, as its definition lays it out."""
    keys = {
        "cls_token": (1, 1, d), "pos_embed": (1, n_pos, d),
        "patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,),
        "norm.weight": (d,), "norm.bias": (d,),
    }
    if reg:
        keys["reg_token"] = (1, reg, d)
    block = {
        "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (fc1, d), "mlp.fc1.bias": (fc1,), "mlp.fc2.weight": (d, fc2_in), "mlp.fc2.bias": (d,),
    }
    if layer_scale:
        block |= {"ls1.gamma": (d,), "ls2.gamma": (d,)}
    for i in range(depth):
        keys |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return {prefix + k: v for k, v in keys.items()}


PUBLISHED = {
    # UNI: timm vit_large_patch16_224, init_values=1e-5 (MahmoodLab/UNI).
    "uni": vit_keys(1024, 24, 16, 197, 4096, 4096),
    # UNI2-h: patch 14, 24 blocks, SwiGLUPacked 2*4096, 8 registers, no_embed_class.
    "uni2-h": vit_keys(1536, 24, 14, 256, 8192, 4096, reg=8),
    # H-optimus-0: vit_giant_patch14_reg4_dinov2 at 224 px.
    "h-optimus-0": vit_keys(1536, 40, 14, 256, 8192, 4096, reg=4),
    # Virchow2: vit_huge_patch14_224, mlp_ratio 5.3375 SwiGLUPacked, 4 registers inside pos_embed.
    "virchow2": vit_keys(1280, 32, 14, 261, 6832, 3416, reg=4),
    # Prov-GigaPath tile encoder: vit_giant_patch14_dinov2 with patch 16 at 224 px.
    "gigapath": vit_keys(1536, 40, 16, 197, 8192, 4096),
}
# CONCH `visual.*` minus the caption pooler: timm ViT-B/16 at 448 px without LayerScale, then the contrastive pooler.
PUBLISHED["conch"] = vit_keys(768, 12, 16, 785, 3072, 3072, layer_scale=False, prefix="trunk.") | {
    "attn_pool_contrast.query": (1, 512),
    "attn_pool_contrast.attn.q_proj_weight": (512, 512),
    "attn_pool_contrast.attn.k_proj_weight": (512, 768),
    "attn_pool_contrast.attn.v_proj_weight": (512, 768),
    "attn_pool_contrast.attn.in_proj_bias": (1536,),
    "attn_pool_contrast.attn.out_proj.weight": (512, 512),
    "attn_pool_contrast.attn.out_proj.bias": (512,),
    "attn_pool_contrast.ln_q.weight": (512,), "attn_pool_contrast.ln_q.bias": (512,),
    "attn_pool_contrast.ln_k.weight": (768,), "attn_pool_contrast.ln_k.bias": (768,),
    "ln_contrast.weight": (512,), "ln_contrast.bias": (512,),
    "proj_contrast": (512, 512),
}
OUT_DIMS = {"uni": 1024, "uni2-h": 1536, "h-optimus-0": 1536, "virchow2": 2560, "gigapath": 1536, "conch": 512}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_size_keys_and_shapes(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):
        module = spec.build()
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == PUBLISHED[name]
    assert spec.dim == OUT_DIMS[name]
    assert spec.needs_weights and spec.hf_repo


def small(arch: ViTArch) -> ViTArch:
    return arch.scaled(embed_dim=32, depth=2, num_heads=4, img_size=4 * arch.patch_size)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_small_vit_forward(name: str) -> None:
    torch.manual_seed(0)
    arch = small(ARCHS[name])
    model = VisionTransformer(arch).eval()
    x = torch.randn(3, 3, arch.img_size, arch.img_size)
    with torch.inference_mode():
        out = model(x)
        bigger = model(torch.randn(2, 3, arch.img_size + 2 * arch.patch_size, arch.img_size + 2 * arch.patch_size))
    assert out.shape == (3, arch.out_dim) and bigger.shape == (2, arch.out_dim)
    assert torch.isfinite(out).all() and torch.isfinite(bigger).all()
    assert out.std(0).mean() > 0  # different images, different features
    assert arch.out_dim == (64 if name == "virchow2" else 32)


def test_small_conch_forward_and_projection() -> None:
    torch.manual_seed(0)
    model = ConchVision(CONCH_TRUNK.scaled(32, 2, 4, img_size=64), embed_dim=16, heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        pooled = model(x)
        model.project = True
        projected = model(x)
        expected = pooled @ model.proj_contrast
    assert pooled.shape == projected.shape == (2, 16)
    assert torch.allclose(projected, expected)


@pytest.fixture
def tiny_uni(monkeypatch: pytest.MonkeyPatch) -> ViTArch:
    """The registry's 'uni' entry at toy size, so the real build/load path runs in milliseconds."""
    arch = small(ARCHS["uni"]).scaled(32, 2, 4, img_size=32)
    spec = dataclasses.replace(REGISTRY["uni"], build=lambda: VisionTransformer(arch), dim=arch.out_dim, fields=(enc.Field(32),), preprocess=None)
    monkeypatch.setitem(REGISTRY, "uni", spec)
    return arch


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_saved_weights_reload_strict_and_reproduce(tmp_path: Path, tiny_uni: ViTArch, suffix: str) -> None:
    torch.manual_seed(1)
    original = VisionTransformer(tiny_uni).eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_encoder("uni", weights=path)
    patches = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expect = original((torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255 - loaded._norm[0]) / loaded._norm[1])
    got = loaded([patches])
    assert got.shape == (2, 1, 32)
    np.testing.assert_allclose(got[:, 0], expect.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64


def test_renamed_key_is_a_clear_error(tmp_path: Path, tiny_uni: ViTArch) -> None:
    state = VisionTransformer(tiny_uni).state_dict()
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(HingeError, match=r"the architecture needs blocks\.0\.attn\.qkv\.weight, which the file lacks.*the file has blocks\.0\.attn\.qkv_renamed\.weight, which the architecture lacks"):
        build_encoder("uni", weights=path)


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(HingeError, match="could not be loaded safely"):
        read_state_dict(path)


def test_missing_weights_say_where_they_were_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(HingeError, match=r"no weights found for encoder 'conch' \(looked in .*hf/hub/models--MahmoodLab--CONCH") as info:
        build_encoder("conch")
    assert "--weights conch=FILE" in str(info.value)


def test_hf_cache_discovery_prefers_main_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "hub" / "models--MahmoodLab--UNI"
    for rev in ("aaa", "bbb"):
        (root / "snapshots" / rev).mkdir(parents=True)
        (root / "snapshots" / rev / "pytorch_model.bin").write_bytes(b"x")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("bbb\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_in_hf_cache("MahmoodLab/UNI") == root / "snapshots" / "bbb" / "pytorch_model.bin"
    assert find_in_hf_cache("MahmoodLab/CONCH") is None


def test_conch_checkpoint_is_reduced_to_the_vision_tower() -> None:
    full = {"visual.trunk.cls_token": torch.zeros(1), "visual.attn_pool_caption.query": torch.zeros(1),
            "visual.ln_caption.weight": torch.zeros(1), "text.token_embedding.weight": torch.zeros(1), "logit_scale": torch.zeros(())}
    spec = get_spec("conch")
    assert list(select_keys(full, spec.key_prefix, spec.drop_keys)) == ["trunk.cls_token"]
    assert list(select_keys({"trunk.cls_token": torch.zeros(1)}, spec.key_prefix, spec.drop_keys)) == ["trunk.cls_token"]


def test_dihedral_views_are_the_eight_symmetries() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = dihedral_views(x, 8).view(8, 2, 3, 4, 4)
    assert torch.equal(views[0], x)
    flat = {tuple(v[0, 0].flatten().tolist()) for v in views}
    assert len(flat) == 8
    with pytest.raises(HingeError):
        dihedral_views(x, 4)


def test_encoder_list_parsing() -> None:
    assert [s.name for s in parse_encoders("UNI, conch")] == ["uni", "conch"]
    with pytest.raises(HingeError, match="unknown encoder 'unii'"):
        parse_encoders("unii")
    with pytest.raises(HingeError, match="twice"):
        parse_encoders("uni,uni")


def test_default_encoder_needs_no_weights_and_is_deterministic() -> None:
    spec = get_spec("default")
    assert not spec.needs_weights
    rng = np.random.default_rng(0)
    fields = [rng.integers(0, 256, (2, f.px, f.px, 3), dtype=np.uint8) for f in spec.fields]
    a, b = build_encoder("default")(fields), build_encoder("default")(fields)
    assert a.shape == (2, 1, spec.dim)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


SMALL_FIELDS = (enc.Field(64, 4.0), enc.Field(64, 8.0))  # the default's geometry (16 µm blocks, nested regions), 64 px wide


@pytest.fixture(scope="module")
def slide_1mm(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSample:
    """A 1 mm synthetic slide at 1 µm/px: room for spots whose 512 µm fields stay inside it."""
    return make_synthetic_sample(tmp_path_factory.mktemp("slide1mm"), "m", size_px=1024, mpp=1.0, seed=11)


def small_default() -> Encoder:
    spec = dataclasses.replace(REGISTRY["default"], fields=SMALL_FIELDS, build=lambda: enc.MultiFieldHandcrafted(SMALL_FIELDS))
    return Encoder(spec, spec.build(), torch.device("cpu"))


def slide_level(encoder: Encoder, slide_path: Path, centres: np.ndarray, tile_px: int | None = None, views: int = 1) -> np.ndarray:
    with open_slide(slide_path) as slide:
        plans = encoder.plan_slide(centres, slide.mpp, tile_px)
        return encoder.encode_slide(plans, lambda fld, plan: read_plan_tiles(slide, fld, plan, 1), views)


def per_spot(encoder: Encoder, slide_path: Path, centres: np.ndarray) -> np.ndarray:
    with open_slide(slide_path) as slide:
        fields = [next(iter_patch_batches(slide, centres, f.mpp, f.px, len(centres), 1))[1] for f in encoder.spec.fields]
    return encoder(fields)[:, 0]


def test_slide_level_default_equals_the_per_spot_computation(slide_1mm: SyntheticSample) -> None:
    """Block maps computed once per slide and pooled per spot give each spot's own per-field statistics.

    Spots lie at least half the widest field (256 µm) inside the slide. On the 16 µm
    block grid the two computations share their blocks, so regions clear of the field's
    edge agree to rounding; the whole field differs only where the per-field blurs met
    the field's edge. Off the grid, blocks fall differently; the error stays far below
    that of pairing a spot with its neighbour's features.
    """
    encoder = small_default()
    grid = np.arange(288, 737, 64, dtype=np.float64)
    on_grid = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    slide, ref = slide_level(encoder, slide_1mm.slide, on_grid)[:, 0], per_spot(encoder, slide_1mm.slide, on_grid)
    part = encoder.module.parts[0].dim // 3  # statistics per region; regions run spot, neighbourhood, whole field
    inner = np.concatenate([np.arange(f * 3 * part, (f * 3 + 2) * part) for f in range(2)])
    whole = np.setdiff1d(np.arange(encoder.dim), inner)
    np.testing.assert_allclose(slide[:, inner], ref[:, inner], rtol=1e-3, atol=1e-4)
    rel = lambda a, b: np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    assert rel(slide[:, whole], ref[:, whole]).max() < 0.02

    off_grid = on_grid + np.random.default_rng(0).uniform(-24, 24, on_grid.shape)
    slide, ref = slide_level(encoder, slide_1mm.slide, off_grid)[:, 0], per_spot(encoder, slide_1mm.slide, off_grid)
    own, neighbour = rel(slide, ref), rel(slide, np.roll(ref, 1, axis=0))
    assert np.median(own) < np.median(neighbour) / 5 and own.max() < 0.1, (np.median(own), np.median(neighbour), own.max())
    # Tiles only bound memory: tiny tiles give the same block maps as one tile covering everything.
    np.testing.assert_allclose(slide_level(encoder, slide_1mm.slide, off_grid, tile_px=48)[:, 0], slide, rtol=1e-5, atol=1e-6)
    # Chunks of spots only bound memory too: pooled 7 at a time, every row is the one pooled with all the others.
    with open_slide(slide_1mm.slide) as opened:
        plans = encoder.plan_slide(off_grid, opened.mpp)
        chunks = list(encoder.encode_slide_rows(plans, lambda fld, plan: read_plan_tiles(opened, fld, plan, 1), chunk=7))
    assert [start for start, _ in chunks] == list(range(0, len(off_grid), 7))
    np.testing.assert_array_equal(np.concatenate([feats for _, feats in chunks])[:, 0], slide)
    # Deterministic, and a spot's row does not depend on which other spots are encoded with it.
    np.testing.assert_array_equal(slide_level(encoder, slide_1mm.slide, off_grid)[:, 0], slide)
    np.testing.assert_allclose(slide_level(encoder, slide_1mm.slide, off_grid[[5, 2]])[:, 0], slide[[5, 2]], rtol=1e-5, atol=1e-6)


def test_default_statistics_are_invariant_to_the_dihedral_views(slide_1mm: SyntheticSample) -> None:
    """Why --views 8 repeats the default encoder's features: every view of a field gives the same numbers."""
    encoder = small_default()
    centres = np.array([[400.0, 520.0], [610.0, 455.0]])
    with open_slide(slide_1mm.slide) as slide:
        fields = [next(iter_patch_batches(slide, centres, f.mpp, f.px, 2, 1))[1] for f in SMALL_FIELDS]
    views = encoder(fields, views=8)
    # Equal up to float32 summation order (the local-contrast map subtracts two close blurs).
    np.testing.assert_allclose(views, np.repeat(views[:, :1], 8, axis=1), rtol=1e-3, atol=1e-4)
    assert encoder.module.view_invariant() and build_encoder("default").module.view_invariant()
    repeated = slide_level(encoder, slide_1mm.slide, centres, views=8)
    assert repeated.shape == (2, 8, encoder.dim) and (repeated == repeated[:, :1]).all()
    # A region off-centre by half a block is not mapped onto itself by the views: refused, not faked.
    lopsided = HandcraftedEncoder(mpp=4.0, regions=(0.3,))
    assert not lopsided.view_invariant(64) and lopsided.view_invariant(80)
    encoder.module.parts[0] = lopsided
    with pytest.raises(HingeError, match="not invariant to the dihedral views"):
        slide_level(encoder, slide_1mm.slide, centres, views=8)


def test_handcrafted_channels_are_where_their_names_say() -> None:
    """One dark nucleus on glass: each named block map holds what its name says, and the layout follows the names."""
    encoder = HandcraftedEncoder(mpp=1.0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    nucleus = torch.exp(-((yy - 24) ** 2 + (xx - 40) ** 2) / (2 * 3.0**2))  # ~6 µm across, in block (1, 2)
    haematoxylin = torch.tensor([0.25, 0.2, 0.55]).view(3, 1, 1)
    blocks = encoder.blocks((1 - nucleus * (1 - haematoxylin)).unsqueeze(0))[0]
    channel = {name: blocks[i] for i, name in enumerate(CHANNELS)}
    assert blocks.shape == (len(CHANNELS), 4, 4)
    assert encoder.dim == len(encoder.regions) * (len(MAPS) + len(TISSUE_MAPS) + len(SPREAD_MAPS))
    one_peak = torch.zeros(4, 4)
    one_peak[1, 2] = 1.0 / encoder.block**2  # a block mean: one peak pixel among block x block
    torch.testing.assert_close(channel["peaks"], one_peak, rtol=0, atol=1e-7)
    assert [MAPS[i] for i in SPREAD_MAPS] == ["h", "e", "tissue", "peaks"]
    assert channel["h"].argmax() == channel["nuclear_dense"].argmax() == 6  # block (1, 2)
    torch.testing.assert_close(channel["tissue_weight"], channel["tissue"], rtol=0, atol=0)
    for stain in ("h", "e"):
        bins = torch.stack([blocks[i] for i, name in enumerate(CHANNELS) if name.startswith(f"{stain}_bin")])
        torch.testing.assert_close(bins.sum(0), torch.ones(4, 4))  # a histogram's fractions add up to one


def test_published_transforms_resize_the_short_side_then_crop_the_centre() -> None:
    """GigaPath's Resize(256) + CenterCrop(224) of a 224 px tile keeps its centre 196 px, magnified; a recipe without a
    resize passes its own size through untouched and resizes any other; the uint8 resize matches PIL's to one level."""
    from PIL import Image

    from hinge_cli.encoders.preprocess import Preprocess, center_crop

    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
    giga = REGISTRY["gigapath"].preprocess
    out = giga(torch.from_numpy(tile))
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.uint8
    pil = np.asarray(Image.fromarray(tile[0].transpose(1, 2, 0)).resize((256, 256), Image.BICUBIC))[16:240, 16:240]
    assert np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1
    keep = Preprocess(224, None, "bicubic")
    assert torch.equal(keep(torch.from_numpy(tile)), torch.from_numpy(tile))
    assert keep(torch.zeros(2, 3, 300, 300, dtype=torch.uint8)).shape == (2, 3, 224, 224)
    assert Preprocess(224, 224, "bilinear")(torch.zeros(1, 3, 300, 400, dtype=torch.uint8)).shape == (1, 3, 224, 224)
    assert center_crop(torch.arange(25).view(1, 1, 5, 5), 2).flatten().tolist() == [12, 13, 17, 18]  # offset round(1.5) = 2, as torchvision rounds
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(224, 256, "nearest")
    with pytest.raises(ValueError, match="crops 224 px"):
        dataclasses.replace(REGISTRY["uni"], fields=(enc.Field(448),))
