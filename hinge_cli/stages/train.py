"""`hinge pretrain-warmup` and `hinge train`: a run's tiled, embedded samples in, a generator out.

pretrain-warmup: choose the gene panel on the training samples, get a backbone
(CellFM import, an earlier pre-training, pre-training on an expression corpus, or
random for ablations), wrap it in identity-initialised SoftAdaLN and train the
warm-start curriculum (only lightly masked timesteps). train: continue from the
warm-up on all timesteps, with validation, early stopping and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hinge_cli.config import HingeConfig, WarmupConfig
from hinge_cli.core.devices import resolve_device
from hinge_cli.core.distributed import Dist
from hinge_cli.core.figures import loss_curves
from hinge_cli.core.files import write_text_atomic
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.data.corpus import load_corpus
from hinge_cli.data.dataset import assemble, load_expression, training_samples
from hinge_cli.data.expression import Transform
from hinge_cli.data.features import SlideShift
from hinge_cli.data.panel import select_panel, shared_genes
from hinge_cli.data.shift import ShiftReference
from hinge_cli.encoders.registry import encoder_key, parse_encoders
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.embeddings import read_embedding_attrs
from hinge_cli.formats.genes import read_gene_list, write_gene_list
from hinge_cli.formats.tiles import read_tile_attrs, read_tiles
from hinge_cli.model import Backbone, Hinge, import_cellfm, load_checkpoint, read_vocab, save_checkpoint
from hinge_cli.model.card import BackboneSource, EmbedSettings, ModelCard, TileSettings, TrainingRecord
from hinge_cli.model.checkpoint import checkpoint_unit, finish_pending, read_checkpoint_card, write_checkpoint
from hinge_cli.predict.ridge import start_direct_path_at_ridge
from hinge_cli.predict.trained import require_panel
from hinge_cli.run.directory import Run
from hinge_cli.run.lineage import (
    GENES_FILE,
    WARMUP,
    changed_settings,
    require_ready_for_training,
    require_unchanged_since_warmup,
    training_inputs,
)
from hinge_cli.slide.stats import slide_stats
from hinge_cli.training.data import SplitData, card_table
from hinge_cli.training.fit import LoopSettings, LoopState, fit
from hinge_cli.training.losses import hinge_losses, pretrain_losses
from hinge_cli.training.refit import finish_training
from hinge_cli.training.selection import choose_split
from hinge_cli.training.state import read_train_state, write_train_state

log = logging.getLogger(__name__)

# Drawing the loss plot takes about a second (matplotlib), as long as a third of a HER2ST training epoch on 2 cores:
# redrawn every epoch it was 15% of a fold's training. The log itself is rewritten every epoch.
PLOT_INTERVAL_S = 30.0


class TrainingLog:
    """logs/<stage>.jsonl, rewritten every epoch, and plots/<stage>_loss.png, drawn at most every PLOT_INTERVAL_S while
    training and by `finish` once the loop ends."""

    def __init__(self, run: Run, stage: str) -> None:
        self.run, self.stage, self.drawn_at, self.drawn_epochs = run, stage, time.monotonic(), 0

    def epoch_end(self, state: LoopState) -> None:
        self._write(state)
        if time.monotonic() - self.drawn_at >= PLOT_INTERVAL_S:
            self._draw(state)

    def finish(self, state: LoopState) -> None:
        """The log again (a kill between an epoch's checkpoint and its log line leaves the re-run no epoch to write it)
        and the epochs the plot lacks."""
        self._write(state)
        if len(state.history) != self.drawn_epochs:
            self._draw(state)

    def _write(self, state: LoopState) -> None:
        write_text_atomic(self.run.log(self.stage), "".join(json.dumps(r) + "\n" for r in state.history))

    def _draw(self, state: LoopState) -> None:
        series = {"train": [r["train_loss"] for r in state.history], "validation": [r["val_loss"] for r in state.history]}
        selection = [r.get("val_depth_partial") for r in state.history]
        second = ("validation: generated depth-partial Pearson", selection) if any(v is not None for v in selection) else None
        loss_curves(self.run.plot(self.stage), series, f"{self.stage}: masked loss", second=second)
        self.drawn_at, self.drawn_epochs = time.monotonic(), len(state.history)


# ----------------------------------------------------------------------------- stages


@dataclass
class StageSummary:
    stage: str
    best_epoch: int
    best_val: float | None
    epochs: int
    seconds: float
    files: dict[str, str]
    selected_by: str = "validation loss"

    def lines(self) -> list[str]:
        out = [f"{self.stage}: {self.epochs} epochs in {self.seconds:.0f}s; best {self.selected_by} "
               f"{self.best_val:.4f} at epoch {self.best_epoch}" if self.best_val is not None else f"{self.stage}: done"]
        out += [f"  {name:<10} {path}" for name, path in self.files.items()]
        return out


def _encoder_key(cfg: HingeConfig) -> tuple[str, list[str]]:
    specs = parse_encoders(cfg.embed.encoder)
    return encoder_key(specs), [s.name for s in specs]


def _backbone_source(cfg: HingeConfig) -> tuple[Backbone | None, list[str] | None, str]:
    """A ready backbone and its vocabulary, when the source fixes them before the panel is chosen."""
    spec = cfg.warmup.backbone
    if spec.startswith("cellfm:"):
        if cfg.warmup.vocab is None:
            raise HingeError(f"{setting('backbone')} cellfm:CKPT needs CellFM's gene list", f"pass {setting('vocab')} path/to/CellFM_vocab.csv")
        backbone, report = import_cellfm(Path(spec.split(":", 1)[1]), cfg.model)
        for line in report.lines():
            log.info("%s", line)
        return backbone, read_vocab(cfg.warmup.vocab), "cellfm"
    if spec != "random":
        checkpoint = load_checkpoint(spec)
        if not checkpoint.card.vocab:
            raise HingeError(f"{spec} records no gene vocabulary", f"use a backbone written by `{command('pretrain-warmup')} {setting('corpus')}`")
        net = checkpoint.net
        return (net.backbone if isinstance(net, Hinge) else net), list(checkpoint.card.vocab), "file"
    return None, None, "corpus" if cfg.warmup.corpus else "random"


def _choose_panel(expression: dict, samples: list[str], wc: WarmupConfig, transform: Transform,
                  vocab: list[str] | None) -> list[str]:
    if wc.genes is not None:
        genes = read_gene_list(Path(wc.genes))
        absent = [g for g in genes if vocab is not None and g not in vocab]
        if absent:
            raise HingeError(f"{len(absent)} genes of {wc.genes} are not in the backbone's vocabulary: {', '.join(absent[:10])}",
                             "drop them from the list")
        return genes
    candidates = [expression[s] for s in samples]
    if vocab is not None:
        known = set(vocab)
        dropped = [g for g in shared_genes(candidates) if g not in known]
        if dropped and len(dropped) == len(shared_genes(candidates)):
            raise HingeError(f"no gene name of the samples is in the backbone's vocabulary (samples: {', '.join(dropped[:3])}; "
                             f"vocabulary: {', '.join(vocab[:3])})", "name genes the same way in both (e.g. map Ensembl ids "
                             "to symbols in the samples' var_names)")
        if dropped:
            log.info("%d genes absent from the backbone vocabulary are not candidates for the panel", len(dropped))
        candidates = [e.restrict(known) for e in candidates]
    return select_panel(candidates, wc.n_genes, wc.select, transform)


def pretrain_backbone(run: Run, cfg: HingeConfig, corpus_files: Sequence[Path], panel: list[str], transform: Transform,
                      dist: Dist, device: torch.device, overwrite: bool, progress: Progress) -> tuple[Backbone, list[str]]:
    """Pre-train (or reuse) `checkpoints/pretrain` on an expression-only corpus."""
    path = run.checkpoint("pretrain")
    corpus_paths = [str(Path(f).resolve()) for f in corpus_files]
    if path.exists() and not overwrite:
        checkpoint = load_checkpoint(path)
        stale = stale_pretraining(checkpoint.card, panel, transform, corpus_paths)
        if not stale:
            log.info("reusing the pre-trained backbone %s (pass --overwrite to pre-train again)", path)
            return checkpoint.net, checkpoint.card.vocab
        log.info("the existing pre-trained backbone %s: pre-training again", stale)
    corpus = load_corpus(corpus_files, transform, cfg.pretrain.max_vocab, always=panel, layer=cfg.warmup.corpus_layer)
    log.info("corpus: %d profiles, vocabulary of %d genes", len(corpus), len(corpus.vocab))
    torch.manual_seed(cfg.train.seed)
    backbone = Backbone(cfg.model, len(corpus.vocab) + 1).to(device)
    order = np.random.default_rng(cfg.train.seed).permutation(len(corpus))
    n_val = max(1, round(0.05 * len(corpus)))
    batch_loss, validate = pretrain_losses(corpus, order[n_val:], order[:n_val], cfg, dist, device, panel)
    pc, tc = cfg.pretrain, cfg.train
    settings = LoopSettings(stage="pretrain", epochs=pc.epochs, batch_size=pc.batch_size, lr=pc.lr,
                            weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, seed=tc.seed, schedule=tc.schedule)
    training_log = TrainingLog(run, "pretrain")
    state = fit(backbone, len(order) - n_val, batch_loss, validate, settings, dist=dist, device=device,
                on_epoch_end=lambda state, *_: training_log.epoch_end(state), progress=progress)
    if dist.main:
        training_log.finish(state)
        source = BackboneSource("corpus", corpus=corpus_paths)
        record = TrainingRecord(state.history, state.epoch, state.best_epoch, state.best_val, len(order) - n_val, n_val)
        save_checkpoint(path, backbone.cpu(), ModelCard("pretrain", vocab=corpus.vocab, transform=transform,
                                                        backbone=source, training=record))
    dist.barrier()
    return backbone.cpu(), corpus.vocab


def stale_pretraining(card: ModelCard, panel: list[str], transform: Transform, corpus: list[str]) -> str | None:
    """Why a stored pre-training cannot be reused for this panel, transform and corpus (None: it can)."""
    if not set(panel) <= set(card.vocab):
        return "lacks panel genes"
    if card.transform != transform:
        return f"was trained with --normalize {card.transform.normalize}, not {transform.normalize}"
    if card.backbone is not None and sorted(card.backbone.corpus) != sorted(corpus):
        return "was trained on another corpus"
    return None


def _ready_backbone(run: Run, cfg: HingeConfig, found: tuple[Backbone | None, list[str] | None, str], panel: list[str],
                    transform: Transform, dist: Dist, device: torch.device, overwrite: bool,
                    progress: Progress) -> tuple[Backbone, list[str], str]:
    """The source's backbone and vocabulary, pre-trained on the corpus or drawn at random if the source is either."""
    backbone, vocab, source = found
    if source == "corpus":
        backbone, vocab = pretrain_backbone(run, cfg, [Path(f) for f in cfg.warmup.corpus], panel, transform, dist,
                                            device, overwrite, progress)
    elif source == "random":
        log.warning("ABLATION: the backbone is randomly initialised. HINGE's premise is a pre-trained backbone; "
                    "pass --corpus FILES or --backbone cellfm:CKPT for real use")
        torch.manual_seed(cfg.train.seed)
        vocab = list(panel)
        backbone = Backbone(cfg.model, len(vocab) + 1)
    return backbone, vocab, source


def _warmup_curriculum(run: Run, cfg: HingeConfig, net: Hinge, data: SplitData, dist: Dist, device: torch.device,
                       progress: Progress) -> LoopState:
    """Train on lightly masked timesteps only (at most `warmup.mask_ratio` of the panel hidden)."""
    tc, wc = cfg.train, cfg.warmup
    batch_loss, validate = hinge_losses(net, data, dist, tc.seed, wc.mask_ratio, device)
    settings = LoopSettings(stage="warmup", epochs=wc.epochs, batch_size=tc.batch_size, lr=tc.lr,
                            weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, seed=tc.seed, schedule="constant")
    training_log = TrainingLog(run, "warmup")
    state = fit(net, len(data.train.targets), batch_loss, validate, settings, dist=dist, device=device,
                on_epoch_end=lambda state, *_: training_log.epoch_end(state), progress=progress)
    if dist.main:
        training_log.finish(state)
    return state


def _warmup_card(run: Run, cfg: HingeConfig, samples: list[str], panel: list[str], vocab: list[str], source: str,
                 data: SplitData, state: LoopState) -> ModelCard:
    wc = cfg.warmup
    key, encoders = _encoder_key(cfg)
    return ModelCard(
        "warmup", genes=panel, vocab=vocab, transform=Transform.of(wc.normalize), encoders=encoders, encoder_key=key,
        feature_norm=data.norm, tiling=TileSettings.of(read_tile_attrs(run.tiles(samples[0]))),
        embedding=EmbedSettings.of(read_embedding_attrs(run.embeddings(key, samples[0]))), samples=samples, holdout=list(wc.holdout),
        split=data.split, fill_missing=wc.fill_missing == "zero", warmup_mask_ratio=wc.mask_ratio,
        backbone=BackboneSource(source, wc.backbone, corpus=list(wc.corpus) if source == "corpus" else []), config=cfg,
        training=data.record(state), shift=shift_reference(run, samples, key))


def shift_reference(run: Run, samples: list[str], key: str) -> ShiftReference | None:
    """The training slides' statistics for generate's shift report; none (with a warning) if a slide has gone."""
    try:
        return ShiftReference({s: slide_stats(read_tiles(run.tiles(s)), SlideShift.read(run.embeddings(key, s), s)) for s in samples})
    except HingeError as exc:
        log.warning("no shift report for this model's predictions: %s", exc)
        return None


def pretrain_warmup(run: Run, cfg: HingeConfig, *, overwrite: bool = False, progress: Progress = SILENT) -> StageSummary:
    """Panel, backbone and the warm-start curriculum; writes genes.txt and checkpoints/warmup.*."""
    with run.training_lock():
        return _pretrain_warmup(run, cfg, overwrite, progress)


def train(run: Run, cfg: HingeConfig, *, overwrite: bool = False, progress: Progress = SILENT) -> StageSummary:
    """Full masked-diffusion training from the warm-up; resumes from `last` after an interruption."""
    with run.training_lock():
        return _train(run, cfg, overwrite, progress)


def _pretrain_warmup(run: Run, cfg: HingeConfig, overwrite: bool, progress: Progress) -> StageSummary:
    started = time.time()
    wc, seed = cfg.warmup, cfg.train.seed
    warmup_path = run.checkpoint("warmup")
    finish_pending(warmup_path.parent)
    if warmup_path.exists() and not overwrite:
        if _warmup_finished(run, warmup_path):
            raise HingeError(f"{warmup_path} exists", f"pass {setting('overwrite')} to redo the warm-up (or go on with `{command('train')}`)")
        log.info("%s was left by a pretrain-warmup that did not finish (killed before it was recorded): warming up again",
                 warmup_path)
    device = resolve_device(cfg.train.device)
    dist = Dist.from_env(device)
    key, encoders = _encoder_key(cfg)
    samples = training_samples(run, wc.holdout)
    require_ready_for_training(run, samples, key)
    expression = load_expression(run, samples)
    transform = Transform.of(wc.normalize)
    found = _backbone_source(cfg)
    panel = _choose_panel(expression, samples, wc, transform, found[1])
    if dist.main:
        write_gene_list(run.root / GENES_FILE, panel)
    backbone, vocab, source = _ready_backbone(run, cfg, found, panel, transform, dist, device, overwrite, progress)
    split = choose_split(samples, wc.val_samples, wc.val_fraction, seed)
    per_slide = wc.feature_norm == "slide"
    table = assemble(run, key, samples, panel, transform, wc.fill_missing == "zero", expression, per_slide)
    data = SplitData.of(table, split, per_slide=per_slide)
    torch.manual_seed(seed)
    index = {g: i + 1 for i, g in enumerate(vocab)}
    net = Hinge(backbone, [index[g] for g in panel], data.train.features.shape[-1], cfg.model, cfg.diffusion).to(device)
    if net.direct is not None and cfg.model.direct_init == "ridge":
        start_direct_path_at_ridge(net.direct, table.subset(data.train_rows), data.norm, panel, key, seed)
    state = _warmup_curriculum(run, cfg, net, data, dist, device, progress)
    if dist.main:
        saved = save_checkpoint(warmup_path, net.cpu(), _warmup_card(run, cfg, samples, panel, vocab, source, data, state))
        run.record_run_stage(WARMUP, "ok", seconds=round(time.time() - started, 1), samples=samples, n_genes=len(panel),
                             backbone=source, epochs=wc.epochs, inputs=training_inputs(run, samples, key),
                             checkpoint_sha256=saved.sha256)
    dist.close()
    files = {"genes": str(run.root / GENES_FILE), "warmup": str(warmup_path), "log": str(run.log("warmup"))}
    if source == "corpus":
        files["pretrain"] = str(run.checkpoint("pretrain"))
    return StageSummary("warmup", state.best_epoch, state.best_val, state.epoch, time.time() - started, files)


def _warmup_finished(run: Run, path: Path) -> bool:
    """Whether the warm-up checkpoint at `path` is the one a finished pretrain-warmup recorded (a record from before
    the checkpoint's hash was kept is trusted)."""
    record = run.manifest().get("stages", {}).get(WARMUP, {})
    if record.get("status") != "ok":
        return False
    return record.get("checkpoint_sha256") in (None, read_checkpoint_card(path).sha256)


def _train(run: Run, cfg: HingeConfig, overwrite: bool, progress: Progress) -> StageSummary:
    started = time.time()
    warmup_path, last_path, best_path, state_path = (run.checkpoint(n) for n in ("warmup", "last", "best", "last.state"))
    finish_pending(last_path.parent)  # an epoch's checkpoint committed just before a kill
    tc = cfg.train
    device = resolve_device(tc.device)
    dist = Dist.from_env(device)
    resume = last_path.exists() and state_path.exists() and not overwrite
    require_panel(run, [warmup_path, last_path, run.checkpoint("selected"), best_path] if resume else [warmup_path])
    source = last_path if resume else warmup_path
    if not source.exists():
        raise HingeError(f"{warmup_path} does not exist", f"run `{command('pretrain-warmup')}` first")
    checkpoint = load_checkpoint(source)
    card = checkpoint.card
    opt_state, state = read_train_state(state_path) if resume else (None, LoopState())
    if resume and state.epoch >= tc.epochs and not state.stopped_early:
        log.info("training already finished %d epochs (raise --epochs to go on, or pass --overwrite)", state.epoch)
    if resume:
        log.info("resuming from %s after epoch %d", last_path, state.epoch)
        made_with = dataclasses.asdict(card.config.train) if card.config is not None else None
        changed = changed_settings(made_with, dataclasses.asdict(tc), ignore=("epochs", "device"))
        if changed:
            log.warning("%s was trained with other settings: %s; the rest of the run uses the new ones "
                        "(pass --overwrite to train from the warm-up with them)", last_path.name, ", ".join(changed))
    require_ready_for_training(run, card.samples, card.encoder_key)
    require_unchanged_since_warmup(run, card.samples, card.encoder_key)
    table = card_table(run, card)
    data = SplitData.of(table, card.split, card.feature_norm)
    selected_path = run.checkpoint("selected") if tc.refit else best_path  # the validated model; a refit becomes best
    net = checkpoint.net.to(device)
    batch_loss, validate = hinge_losses(net, data, dist, card.split.seed, None, device, generated=True)
    settings = LoopSettings(stage="train", epochs=tc.epochs, batch_size=tc.batch_size, lr=tc.lr,
                            weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, patience=tc.patience, seed=card.split.seed,
                            schedule=tc.schedule, select="val_depth_partial", maximize=True)

    def on_epoch_end(state: LoopState, fitted: nn.Module, opt: torch.optim.Optimizer, improved: bool) -> None:
        trained = replace(card, stage="train", config=cfg, training=data.record(state))
        with checkpoint_unit(last_path.parent, "last") as stage:  # weights, cards and resume state: all or none
            write_checkpoint(stage(last_path.name), fitted, trained)
            if improved:
                write_checkpoint(stage(selected_path.name), fitted, trained)
            write_train_state(stage(state_path.name), opt, state)
        training_log.epoch_end(state)

    training_log = TrainingLog(run, "train")
    state = fit(net, len(data.train.targets), batch_loss, validate, settings, dist=dist, device=device, state=state,
                optimizer_state_dict=opt_state, on_epoch_end=on_epoch_end, progress=progress)
    if dist.main:
        training_log.finish(state)
    finish_training(run, cfg, table, data, selected_path, best_path, state.best_epoch, dist, device, progress)
    if dist.main:
        run.record_run_stage("train", "ok", seconds=round(time.time() - started, 1), epochs=state.epoch,
                             best_epoch=state.best_epoch, best_val=state.best_val, stopped_early=state.stopped_early)
    dist.close()
    files = {"best": str(best_path), "last": str(last_path), "log": str(run.log("train")), "plot": str(run.plot("train"))}
    if selected_path != best_path:
        files["selected"] = str(selected_path)
    return StageSummary("train", state.best_epoch, state.best_val, state.epoch, time.time() - started, files,
                        selected_by="validation depth-partial Pearson (generated)")
