"""Stand-ins for the slow stages: tiled synthetic samples, and default-encoder features (the real encoder is slow,
and tests of later stages need none)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hinge_cli.config import DiffusionConfig, load_config
from hinge_cli.data.samples import SampleSpec
from hinge_cli.encoders.registry import get_spec
from hinge_cli.formats.embeddings import EmbeddingAttrs, write_embeddings
from hinge_cli.formats.tiles import read_tiles
from hinge_cli.model import Hinge
from hinge_cli.run.directory import Run
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.stages.train import pretrain_warmup, train
from hinge_cli.synthetic.slides import SyntheticSample, make_synthetic_sample


def tiled_synthetic(root: Path, prefix: str, n: int, seed: int, **sample: Any) -> tuple[Run, list[SyntheticSample]]:
    """A run under `root` (tiny config, tiles without pixels) holding `n` synthetic samples `prefix0..` tiled at their spots."""
    run = Run(root / "run")
    cfg = run.config("tiny")
    cfg.tile.images = False
    samples = [make_synthetic_sample(root / "data", f"{prefix}{i}", seed=seed + i, **sample) for i in range(n)]
    for s in samples:
        tile_sample(run, SampleSpec(s.sample_id, s.slide, s.spots), cfg.tile)
    return run, samples


def write_features(run: Run, sample: str, seed: int, views: int = 1) -> None:
    """Random N(0, 1) features of the default encoder's width; with views > 1 every view is stored (N, V, D)."""
    tiles = read_tiles(run.tiles(sample))
    dim = get_spec("default").dim
    kept = {"views": views, "views_kept": True} if views > 1 else {}
    attrs = EmbeddingAttrs(encoder="default", encoders=["default"], dims=[dim], weights_sha256=[None], weights=[None], **kept)
    shape = (len(tiles.barcodes), views, dim) if views > 1 else (len(tiles.barcodes), dim)
    features = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    path = run.embeddings("default", sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_embeddings(path, attrs, tiles.barcodes, tiles.coords, features.shape) as out:
        out.write(features)
    run.record_output(sample, "embed:default", path)


def trained_tiny(root: Path, **tile: Any) -> tuple[Run, list[SyntheticSample]]:
    """A run with synthetic samples t0 and t1 (384 px at 2 µm/px, 40 genes, stand-in features) and a tiny model trained
    briefly on them (a 12-gene panel, one warm-up epoch, two training epochs); `tile` overrides tile settings."""
    run = Run(root / "run")
    cfg = run.config("tiny")
    cfg.tile.images, cfg.train.epochs = False, 2
    for key, value in tile.items():
        setattr(cfg.tile, key, value)
    made = []
    for i in range(2):
        s = make_synthetic_sample(root / "data", f"t{i}", size_px=384, mpp=2.0, seed=20 + i, n_genes=40)
        tile_sample(run, SampleSpec(s.sample_id, s.slide, s.spots), cfg.tile)
        write_features(run, s.sample_id, i)
        made.append(s)
    cfg.warmup.n_genes, cfg.warmup.epochs, cfg.warmup.val_fraction = 12, 1, 0.2
    pretrain_warmup(run, cfg)
    train(run, cfg)
    return run, made


TINY_GENES = 23


def tiny_hinge() -> Hinge:
    """An untrained tiny HINGE network over `TINY_GENES` genes and 6 image features, its conditioning made to matter."""
    torch.manual_seed(0)
    model = Hinge.build(load_config("tiny").model, 50, torch.arange(1, TINY_GENES + 1), 6, DiffusionConfig(steps=10, fill="noise"))
    with torch.no_grad():
        for mod in model.layer_mods:
            mod.proj.weight.normal_(0, 0.05)
    return model
