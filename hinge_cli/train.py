"""`hinge pretrain-warmup` and `hinge train`: a run's tiled, embedded samples in, a generator out.

pretrain-warmup: choose the gene panel on the training samples, get a backbone
(CellFM import, an earlier pre-training, pre-training on an expression corpus, or
random for ablations), wrap it in identity-initialised SoftAdaLN and train the
warm-start curriculum (only lightly masked timesteps). train: continue from the
warm-up on all timesteps, with validation, early stopping and exact resume.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hinge_cli.config import HingeConfig
from hinge_cli.data.corpus import Corpus, load_corpus
from hinge_cli.data.dataset import SpotTable, assemble, load_expression, training_samples
from hinge_cli.data.expression import Transform
from hinge_cli.data.features import FeatureNorm, views
from hinge_cli.data.panel import select_panel, shared_genes
from hinge_cli.devices import resolve_device
from hinge_cli.distributed import Dist
from hinge_cli.encoders import parse_encoders
from hinge_cli.embed import encoder_key
from hinge_cli.errors import HingeError
from hinge_cli.fit import LoopSettings, LoopState, fit, optimizer_state, optimizer_tensors
from hinge_cli.model import Backbone, Hinge, import_cellfm, load_checkpoint, read_vocab, save_checkpoint
from hinge_cli.model.diffusion import diffusion_loss
from hinge_cli.model.pretrain import pretrain_loss, select_genes
from hinge_cli.figures import loss_curves
from hinge_cli.progress import SILENT, Progress
from hinge_cli.files import atomic_path, write_text_atomic
from hinge_cli.run import Run

log = logging.getLogger(__name__)

EVAL_BATCH = 256


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    """Which spots validate: whole samples, or a seeded random fraction of spots (views stay together)."""

    val_samples: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    seed: int = 0

    def rows(self, table: SpotTable) -> tuple[np.ndarray, np.ndarray]:
        if self.val_samples:
            is_val = np.isin(table.sample, self.val_samples)
        else:
            keys = np.array([f"{s}\t{b}" for s, b in zip(table.sample, table.barcodes)])
            order = np.argsort(keys, kind="stable")
            shuffled = order[np.random.default_rng(self.seed).permutation(len(order))]
            is_val = np.zeros(len(table), bool)
            is_val[shuffled[: max(1, round(self.val_fraction * len(table)))]] = True
        if is_val.all() or not is_val.any():
            raise HingeError("the validation split leaves no training or no validation spots",
                             "give a --val-fraction between 0 and 1, or --val-samples that are not all of them")
        return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


@dataclass
class TrainingData:
    """What the loop needs, as tensors: standardised features (N, V, D) and targets (N, G)."""

    features: Tensor
    targets: Tensor

    @classmethod
    def of(cls, table: SpotTable, norm: FeatureNorm) -> TrainingData:
        return cls(torch.from_numpy(norm(views(table.features))), torch.from_numpy(table.targets))


def _tile_settings(run: Run, sample: str) -> dict[str, Any]:
    with h5py.File(run.tiles(sample), "r") as h5:
        a = h5.attrs
        return {"target_mpp": float(a["mpp_target"]), "patch_px": int(a["patch_px"]), "mpp_source": float(a["mpp_source"]),
                "spot_um": float(a["spot_um"]), "pitch_um": float(a["pitch_um"]), "grid": str(a["grid"])}


def _embed_settings(run: Run, key: str, sample: str) -> dict[str, Any]:
    with h5py.File(run.embeddings(key, sample), "r") as h5:
        return {k: (v.item() if hasattr(v, "item") else v) if not isinstance(v, np.ndarray) else v.tolist()
                for k, v in h5.attrs.items()}


# ----------------------------------------------------------------------------- losses


def hinge_losses(model: Hinge, train: TrainingData, val: TrainingData, dist: Dist, seed: int,
                 max_hidden_fraction: float | None, device: torch.device) -> tuple[Any, Any]:
    """Batch loss (a random stored view per spot; this rank's share of the global draws) and validation loss."""
    d = model.diffusion

    def batch_loss(net: nn.Module, rows: Tensor, generator: torch.Generator) -> Tensor:
        view = torch.randint(train.features.shape[1], (len(rows),), generator=generator)
        x0, image = train.targets[rows].to(device), train.features[rows, view].to(device)
        return diffusion_loss(net, x0, image, model.schedule, d.fill, d.noise_std, generator, max_hidden_fraction,
                              rows=dist.rows(len(rows)))

    def validate(net: nn.Module) -> float:
        generator = torch.Generator().manual_seed(seed + 7919)  # the same draws every epoch: comparable numbers
        total, n = 0.0, len(val.targets)
        for start in range(0, n, EVAL_BATCH):
            x0 = val.targets[start : start + EVAL_BATCH].to(device)
            image = val.features[start : start + EVAL_BATCH, 0].to(device)
            loss = diffusion_loss(net, x0, image, model.schedule, d.fill, d.noise_std, generator)
            total += float(loss) * len(x0)
        return total / n

    return batch_loss, validate


def pretrain_losses(backbone: Backbone, corpus: Corpus, train_rows: np.ndarray, val_rows: np.ndarray, cfg: HingeConfig,
                    dist: Dist, device: torch.device) -> tuple[Any, Any]:
    """Masked-value loss on random gene subsets of corpus profiles (expressed genes favoured)."""
    length = min(cfg.pretrain.seq_len, len(corpus.vocab))
    d = cfg.diffusion

    def draw(rows: np.ndarray, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        dense = torch.from_numpy(corpus.dense(rows))
        cols = select_genes(dense, length, generator, d.pretrain_expressed_fraction)
        return (cols + 1).to(device), dense.gather(1, cols).to(device)

    def batch_loss(net: nn.Module, rows: Tensor, generator: torch.Generator) -> Tensor:
        ids, values = draw(train_rows[rows.numpy()], generator)
        return pretrain_loss(net, ids, values, d, generator, rows=dist.rows(len(rows)))

    def validate(net: nn.Module) -> float:
        generator = torch.Generator().manual_seed(cfg.train.seed + 104729)
        total = 0.0
        for start in range(0, len(val_rows), EVAL_BATCH):
            ids, values = draw(val_rows[start : start + EVAL_BATCH], generator)
            total += float(pretrain_loss(net, ids, values, d, generator)) * len(ids)
        return total / len(val_rows)

    return batch_loss, validate


# ----------------------------------------------------------------------------- files


def write_log(run: Run, stage: str, state: LoopState) -> None:
    """Rewrite logs/<stage>.jsonl and plots/<stage>_loss.png from the loop history."""
    write_text_atomic(run.log(stage), "".join(json.dumps(r) + "\n" for r in state.history))
    series = {"train": [r["train_loss"] for r in state.history], "validation": [r["val_loss"] for r in state.history]}
    loss_curves(run.plot(stage), series, f"{stage}: masked loss")


def save_state(path: Path, opt: torch.optim.Optimizer, state: LoopState) -> None:
    """Optimiser tensors in safetensors, counters and history in a JSON sidecar."""
    tensors, meta = optimizer_tensors(opt)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(path.with_suffix(".json"), json.dumps({"optimizer": meta, "loop": state.to_dict()}))


def load_state(path: Path) -> tuple[dict[str, Any], LoopState]:
    meta = json.loads(path.with_suffix(".json").read_text())
    return optimizer_state(load_file(str(path)), meta["optimizer"]), LoopState.from_dict(meta["loop"])


# ----------------------------------------------------------------------------- stages


@dataclass
class StageSummary:
    stage: str
    best_epoch: int
    best_val: float | None
    epochs: int
    seconds: float
    files: dict[str, str]

    def lines(self) -> list[str]:
        out = [f"{self.stage}: {self.epochs} epochs in {self.seconds:.0f}s; best validation loss "
               f"{self.best_val:.4f} at epoch {self.best_epoch}" if self.best_val is not None else f"{self.stage}: done"]
        out += [f"  {name:<10} {path}" for name, path in self.files.items()]
        return out


@dataclass
class WarmupOptions:
    backbone: str = "random"  # random | cellfm:CKPT | FILE (a backbone or model checkpoint)
    vocab: Path | None = None  # CellFM gene CSV
    corpus: Sequence[Path] = ()
    holdout: Sequence[str] = ()
    genes: Path | None = None
    n_genes: int = 200
    select: str = "hvg"
    normalize: str = "none"
    fill_missing: bool = False
    val_fraction: float = 0.1
    val_samples: Sequence[str] = ()
    warmup_epochs: int | None = None
    warmup_mask_ratio: float | None = None
    seed: int | None = None


def _encoder_key(cfg: HingeConfig) -> tuple[str, list[str]]:
    specs = parse_encoders(cfg.embed.encoder)
    return encoder_key(specs), [s.name for s in specs]


def _read_genes(path: Path) -> list[str]:
    if not Path(path).exists():
        raise HingeError(f"gene list {path} does not exist", "give a text file with one gene symbol per line")
    genes = [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(set(genes)) != len(genes) or not genes:
        raise HingeError(f"gene list {path} is empty or repeats genes", "list each gene once, one per line")
    return genes


def _backbone_source(cfg: HingeConfig, opts: WarmupOptions) -> tuple[Backbone | None, list[str] | None, str]:
    """A ready backbone and its vocabulary, when the source fixes them before the panel is chosen."""
    spec = opts.backbone
    if spec.startswith("cellfm:"):
        if opts.vocab is None:
            raise HingeError("--backbone cellfm:CKPT needs CellFM's gene list", "pass --vocab path/to/CellFM_vocab.csv")
        backbone, report = import_cellfm(Path(spec.split(":", 1)[1]), cfg.model)
        for line in report.lines():
            log.info("%s", line)
        return backbone, read_vocab(opts.vocab), "cellfm"
    if spec != "random":
        loaded = load_checkpoint(spec)
        vocab = loaded.meta.get("vocab")
        if not vocab:
            raise HingeError(f"{spec} records no gene vocabulary", "use a backbone written by `hinge pretrain-warmup --corpus`")
        backbone = loaded.model.backbone if isinstance(loaded.model, Hinge) else loaded.model
        return backbone, list(vocab), "file"
    return None, None, "corpus" if opts.corpus else "random"


def _choose_panel(expression: dict, samples: list[str], opts: WarmupOptions, transform: Transform,
                  vocab: list[str] | None) -> list[str]:
    if opts.genes is not None:
        genes = _read_genes(opts.genes)
        absent = [g for g in genes if vocab is not None and g not in vocab]
        if absent:
            raise HingeError(f"{len(absent)} genes of {opts.genes} are not in the backbone's vocabulary: {', '.join(absent[:10])}",
                             "drop them from the list")
        return genes
    candidates = [expression[s] for s in samples]
    if vocab is not None:
        known = set(vocab)
        dropped = [g for g in shared_genes(candidates) if g not in known]
        if dropped:
            log.info("%d genes absent from the backbone vocabulary are not candidates for the panel", len(dropped))
        candidates = [e.restrict(known) for e in candidates]
    return select_panel(candidates, opts.n_genes, opts.select, transform)


def pretrain_backbone(run: Run, cfg: HingeConfig, corpus_files: Sequence[Path], panel: list[str], transform: Transform,
                      dist: Dist, device: torch.device, overwrite: bool, progress: Progress) -> tuple[Backbone, list[str]]:
    """Pre-train (or reuse) `checkpoints/pretrain` on an expression-only corpus."""
    path = run.checkpoint("pretrain")
    if path.exists() and not overwrite:
        loaded = load_checkpoint(path)
        if set(panel) <= set(loaded.meta["vocab"]):
            log.info("reusing the pre-trained backbone %s (pass --overwrite to pre-train again)", path)
            return loaded.model, loaded.meta["vocab"]
        log.info("the existing pre-trained backbone lacks panel genes: pre-training again")
    corpus = load_corpus(corpus_files, transform, cfg.pretrain.max_vocab, always=panel)
    log.info("corpus: %d profiles, vocabulary of %d genes", len(corpus), len(corpus.vocab))
    torch.manual_seed(cfg.train.seed)
    backbone = Backbone(cfg.model, len(corpus.vocab) + 1).to(device)
    order = np.random.default_rng(cfg.train.seed).permutation(len(corpus))
    n_val = max(1, round(0.05 * len(corpus)))
    batch_loss, validate = pretrain_losses(backbone, corpus, order[n_val:], order[:n_val], cfg, dist, device)
    p = cfg.pretrain
    settings = LoopSettings("pretrain", p.epochs, p.batch_size, p.lr, cfg.train.weight_decay, cfg.train.grad_clip, None,
                            cfg.train.seed, cfg.train.schedule)

    def on_epoch_end(state: LoopState, model: nn.Module, opt: torch.optim.Optimizer, improved: bool) -> None:
        write_log(run, "pretrain", state)

    state = fit(backbone, len(order) - n_val, batch_loss, validate, settings, dist=dist, device=device,
                on_epoch_end=on_epoch_end, progress=progress)
    if dist.main:
        save_checkpoint(path, backbone.cpu(), vocab=corpus.vocab, transform=transform.to_dict(),
                        extra={"stage": "pretrain", "corpus": [str(Path(f).resolve()) for f in corpus_files],
                               "history": state.history})
    dist.barrier()
    return backbone.cpu(), corpus.vocab


def pretrain_warmup(run: Run, cfg: HingeConfig, opts: WarmupOptions, *, overwrite: bool = False,
                    progress: Progress = SILENT) -> StageSummary:
    """Panel, backbone and the warm-start curriculum; writes genes.txt and checkpoints/warmup.*."""
    started = time.time()
    warmup_path = run.checkpoint("warmup")
    if warmup_path.exists() and not overwrite:
        raise HingeError(f"{warmup_path} exists", "pass --overwrite to redo the warm-up (or go on with `hinge train`)")
    tc = cfg.train
    seed = tc.seed if opts.seed is None else opts.seed
    device = resolve_device(tc.device)
    dist = Dist.from_env(device)
    key, encoders = _encoder_key(cfg)
    samples = training_samples(run, opts.holdout)
    expression = load_expression(run, samples)
    transform = Transform(opts.normalize)
    backbone, vocab, source = _backbone_source(cfg, opts)
    panel = _choose_panel(expression, samples, opts, transform, vocab)
    if dist.main:
        write_text_atomic(run.root / "genes.txt", "".join(g + "\n" for g in panel))
    if source == "corpus":
        backbone, vocab = pretrain_backbone(run, cfg, opts.corpus, panel, transform, dist, device, overwrite, progress)
    elif source == "random":
        log.warning("ABLATION: the backbone is randomly initialised. HINGE's premise is a pre-trained backbone; "
                    "pass --corpus FILES or --backbone cellfm:CKPT for real use")
        torch.manual_seed(seed)
        vocab = list(panel)
        backbone = Backbone(cfg.model, len(vocab) + 1)
    index = {g: i + 1 for i, g in enumerate(vocab)}
    table = assemble(run, key, samples, panel, transform, opts.fill_missing, expression)
    split = Split(list(opts.val_samples), opts.val_fraction, seed)
    train_rows, val_rows = split.rows(table)
    norm = FeatureNorm.fit(views(table.features[train_rows]))
    torch.manual_seed(seed)
    model = Hinge(backbone, [index[g] for g in panel], table.features.shape[-1], cfg.model, cfg.diffusion).to(device)
    train, val = TrainingData.of(table.subset(train_rows), norm), TrainingData.of(table.subset(val_rows), norm)
    rho = tc.warmup_mask_ratio if opts.warmup_mask_ratio is None else opts.warmup_mask_ratio
    epochs = tc.warmup_epochs if opts.warmup_epochs is None else opts.warmup_epochs
    batch_loss, validate = hinge_losses(model, train, val, dist, seed, rho, device)
    settings = LoopSettings("warmup", epochs, tc.batch_size, tc.lr, tc.weight_decay, tc.grad_clip, None, seed, "constant")
    state = fit(model, len(train.targets), batch_loss, validate, settings, dist=dist, device=device,
                on_epoch_end=lambda state, *_: write_log(run, "warmup", state), progress=progress)
    meta = {
        "stage": "warmup", "backbone_source": source, "backbone": opts.backbone, "samples": samples,
        "holdout": list(opts.holdout), "split": asdict(split), "feature_norm": norm.to_dict(), "encoder_key": key,
        "tile": _tile_settings(run, samples[0]), "embed": _embed_settings(run, key, samples[0]),
        "config": cfg.to_dict(), "warmup_mask_ratio": rho, "fill_missing": opts.fill_missing,
        "n_train_spots": len(train_rows), "n_val_spots": len(val_rows), "history": state.history,
    }
    if dist.main:
        save_checkpoint(warmup_path, model.cpu(), genes=panel, vocab=vocab, encoder=encoders, transform=transform.to_dict(),
                        extra=meta)
        run.record_run_stage("pretrain-warmup", "ok", seconds=round(time.time() - started, 1), samples=samples,
                             n_genes=len(panel), backbone=source, epochs=epochs)
    dist.close()
    files = {"genes": str(run.root / "genes.txt"), "warmup": str(warmup_path), "log": str(run.log("warmup"))}
    if source == "corpus":
        files["pretrain"] = str(run.checkpoint("pretrain"))
    return StageSummary("warmup", state.best_epoch, state.best_val, state.epoch, time.time() - started, files)


def train(run: Run, cfg: HingeConfig, *, overwrite: bool = False, progress: Progress = SILENT) -> StageSummary:
    """Full masked-diffusion training from the warm-up; resumes from `last` after an interruption."""
    started = time.time()
    warmup_path, last_path, best_path = run.checkpoint("warmup"), run.checkpoint("last"), run.checkpoint("best")
    state_path = run.checkpoint("last.state")
    tc = cfg.train
    device = resolve_device(tc.device)
    dist = Dist.from_env(device)
    resume = last_path.exists() and state_path.exists() and not overwrite
    source = last_path if resume else warmup_path
    if not source.exists():
        raise HingeError(f"{warmup_path} does not exist", "run `hinge pretrain-warmup` first")
    loaded = load_checkpoint(source)
    model: Hinge = loaded.model
    meta = loaded.meta
    extra = meta["extra"]
    opt_state, state = load_state(state_path) if resume else (None, LoopState())
    if resume and state.epoch >= tc.epochs and not state.stopped_early:
        log.info("training already finished %d epochs (raise --epochs to go on, or pass --overwrite)", state.epoch)
    if resume:
        log.info("resuming from %s after epoch %d", last_path, state.epoch)
    transform = Transform.from_dict(meta["transform"])
    table = assemble(run, extra["encoder_key"], extra["samples"], meta["genes"], transform, extra["fill_missing"])
    train_rows, val_rows = Split(**extra["split"]).rows(table)
    norm = FeatureNorm.from_dict(extra["feature_norm"])
    train_data, val_data = TrainingData.of(table.subset(train_rows), norm), TrainingData.of(table.subset(val_rows), norm)
    model.to(device)
    seed = extra["split"]["seed"]
    batch_loss, validate = hinge_losses(model, train_data, val_data, dist, seed, None, device)
    settings = LoopSettings("train", tc.epochs, tc.batch_size, tc.lr, tc.weight_decay, tc.grad_clip, tc.patience, seed,
                            tc.schedule)
    sidecar = {**extra, "stage": "train", "config": cfg.to_dict()}

    def on_epoch_end(state: LoopState, net: nn.Module, opt: torch.optim.Optimizer, improved: bool) -> None:
        common = {"genes": meta["genes"], "vocab": meta["vocab"], "encoder": meta["encoder"], "transform": meta["transform"]}
        info = {**sidecar, "epoch": state.epoch, "best_epoch": state.best_epoch, "best_val": state.best_val,
                "history": state.history}
        save_checkpoint(last_path, net, **common, extra=info)
        if improved:
            save_checkpoint(best_path, net, **common, extra=info)
        save_state(state_path, opt, state)
        write_log(run, "train", state)

    state = fit(model, len(train_data.targets), batch_loss, validate, settings, dist=dist, device=device, state=state,
                optimizer_state_dict=opt_state, on_epoch_end=on_epoch_end, progress=progress)
    if dist.main:
        run.record_run_stage("train", "ok", seconds=round(time.time() - started, 1), epochs=state.epoch,
                             best_epoch=state.best_epoch, best_val=state.best_val, stopped_early=state.stopped_early)
    dist.close()
    files = {"best": str(best_path), "last": str(last_path), "log": str(run.log("train")), "plot": str(run.plot("train"))}
    return StageSummary("train", state.best_epoch, state.best_val, state.epoch, time.time() - started, files)
