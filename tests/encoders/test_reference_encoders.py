"""hinge's six foundation encoders against their reference implementations, preprocessing included.

For each encoder, the published model (timm; CONCH's tower from timm and open_clip parts) is built with
random weights and saved as the authors ship it, as .bin and as .safetensors. The same uint8 patches of a
tiles file then go through `hinge embed` (the command line, weights loaded through hinge's own path) and
through the published PIL/torchvision transform plus the reference model. They must agree to cosine
>= 0.99999 and max abs <= 1e-4 in fp32. The models run at reduced depth and width (2 layers of 96: the
registry's entry is swapped for the same architecture at that size); one published-size check per family
(ViT-L/16 GELU, the SwiGLU ViTs with registers, CONCH) runs with `-m published`. Skipped where the reference
extras (`pip install -e '.[reference]'`) are not installed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import reduced_spec, reference, reference_features, reference_model, reference_state
from safetensors.torch import save_file
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.data.samples import SampleSpec
from hinge_cli.encoders.preprocess import Preprocess
from hinge_cli.encoders.registry import REGISTRY
from hinge_cli.formats.embeddings import read_embeddings
from hinge_cli.formats.tiles import read_tile_images
from hinge_cli.run.directory import Run
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.synthetic.slides import make_synthetic_sample

pytestmark = pytest.mark.slow  # reference implementations of the foundation encoders

ENCODERS = ("uni", "uni2-h", "h-optimus-0", "virchow2", "gigapath", "conch")
COSINE, MAX_ABS = 0.99999, 1e-4


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """224 px patches at 0.5 µm/px, stored in the tiles file, as `hinge tile` cuts them with its defaults."""
    reference()
    root = tmp_path_factory.mktemp("reference")
    sample = make_synthetic_sample(root / "data", "ref", size_px=768, mpp=0.5, seed=3, pitch_um=60)
    run = Run(root / "run")
    cfg = run.config("default").tile
    cfg.pitch_um = 60.0
    tile_sample(run, SampleSpec(sample.sample_id, sample.slide, sample.spots), cfg)
    return run


def tile_patches(run: Run) -> np.ndarray:
    return np.concatenate([batch for _, batch in read_tile_images(run.tiles("ref"), 64)])


def hinge_embed(run: Run, name: str, weights: Path) -> np.ndarray:
    result = CliRunner().invoke(app, ["embed", "--run", str(run.root), "--encoder", name, "--weights", f"{name}={weights}",
                                      "--device", "cpu", "--overwrite", "-q"])
    assert result.exit_code == 0, result.output
    return read_embeddings(run.embeddings(name, "ref")).features


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max abs difference, smallest per-patch cosine)."""
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return float(np.abs(got - want).max()), float(cosine.min())


def check_against_reference(run: Run, name: str, model: torch.nn.Module, folder: Path) -> None:
    patches = tile_patches(run)
    assert len(patches) >= 4 and patches.shape[1] == 224
    want = reference_features(name, model, patches)
    state = reference_state(name, model)
    for suffix in (".bin", ".safetensors"):
        path = folder / f"{name}{suffix}"
        save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
        worst, cosine = agreement(hinge_embed(run, name, path), want)
        assert worst <= MAX_ABS and cosine >= COSINE, f"{name} ({suffix}): max abs {worst:.2e}, cosine {cosine:.7f}"


@pytest.mark.parametrize("name", ENCODERS)
def test_hinge_embed_matches_the_published_pipeline(tiled: Run, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = reference_model(name, reduced=True)
    monkeypatch.setitem(REGISTRY, name, reduced_spec(name))
    check_against_reference(tiled, name, model, tmp_path)


@pytest.mark.parametrize("name", ["gigapath", "conch"])
def test_the_check_sees_the_old_resize(tiled: Run, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before this suite, hinge resized each tile bilinearly straight to the network's input: the check fails it."""
    model = reference_model(name, reduced=True)
    spec = reduced_spec(name)
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(spec, preprocess=Preprocess(spec.fields[0].px, None, "bilinear")))
    path = tmp_path / f"{name}.safetensors"
    save_file(reference_state(name, model), str(path))
    worst, cosine = agreement(hinge_embed(tiled, name, path), reference_features(name, model, tile_patches(tiled)))
    assert worst > 10 * MAX_ABS


@pytest.mark.published
@pytest.mark.parametrize("name", ["uni", "virchow2", "conch"])
def test_published_size(tiled: Run, name: str, tmp_path: Path) -> None:
    check_against_reference(tiled, name, reference_model(name, reduced=False), tmp_path)
