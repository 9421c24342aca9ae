"""What turns a batch of a sample's embedding rows into predictions: HINGE's sampler or the stored ridge.

`generate` writes whatever a Predictor returns into the same file format, so the two models
differ only here: their provenance, their batch step, and the titles of their maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hinge_cli.config import GenerateConfig
from hinge_cli.core import devices
from hinge_cli.core.files import sha256_file
from hinge_cli.data.dataset import SpotTable
from hinge_cli.data.features import FeatureNorm, prediction_view
from hinge_cli.formats.embeddings import open_embeddings
from hinge_cli.formats.prediction import PredictedBatch
from hinge_cli.model.sampler import sampling_steps
from hinge_cli.predict.coupling import GeneCoupling, ImageTransfer, image_transfer
from hinge_cli.predict.given import GivenGenes
from hinge_cli.predict.predictive import gene_coupling, one_shot_predictions, predictive, sampler_of
from hinge_cli.predict.ridge import fit_ridge, load_ridge, predictive_batch, ridge_path
from hinge_cli.predict.trained import TrainedModel
from hinge_cli.run.directory import Run
from hinge_cli.training.data import card_table, split_rows

log = logging.getLogger(__name__)

LOW_IMAGE_WEIGHT = 0.5  # below it, generate --given warns that the image transfers poorly to the slide


@dataclass
class Predictor:
    """What writes a prediction file: a name (uns['hinge']['model']), its own provenance, and a batch step
    from raw embedding rows (spots start:stop) to predictions."""

    name: str
    provenance: dict[str, Any]
    predict: Callable[[np.ndarray, int, int], PredictedBatch]
    with_spread: bool = True
    keep_draws: int | None = None
    map_titles: tuple[str, ...] = ("prediction", "uncertainty (std over samples)")
    given: GivenGenes | None = None

    @property
    def stage(self) -> str:
        return generate_stage(self.name)


def generate_stage(model: str) -> str:
    """A model's manifest stage: `generate` for HINGE, `generate:ridge` for the baseline, so neither hides the other."""
    return "generate" if model == "hinge" else f"generate:{model}"


def hinge_predictor(model: TrainedModel, cfg: GenerateConfig, given: GivenGenes | None = None,
                    transfer: ImageTransfer | None = None) -> Predictor:
    """`cfg`'s sampler on the original view, `cfg.n_samples` draws a spot, the spread widened by the card's scale;
    the `given` genes held at their measured values, the image weighed against them by `transfer` (`completion_predictor`)."""
    sampler = sampler_of(model.net, cfg)
    if sampler != cfg.sampler:
        log.warning("this model predicts no spread (diffusion.likelihood: mse), so it samples with the reverse process: "
                    "each gene is revealed at its mean, and layers['std'] shows only how gene order changes the prediction")
    calibration = model.card.calibration if cfg.calibrated else None
    if calibration is not None and calibration.sampler != sampler:
        log.warning("the spread scale in %s was fitted for the %s sampler, not %s: run `hinge calibrate` to fit it again",
                    model.path.name, calibration.sampler, sampler)
    scale = torch.tensor(calibration.scale, device=model.device) if calibration is not None else None
    coupling = gene_coupling(model.card.coupling) if model.card.coupling is not None else None
    if sampler == "coupled" and coupling is None:
        log.warning("%s has no gene coupling (`hinge train` measures it; `hinge calibrate` adds it to a model trained before "
                    "it existed): genes are drawn independently and given genes do not inform the others", model.path.name)
    if transfer is not None and coupling is not None and coupling.joint is not None:
        coupling = GeneCoupling(coupling.correlation, coupling.joint.deflated(transfer.weight))

    def predict(rows: np.ndarray, start: int, stop: int) -> PredictedBatch:
        x = torch.from_numpy(model.norm(prediction_view(rows))).to(model.device)
        held = given.rows(start, stop, model.device) if given is not None else (None, None)
        with devices.autocast(model.device):
            pred = predictive(model.net, x, cfg, torch.arange(start, stop), *held, scale=scale, coupling=coupling)
        return pred.batch(cfg.keep_samples)

    steps = {"steps": sampling_steps(cfg.steps, model.net.diffusion.steps)} if sampler == "reverse" else {}
    provenance = {"model": "hinge", "sampler": sampler, **steps, "samples": cfg.n_samples, "seed": cfg.seed,
                  "fill": model.net.diffusion.fill, "temperature": cfg.temperature, "point": cfg.point,
                  "spread_scale": "validation" if scale is not None else "none",
                  "gene_coupling": "training spots" if sampler == "coupled" and coupling is not None else "none",
                  **(given.provenance() if given else {}), **(transfer.to_dict() if transfer else {})}
    return Predictor("hinge", provenance, predict, keep_draws=cfg.n_samples if cfg.keep_samples else None, given=given)


def completion_predictor(model: TrainedModel, cfg: GenerateConfig, given: GivenGenes, embeddings: Path,
                         sample: str) -> Predictor:
    """HINGE completing the panel from `given`, with the image weighed by how well it predicts the given genes on this
    slide (`model.joint.image_transfer`): one extra forward pass over the slide's spots."""
    return hinge_predictor(model, cfg, given, measure_transfer(model, cfg, given, embeddings, sample))


