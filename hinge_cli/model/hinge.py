"""The HINGE model: a (frozen) backbone steered by SoftAdaLN from image, timestep and mask."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from hinge_cli.config import DiffusionConfig, ModelConfig
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.errors import HingeError, setting
from hinge_cli.model.backbone import Backbone
from hinge_cli.model.conditioning import ConditionNet, DirectPath, SoftAdaLN, SpreadHead
from hinge_cli.model.diffusion import MaskSchedule, check_fill, check_likelihood, check_loss_target, diffusion_loss
from hinge_cli.model.lora import apply_policy
from hinge_cli.model.sampler import Samples, one_shot, sample

ARCHITECTURE = ("d_model", "n_layers", "n_heads", "ffn_dim", "n_bins")


def check_architecture(have: ModelConfig, want: ModelConfig, what: str) -> None:
    """Raise if two configs disagree on the backbone's shape (weights would not fit)."""
    diff = [f"{k} {getattr(have, k)} vs {getattr(want, k)}" for k in ARCHITECTURE if getattr(have, k) != getattr(want, k)]
    if diff:
        raise HingeError(f"{what} does not match the model config ({', '.join(diff)})",
                         f"use the config preset the backbone was built with (e.g. {setting('config')} default for CellFM)")


class Hinge(nn.Module):
    """Predicts clean panel expression (B, G) from partly hidden values, t and an image feature.

    The panel's G genes are fixed at construction (`gene_ids`, indices into the backbone
    vocabulary, so a 25k-gene CellFM vocabulary serves a 50-gene panel).
    """

    def __init__(
        self,
        backbone: Backbone,
        gene_ids: Sequence[int] | Tensor,
        image_dim: int,
        cfg: ModelConfig | None = None,
        diffusion: DiffusionConfig | None = None,
    ):
        super().__init__()
        cfg = backbone.cfg if cfg is None else cfg
        check_architecture(backbone.cfg, cfg, "the backbone")
        ids = torch.as_tensor(gene_ids, dtype=torch.long, device="cpu").flatten()
        bad = ((ids < 1) | (ids >= backbone.vocab_size)).nonzero().flatten().tolist()
        if bad or len(ids) == 0:
            raise HingeError(f"{len(bad) or 'no'} panel gene ids fall outside the backbone vocabulary 1..{backbone.vocab_size - 1}",
                             "map the panel through the backbone's gene list and drop genes it lacks")
        if image_dim < 1:
            raise HingeError(f"image feature dimension must be positive, not {image_dim}", "check the embeddings")
        self.cfg = cfg
        self.diffusion = diffusion or DiffusionConfig()
        check_fill(self.diffusion.fill)
        check_loss_target(self.diffusion.loss)
        check_likelihood(self.diffusion.likelihood)
        self.image_dim = image_dim
        self.backbone = backbone
        apply_policy(backbone, cfg.trainable, cfg.lora_rank, cfg.lora_alpha)
        self.register_buffer("gene_ids", ids)
        d, c = cfg.d_model, cfg.cond_dim
        self.condition = ConditionNet(image_dim, len(ids), c)
        self.layer_mods = nn.ModuleList(
            SoftAdaLN(d, c, 2, True, cfg.softnorm_logit_init, cfg.gate_logit_init) for _ in range(cfg.n_layers)
        )
        self.decoder_mod = SoftAdaLN(d, c, 1, False, cfg.softnorm_logit_init, cfg.gate_logit_init)
        self.direct = DirectPath(image_dim, len(ids), c, cfg.dropout) if cfg.direct_path else None
        self.spread = SpreadHead(d, c, len(ids)) if self.diffusion.likelihood == "gaussian" else None
        self.schedule = MaskSchedule(self.diffusion.steps, len(ids), self.diffusion.alpha)

    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        vocab_size: int,
        gene_ids: Sequence[int] | Tensor,
        image_dim: int,
        diffusion: DiffusionConfig | None = None,
    ) -> Hinge:
        """A HINGE model on a randomly initialised backbone (tests, ablations, meta-device counts)."""
        return cls(Backbone(cfg, vocab_size), gene_ids, image_dim, cfg, diffusion)

    @property
    def n_genes(self) -> int:
        return int(self.gene_ids.numel())

    @property
    def has_spread(self) -> bool:
        """Whether the model predicts a variance beside each mean (`diffusion.likelihood: gaussian`)."""
        return self.spread is not None

    def forward(self, values: Tensor, visible: Tensor, t: Tensor, image: Tensor,
                spread: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """values (B, G) with hidden entries filled, visible (B, G) bool, t (B,) int, image (B, D).

        The predicted clean expression (B, G); with `spread`, also its log-variance (B, G).
        """
        b = values.shape[0]
        if values.shape != (b, self.n_genes) or visible.shape != values.shape:
            raise HingeError(f"expression has shape {tuple(values.shape)}, the model's panel has {self.n_genes} genes",
                             "use the gene panel the model was trained on")
        if image.ndim != 2 or image.shape != (b, self.image_dim):
            raise HingeError(f"image features have shape {tuple(image.shape)}, expected ({b}, {self.image_dim})",
                             "pass one (spots, dim) view from the encoder the model was trained with")
        if spread and self.spread is None:
            raise HingeError("this model predicts no spread (diffusion.likelihood: mse)",
                             "train with diffusion.likelihood: gaussian for a predictive variance")
        c = self.condition(image, t, visible)
        layer_mods = [mod(c) for mod in self.layer_mods]
        (decoder_mod,) = self.decoder_mod(c)
        ids = self.gene_ids.expand(b, -1)
        states = decoder_mod.modulate(self.backbone.encode(ids, values, visible, layer_mods)[:, 1:])
        out = self.backbone.value_dec(states)
        out = out if self.direct is None else out + self.direct(image).to(out.dtype)
        return (out, self.spread(states, c).to(out.dtype)) if spread else out

    def loss(
        self,
        x0: Tensor,
        image: Tensor,
        generator: torch.Generator | None = None,
        max_hidden_fraction: float | None = None,
    ) -> Tensor:
        """Masked-diffusion loss on a batch of clean panels; `max_hidden_fraction` caps the share of genes hidden (the warm-start curriculum)."""
        return diffusion_loss(self, x0, image, self.schedule, self.diffusion, generator, max_hidden_fraction)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) for the duration, then the mode it was in."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def one_shot(self, image: Tensor, seed: int = 0, spot_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each gene's predictive mean and log-variance (B, G) from the image alone (every gene hidden)."""
        if self.spread is None:
            raise HingeError("this model predicts no spread (diffusion.likelihood: mse)",
                             f"use the reverse sampler ({setting('sampler')} reverse), or train with diffusion.likelihood: gaussian")
        index = torch.arange(image.shape[0]) if spot_index is None else spot_index
        with self._evaluating():
            return one_shot(self, image, self.schedule, seed=seed, spot_index=index, fill=self.diffusion.fill,
                            noise_std=self.diffusion.noise_std)

    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        n_samples: int = 8,
        steps: int | None = None,
        seed: int = 0,
        spot_index: Tensor | None = None,
        keep_samples: bool = False,
        temperature: float = 0.0,
        given: Tensor | None = None,
        given_values: Tensor | None = None,
        progress: Progress = SILENT,
    ) -> Samples:
        """Reverse process for a batch of spots, optionally with genes given; see `hinge_cli.model.sampler.sample`."""
        with self._evaluating():
            return sample(self, image, self.schedule, n_samples=n_samples, steps=steps, seed=seed,
                          spot_index=spot_index, fill=self.diffusion.fill, noise_std=self.diffusion.noise_std,
                          temperature=temperature, keep_samples=keep_samples, given=given, given_values=given_values,
                          progress=progress)
