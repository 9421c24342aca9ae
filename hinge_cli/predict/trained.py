"""A trained HINGE model ready to predict: the network, checked against its model card, and the card's settings.

`hinge generate` tiles and embeds new slides exactly as the training samples were, so
what it needs from the card (tiling, encoders, feature normalisation) is read here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hinge_cli.config import EmbedConfig, TileConfig
from hinge_cli.core.devices import resolve_device
from hinge_cli.data.features import FeatureNorm, SlideShift
from hinge_cli.encoders.registry import EncoderSpec, encoder_key, parse_encoders
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.embeddings import EmbeddingReader
from hinge_cli.formats.genes import panel_sha256, read_gene_list
from hinge_cli.model.card import EmbedSettings, ModelCard, TileSettings
from hinge_cli.model.checkpoint import load_checkpoint, read_checkpoint_card
from hinge_cli.model.hinge import Hinge
from hinge_cli.run.directory import Run
from hinge_cli.run.lineage import GENES_FILE


@dataclass
class TrainedModel:
    """A trained checkpoint, checked to be self-consistent, with what generation needs from its card."""

    path: Path
    net: Hinge
    card: ModelCard
    device: torch.device

    @property
    def genes(self) -> list[str]:
        return list(self.card.genes)

    @property
    def specs(self) -> list[EncoderSpec]:
        return parse_encoders(",".join(self.card.encoders))

    @property
    def key(self) -> str:
        return str(self.card.encoder_key)

    @property
    def norm(self) -> FeatureNorm:
        return self.card.feature_norm

    def slide_features(self, embeddings: Path | EmbeddingReader, sample: str) -> Callable[[np.ndarray], np.ndarray]:
        """What a slide's raw embedding rows become before `norm`: standardised by all the slide's spots where the
        model was trained so (`SlideShift`), else unchanged."""
        if not self.card.per_slide:
            return lambda rows: rows
        return SlideShift.read(embeddings, sample)

    @property
    def tiling(self) -> TileSettings:
        return self.card.tiling

    def tile_config(self) -> TileConfig:
        """The tiling the training samples were cut with: their recorded settings over the run config of that time."""
        base = self.card.config.tile if self.card.config is not None else TileConfig()
        made = self.tiling
        needs_patches = any(f.mpp is None for spec in self.specs for f in spec.fields)
        return dataclasses.replace(base, target_mpp=made.target_mpp, patch_px=made.patch_px, spot_um=made.spot_um,
                                   pitch_um=made.pitch_um, grid=made.grid, images=needs_patches)

    def embed_config(self, device: str) -> EmbedConfig:
        """Training's encoder settings; kept views were augmentations, so prediction needs only the original."""
        base = self.card.config.embed if self.card.config is not None else EmbedConfig()
        made = self.card.embedding or EmbedSettings()
        averaged = made.views > 1 and not made.views_kept
        return dataclasses.replace(base, encoder=",".join(self.card.encoders), views=8 if averaged else 1,
                                   average_views=averaged, device=device)

    def trained_weights(self) -> list[str | None]:
        """The sha256 of each encoder's weights at training (None: an encoder without learned weights)."""
        return list((self.card.embedding or EmbedSettings()).weights_sha256)


def load_trained_model(path: Path, device: str = "auto") -> TrainedModel:
    """Load a HINGE checkpoint and check that its card describes its weights (panel, encoder, features)."""
    dev = resolve_device(device)
    checkpoint = load_checkpoint(path, device=dev)
    card = checkpoint.card
    if card.kind != "hinge" or not isinstance(checkpoint.net, Hinge):
        raise HingeError(f"{path} is a bare backbone, not a trained HINGE model",
                         f"use checkpoints/best.safetensors after `{command('train')}`")
    net: Hinge = checkpoint.net
    recorded = {"encoder_key": card.encoder_key, "feature_norm": card.feature_norm, "tile": card.tiling,
                "encoder": card.encoders or None}
    missing = [name for name, value in recorded.items() if value is None]
    if missing:
        raise HingeError(f"{path} does not record {', '.join(missing)}",
                         f"use a checkpoint written by `{command('pretrain-warmup')}` or `{command('train')}`")
    genes = card.genes or []
    if len(genes) != net.n_genes or len(set(genes)) != len(genes):
        raise HingeError(f"{path}: the sidecar lists {len(genes)} panel genes but the weights predict {net.n_genes}",
                         "keep each checkpoint's .json beside its own .safetensors")
    model = TrainedModel(Path(path), net, card, dev)
    specs = model.specs
    if model.key != encoder_key(specs):
        raise HingeError(f"{path}: encoder key {model.key} does not match its encoders {card.encoders}",
                         "re-create the checkpoint")
    dim = sum(s.dim for s in specs)
    if dim != net.image_dim or len(model.norm.mean) != net.image_dim:
        raise HingeError(f"{path}: encoder {model.key} gives {dim}-dim features, the model takes {net.image_dim}",
                         "train the model on features of the encoder its sidecar names")
    return model


def require_panel(run: Run, checkpoints: Sequence[Path]) -> None:
    """Refuse checkpoints of the run trained on another gene panel than its genes.txt (edited, or written again by a
    second warm-up), before any work: each would otherwise be consumed with the new panel until a shape mismatch."""
    listed = run.root / GENES_FILE
    if not listed.exists():
        return
    panel = read_gene_list(listed)
    now = panel_sha256(panel)
    for path in checkpoints:
        card = read_checkpoint_card(path) if Path(path).exists() else None
        if card is None or not card.genes:
            continue
        recorded = card.panel_sha256 or panel_sha256(card.genes)
        if recorded != now:
            fix = (f"run `{command('pretrain-warmup')} {setting('overwrite')}` to warm up on genes.txt's panel, or restore genes.txt" if Path(path).stem == "warmup"
                   else f"pass {setting('overwrite')} to `{command('train')}` to train again from a warm-up on genes.txt's panel (`{command('pretrain-warmup')} "
                        f"{setting('overwrite')}` first if the warm-up is on the old one), or restore genes.txt")
            raise HingeError(f"{path} was trained on another gene panel than {listed} ({len(card.genes)} genes, sha256 "
                             f"{recorded[:12]}; {GENES_FILE}: {len(panel)} genes, {now[:12]})", fix)