def measure_transfer(model: TrainedModel, cfg: GenerateConfig, given: GivenGenes, embeddings: Path,
                     sample: str) -> ImageTransfer | None:
    """The image's weight on this slide; None for a model without a joint Gaussian (no weight to set)."""
    card = model.card.coupling
    if card is None or not card.joint_correlation or not model.net.has_spread:
        return None
    with open_embeddings(embeddings) as features:
        rows = model.slide_features(features, sample)(features.rows(0, features.shape[0]))
    x = torch.from_numpy(model.norm(prediction_view(rows)))
    with devices.autocast(model.device):
        predicted, _ = one_shot_predictions(model.net, x, len(x), cfg.seed)
    columns = given.per_gene
    noise = np.zeros(given.values.shape)
    noise[:, columns] = model.card.transform.count_noise_variance(given.values[:, columns], given.depth[:, None])
    transfer = image_transfer(gene_coupling(card).joint, predicted, given.values, given.mask, noise)
    words = (f"the image predicts the {transfer.n_genes} given genes on this slide with r {transfer.slide_r:.2f} (count noise "
             f"removed), against {transfer.expected_r:.2f} expected from training: its weight against them is {transfer.weight:.2f}")
    if transfer.weight < LOW_IMAGE_WEIGHT:
        log.warning("%s: %s, so the completion leans on the given genes (the slide's images are unlike the training slides')",
                    sample, words)
    else:
        log.info("%s: %s", sample, words)
    return transfer


def ridge_predictor(model: TrainedModel, cfg: GenerateConfig) -> Predictor:
    """The ridge baseline stored beside the checkpoint: its mean and per-gene Gaussian, with `cfg.n_samples` draws a
    spot when samples are kept; a mean alone (no spread, no draws) from a ridge file older than its residual std."""
    path = ridge_path(model.path)
    ridge = load_ridge(model.path, model.genes, model.key)
    spread = ridge.residual_std is not None
    n_draws = cfg.n_samples if cfg.keep_samples and spread else None
    provenance = {"model": "ridge", "ridge": str(path.resolve()), "ridge_sha256": sha256_file(path),
                  "penalty": ridge.penalty, "inner_cv_depth_partial": ridge.score, "ridge_samples": ridge.samples}
    if spread:
        provenance |= {"residual_std_source": ridge.residual_source, "seed": cfg.seed}
    if n_draws:
        provenance["samples"] = n_draws

    def predict(rows: np.ndarray, start: int, stop: int) -> PredictedBatch:
        return predictive_batch(ridge, rows, np.arange(start, stop), cfg.seed, n_draws)

    return Predictor("ridge", provenance, predict, with_spread=spread, keep_draws=n_draws, map_titles=("ridge prediction",))



def genes_ridge_predictor(run: Run, model: TrainedModel, cfg: GenerateConfig, given: GivenGenes) -> Predictor:
    """Panel completion's genes-only baseline (`generate --model ridge --given`): a ridge from the given genes alone to
    the panel, fitted on the training spots of the model's split (as the image ridge is) with no image. It says how much
    of a completion the given genes carry by themselves. Spots the given file leaves out are predicted by the image ridge
    stored beside the checkpoint; the given genes are held at their measured values, as HINGE holds them."""
    table = card_table(run, model.card)
    train_rows, _ = split_rows(model.card.split, table)
    columns = [model.genes.index(g) for g in given.genes]
    inputs = table.targets[:, columns]
    genes_only = SpotTable(table.sample, table.barcodes, table.coords, inputs, table.targets, table.depth).subset(train_rows)
    ridge = fit_ridge(genes_only, FeatureNorm.fit(genes_only.features), model.genes, "given genes", model.card.split.seed,
                      transform=model.card.transform)
    image = ridge_predictor(model, cfg)
    n_draws = image.keep_draws
    log.info("genes-only ridge from %d given genes: λ = %.3g, inner-CV depth-partial Pearson %.3f on %d training spots",
             len(columns), ridge.penalty, ridge.score, ridge.n_spots)

    def predict(rows: np.ndarray, start: int, stop: int) -> PredictedBatch:
        covered = given.mask[start:stop][:, columns].all(1)
        batch = image.predict(rows, start, stop)
        from_genes = predictive_batch(ridge, given.values[start:stop][:, columns], np.arange(start, stop), cfg.seed, n_draws)
        return held_given(choose_spots(covered, from_genes, batch), given.mask[start:stop], given.values[start:stop])

    provenance = {**image.provenance, "ridge_inputs": "the given genes alone (panel completion's genes-only baseline)",
                  "penalty": ridge.penalty, "inner_cv_depth_partial": ridge.score, "ridge_samples": ridge.samples,
                  "residual_std_source": ridge.residual_source, "image_ridge_for": "spots the given file leaves out",
                  **given.provenance()}
    return Predictor("ridge", provenance, predict, with_spread=image.with_spread, keep_draws=n_draws, map_titles=image.map_titles,
                     given=given)


def choose_spots(take: np.ndarray, first: PredictedBatch, second: PredictedBatch) -> PredictedBatch:
    """Each spot's layers from `first` where `take`, else from `second`."""
    def pick(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
        return None if a is None or b is None else np.where(take.reshape(-1, *[1] * (a.ndim - 1)), a, b).astype(np.float32)

    return PredictedBatch(pick(first.mean, second.mean), pick(first.std, second.std), pick(first.q05, second.q05),
                          pick(first.q95, second.q95), pick(first.draws, second.draws))


def held_given(batch: PredictedBatch, mask: np.ndarray, values: np.ndarray) -> PredictedBatch:
    """The given genes at their measured values with no spread, in every layer and draw."""
    def hold(layer: np.ndarray | None, value: np.ndarray) -> np.ndarray | None:
        if layer is None:
            return None
        if layer.ndim == 3:  # draws (spots, draws, genes)
            return np.where(mask[:, None], value[:, None], layer).astype(np.float32)
        return np.where(mask, value, layer).astype(np.float32)

    zero = np.zeros_like(values)
    return PredictedBatch(hold(batch.mean, values), hold(batch.std, zero), hold(batch.q05, values), hold(batch.q95, values),
                          hold(batch.draws, values))
