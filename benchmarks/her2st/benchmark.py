"""HER2ST patient C, leave-one-section-out: HINGE against baselines on identical folds.

    make bench-her2st                      # the full benchmark (~72 min on 2 cores)
    make bench-her2st ARGS=--quick         # a smoke version (2 folds, short training)
    python benchmarks/her2st/benchmark.py --data data/her2st-hest --out bench-out/her2st

Protocol (issues #7, #12). Every section of C2-C6 is held out in turn. The gene
panels (the 50 most variable genes; with --panel200 also ~200 `hmhvg`) are chosen on
the four training sections. Features come from the default encoder, the same for
every method. The backbone is pre-trained once on the 30 sections of the other
patients (`corpus.txt`; different patients, so no leakage), its sequences built
around every fold's panel genes. Methods: the training mean, ridge, a small MLP,
HINGE as the paper describes it, HINGE's default, and ablations of the default that
flip one switch each. Every HINGE method runs with several seeds. HINGE selects its
epoch on one of the four training sections (held out of its training); the tested
section is never seen. Every prediction is scored by `hinge eval`'s own alignment and
metrics against the held-out section's counts, in the model's space (ln(CP10k + 1), the default; log2(counts + 1)
with --normalize none), calibration through the observation model.

Writes `results.md` and `results.json` (mean ± std over folds of every metric, the
spread over seeds, and each method's wall time) under --out; per-fold scores are kept
in `scores/`, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from baselines import BASELINES
from machine import CpuSnapshot, load_line, mean_busy, others_busy, reads_high

from hinge_cli.config import FEATURE_NORMS, SAMPLERS, GenerateConfig, HingeConfig, WarmupConfig, load_config, merge
from hinge_cli.core.devices import resolve_device
from hinge_cli.core.distributed import Dist
from hinge_cli.core.files import write_text_atomic
from hinge_cli.core.progress import SILENT
from hinge_cli.data.dataset import assemble, load_expression
from hinge_cli.data.expression import MODEL_SPACE_FLOOR, NORMALIZE, Expression, Transform, read_expression
from hinge_cli.data.features import SlideShift, views
from hinge_cli.data.panel import select_panel
from hinge_cli.data.sources import read_sample_sheet
from hinge_cli.encoders.registry import encoder_key, parse_encoders
from hinge_cli.eval import (
    METRICS,
    Prediction,
    align,
    metric_table,
    read_prediction,
    score_slide,
    write_json,
)
from hinge_cli.formats.embeddings import read_embeddings
from hinge_cli.model.checkpoint import read_checkpoint_card
from hinge_cli.model.sampler import DEFAULT_STEPS
from hinge_cli.predict.ridge import gaussian_batch
from hinge_cli.predict.trained import load_trained_model
from hinge_cli.run.directory import Run
from hinge_cli.stages.calibrate import recalibrate
from hinge_cli.stages.embed import embed_samples
from hinge_cli.stages.generate import predict_sample
from hinge_cli.stages.tile import tile_samples
from hinge_cli.stages.train import pretrain_backbone, pretrain_warmup, train

log = logging.getLogger("bench-her2st")

HERE = Path(__file__).resolve().parent
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
LEGACY_ST = {"spot_um": 100.0, "pitch_um": 200.0}  # HER2ST is legacy ST: 100 µm spots 200 µm apart (patches stay 112 µm)
PANEL_TRANSFORM = Transform("none")  # panels are chosen on log2(counts + 1) whatever the targets, so --normalize changes only them
TIMING_KEYS = ("seconds", "others_busy")  # how long a fold run took and how busy others kept the machine meanwhile: kept when it is re-scored


@dataclass(frozen=True)
class Variant:
    """A HINGE configuration of the benchmark: config overrides on the preset, and which backbone it starts from."""

    what: str
    overrides: dict = field(default_factory=dict)
    pretrained: bool = True


# The default is whatever `hinge` ships; each ablation flips one of its switches, the paper's model flips them all.
HINGE_VARIANTS = {
    "hinge": Variant("HINGE's default (pre-trained backbone, every hidden gene scored, direct image path)"),
    "hinge-paper": Variant("as the paper describes it: SoftAdaLN only, the revealed-gene loss, the curriculum",
                           {"model": {"direct_path": False}, "diffusion": {"loss": "revealed", "all_hidden_share": 0.0},
                            "warmup": {"epochs": 3}}),
    "hinge-random": Variant("the default on a random backbone", pretrained=False),
    "hinge-curriculum-flip": Variant("the default with the warm-start curriculum switched (on if off, off if on)"),
    "hinge-revealed": Variant("the default scoring only the genes revealed at t", {"diffusion": {"loss": "revealed"}}),
    "hinge-no-direct": Variant("the default without the direct image path", {"model": {"direct_path": False}}),
    "hinge-mse": Variant("the default with a mean-only head (MSE): each gene revealed at its mean, no drawn spread",
                         {"diffusion": {"likelihood": "mse"}}),
}
HINGE_METHODS = tuple(HINGE_VARIANTS)
MAIN_HINGE = ("hinge", "hinge-paper")
# Run on request only (--methods): the mean-only head is compared in docs/benchmarks/archive/her2st-inpatient-training-feature-norm.md, and its
# 15 fold runs would take the full grid past 90 minutes
OPT_IN = ("hinge-mse",)
METHODS = (*BASELINES, *HINGE_METHODS)


@dataclass(frozen=True)
class Panel:
    name: str
    n_genes: int
    select: str
    methods: tuple[str, ...]
    max_epochs: int | None = None  # caps HINGE's training epochs on this panel


# The ~200-gene panel (--panel200) runs the baselines and HINGE's default, with training capped
# at 40 epochs (an epoch costs 4x the 50-gene one); the ablations run on the headline panel only.
PANELS = (
    Panel("hvg50", 50, "hvg", METHODS),
    Panel("hmhvg200", 200, "hmhvg", (*BASELINES, "hinge"), max_epochs=40),
)
QUICK_METHODS = (*BASELINES, "hinge", "hinge-paper")

# The training mean is constant over spots: only its errors mean anything (its RVD is 1 by construction).
MEAN_ONLY_ROWS = ("errors.mse", "errors.mae", "variance.rvd", "seconds")

# (label, key of `hinge eval`'s metric table (eval.METRICS) or "seconds", higher is better; None: no direction, no bold)
ROWS = (
    ("depth-partial Pearson (headline)", "correlation.depth_partial.pearson.mean", True),
    ("Pearson, log2 counts (raw)", "correlation.model.pearson.mean", True),
    ("Pearson, CP10k-log (normalised)", "correlation.normalised.pearson.mean", True),
    ("Spearman, log2 counts", "correlation.model.spearman.mean", True),
    ("depth-partial Spearman", "correlation.depth_partial.spearman.mean", True),
    ("PCC@50 (best 50 genes, published-table convention)", "correlation.model.pearson.pcc_at_50", True),
    ("co-expression consistency", "correlation.model.coexpression.consistency", True),
    ("co-expression consistency, depth-partial", "correlation.depth_partial.coexpression.consistency", True),
    ("co-expression mean abs. difference", "correlation.model.coexpression.mean_abs_diff", False),
    ("variance agreement RVD (0 best)", "variance.rvd", False),
    ("Moran's I agreement", "spatial.morans_i_agreement", True),
    ("MSE", "errors.mse", False),
    ("MAE", "errors.mae", False),
    ("calibration: inside ±1 std (0.683 ideal)", "calibration.within_1std", None),
    ("calibration: inside ±2 std (0.954 ideal)", "calibration.within_2std", None),
    ("calibration: inside the 90% interval q05–q95 (0.90 ideal)", "calibration.within_90_interval", None),
    ("CRPS per gene (lower is better)", "calibration.crps", False),
    ("energy score per spot (lower is better)", "calibration.energy_score", False),
    ("raw spread, before the per-gene scale: inside ±1 std", "raw.within_1std", None),
    ("raw spread: inside ±2 std", "raw.within_2std", None),
    ("raw spread: CRPS", "raw.crps", False),
    ("raw spread: energy score", "raw.energy_score", False),
    ("co-expression consistency of one sample", "sampling.one_sample_coexpression", True),
    ("co-expression consistency of one raw sample (before the scale)", "raw.one_sample_coexpression", True),
    ("depth-partial Pearson of one sample", "sampling.one_sample_depth_partial", True),
    ("depth-partial Pearson of the samples' mean", "sampling.samples_mean_depth_partial", True),
    ("wall time per fold and seed (s)", "seconds", None),
)
RAW_KEYS = ("within_1std", "within_2std", "crps", "energy_score")
SAMPLING_ROWS = {key for _, key, _ in ROWS if key.startswith(("raw.", "sampling."))}  # computed here from the draws
assert {key for _, key, _ in ROWS} <= {*METRICS, *SAMPLING_ROWS, "seconds"}, "every other row is a metric of `hinge eval`'s table"


@dataclass
class Settings:
    data: Path
    out: Path
    config: HingeConfig
    folds: tuple[str, ...]
    panels: tuple[Panel, ...]
    n_samples: int
    steps: int
    corpus: list[Path]
    overwrite: bool
    timings: dict[str, float] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    ablation_seeds: tuple[int, ...] = (0,)  # seeds of the ablations (every HINGE method but MAIN_HINGE)
    overrides: dict = field(default_factory=dict)  # the preset's overrides every HINGE variant starts from
    rescore: bool = False  # score stored HINGE predictions again instead of skipping them
    regenerate: bool = False  # calibrate stored HINGE fold runs again and predict anew (no retraining)
    others_busy: float | None = None  # CPUs others kept busy during the timed fold runs (None: unmeasured)

    def seeds_of(self, method: str) -> tuple[int, ...] | tuple[None]:
        """A baseline runs once (None); HINGE's default and paper model with `seeds`, the ablations with `ablation_seeds`."""
        if method not in HINGE_VARIANTS:
            return (None,)
        return self.seeds if method in MAIN_HINGE else self.ablation_seeds

    def variant_config(self, method: str) -> HingeConfig:
        """The preset with the benchmark's overrides, then the variant's (the curriculum flip reads the default)."""
        overrides = HINGE_VARIANTS[method].overrides
        if method == "hinge-curriculum-flip":
            overrides = {"warmup": {"epochs": 0 if self.config.warmup.epochs else 3}}
        return load_config(self.config.preset, None, merge(self.overrides, overrides))

    @property
    def transform(self) -> Transform:
        """Every method's targets and scoring space (`--normalize`): log2(counts + 1), or of counts scaled to 10,000."""
        return Transform.of(self.config.warmup.normalize)

    @property
    def per_slide(self) -> bool:
        """Whether every method's features are standardised slide by slide (`--feature-norm`)."""
        return self.config.warmup.feature_norm == "slide"

    def timed(self, name: str, seconds: float, did_work: bool) -> None:
        """Record a one-off cost; a resumed benchmark that skipped the work keeps the first measurement."""
        path = self.out / "timings.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        if did_work or name not in stored:
            stored[name] = seconds
            write_text_atomic(path, json.dumps(stored, indent=1))
        self.timings[name] = stored[name]


# ----------------------------------------------------------------------------- shared inputs


def ensure_data(data: Path) -> None:
    if (data / "patient_c.csv").exists():
        return
    import prepare

    log.info("converting the shared HER2ST data into %s", data)
    if prepare.main(["--out", str(data)]) != 0:
        raise SystemExit(f"could not prepare {data}; run benchmarks/her2st/prepare.py --out {data} and read its error")


def base_run(s: Settings) -> Run:
    """Tiles and default-encoder features of C2-C6, shared by every method and fold."""
    run = Run(s.out / "run")
    started = time.time()
    specs = [spec for spec in read_sample_sheet(s.data / "patient_c.csv") if spec.sample_id in SECTIONS]
    tiled = tile_samples(run, specs, s.config.tile)
    embedded = embed_samples(run, s.config.embed)
    s.timed("tile + embed (once, shared by every method)", time.time() - started, bool(tiled.done or embedded.done))
    return run


def choose_panels(run: Run, s: Settings) -> dict[tuple[str, str], list[str]]:
    """Each fold's panels, chosen on its training sections only."""
    panels = {}
    for test in s.folds:
        train_ids = [x for x in SECTIONS if x != test]
        expression = load_expression(run, train_ids)
        for panel in s.panels:
            panels[panel.name, test] = select_panel([expression[x] for x in train_ids], panel.n_genes, panel.select, PANEL_TRANSFORM)
    return panels


def pretrained_backbone(s: Settings, genes: set[str]) -> Path:
    """Pre-train once on the other patients; the vocabulary covers every fold's panel."""
    run = Run(s.out / "pretrain")
    path = run.checkpoint("pretrain")
    started, existed = time.time(), path.exists()
    device = resolve_device(s.config.train.device)
    pretrain_backbone(run, s.config, s.corpus, sorted(genes), s.transform, Dist.from_env(device), device, False, SILENT)
    s.timed("pre-training (once, shared by every HINGE method on the pre-trained backbone)", time.time() - started, not existed)
    return path


# ----------------------------------------------------------------------------- methods


def _section(run: Run, key: str, sample: str, genes: list[str], per_slide: bool,
             transform: Transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A training section for the baselines: features (stored views averaged), targets, total counts."""
    table = assemble(run, key, [sample], genes, transform, per_slide=per_slide)
    return views(table.features).mean(1), table.targets, table.depth


@dataclass
class BaselineInputs:
    """What every baseline of one fold and panel reads: training sections and the held-out spots, their features
    slide-standardised where HINGE's are (`per_slide`), so every method sees the same features."""

    train: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    barcodes: list[str]
    features: np.ndarray
    coords: np.ndarray
    transform: Transform

    @classmethod
    def read(cls, run: Run, key: str, test: str, genes: list[str], per_slide: bool, transform: Transform) -> BaselineInputs:
        return cls([_section(run, key, x, genes, per_slide, transform) for x in SECTIONS if x != test],
                   *held_out_features(run, key, test, per_slide), transform)


def run_baseline(method: str, inputs: BaselineInputs, test: str, genes: list[str], n_draws: int) -> tuple[Prediction, dict]:
    """A baseline's prediction; one with a `residual_std` (ridge) gets its per-gene Gaussian, censored at the model space's
    floor as `generate` writes it: std, q05/q95 and draws. In normalised units its variance sheds the training spots'
    count noise first, as the ridge `hinge train` stores does, since eval counts it again at the measured depth."""
    values, info = BASELINES[method](inputs.train, inputs.features)
    pred = Prediction(path=Path(f"{method}:{test}"), sample=test, barcodes=inputs.barcodes, genes=genes,
                      values=values.astype(np.float32), std=None, coords=inputs.coords, transform=inputs.transform)
    if "residual_std" not in info:
        return pred, info
    targets, depth = (np.concatenate([section[i] for section in inputs.train]) for i in (1, 2))
    std = np.sqrt(inputs.transform.less_count_noise(np.square(info["residual_std"]), targets, depth))
    noise = np.random.default_rng(0).standard_normal((len(values), n_draws, values.shape[1]))
    gaussian = gaussian_batch(pred.values, std.astype(np.float32), noise)
    return replace(pred, std=gaussian.std, q05=gaussian.q05, q95=gaussian.q95, draws=gaussian.draws), info


def held_out_features(run: Run, key: str, sample: str, per_slide: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every embedded spot of the held-out section (barcodes, features, coordinates)."""
    emb = read_embeddings(run.embeddings(key, sample))
    features = SlideShift.fit(emb.features, sample)(emb.features) if per_slide else emb.features
    return emb.barcodes, views(features).mean(1).astype(np.float64), emb.coords


def fold_run(base: Run, root: Path) -> Run:
    """A fresh run directory that shares the base run's tiles and features."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copy(base.manifest_path, root / base.manifest_path.name)
    for name in ("tiles", "embeddings"):
        (root / name).symlink_to((base.root / name).resolve(), target_is_directory=True)
    return Run(root)


def panel_config(cfg: HingeConfig, panel: Panel) -> HingeConfig:
    if panel.max_epochs is None or cfg.train.epochs <= panel.max_epochs:
        return cfg
    return replace(cfg, train=replace(cfg.train, epochs=panel.max_epochs))


def run_hinge(method: str, base: Run, root: Path, test: str, genes: list[str], backbone: Path | None,
              cfg: HingeConfig, s: Settings, seed: int) -> tuple[Prediction, dict]:
    run = fold_run(base, root)
    genes_file = root / "panel.txt"
    write_text_atomic(genes_file, "".join(g + "\n" for g in genes))
    pretrained = HINGE_VARIANTS[method].pretrained
    warmup = replace(cfg.warmup, backbone=str(backbone) if pretrained else "random", holdout=[test],
                     genes=str(genes_file))
    cfg = replace(cfg, warmup=warmup, train=replace(cfg.train, seed=seed))
    warm = pretrain_warmup(run, cfg, progress=SILENT)
    fitted = train(run, cfg, progress=SILENT)
    out = root / f"{test}.h5ad"
    model = load_trained_model(run.checkpoint("best"), cfg.train.device)
    predict_sample(run, test, model, out, replace(cfg.generate, seed=seed, keep_samples=True), progress=SILENT)
    info = {"warmup_epochs": warm.epochs, "train_epochs": fitted.epochs, "best_epoch": fitted.best_epoch,
            "best_val_depth_partial": fitted.best_val, "validated_on": model.card.split.val_samples, "prediction": str(out)}
    return read_prediction(out), info


def regenerate_hinge(root: Path, test: str, cfg: HingeConfig, seed: int, info: dict) -> tuple[Prediction, dict]:
    """A trained fold run's spread scale and gene coupling fitted again (`hinge calibrate`), and its prediction made again."""
    run = Run(root)
    recalibrate(run, cfg)
    out = root / f"{test}.h5ad"
    out.unlink(missing_ok=True)
    model = load_trained_model(run.checkpoint("best"), cfg.train.device)
    predict_sample(run, test, model, out, replace(cfg.generate, seed=seed, keep_samples=True), progress=SILENT)
    return read_prediction(out), {**info, "prediction": str(out), "regenerated": cfg.generate.sampler}


# ----------------------------------------------------------------------------- scoring and the table


def _table(pred: Prediction, truth: Expression, truth_path: Path) -> dict:
    return metric_table(score_slide(align(pred, truth, truth_path=truth_path), pred.transform).metrics)


def spread_scale(pred: Prediction) -> np.ndarray | None:
    """The per-gene spread scale generate applied to a HINGE prediction (its run's best card), else None."""
    if pred.model != "hinge" or not pred.path.is_file():
        return None
    card = read_checkpoint_card(Run(pred.path.parent).checkpoint("best"))
    return np.asarray(card.calibration.scale, np.float32) if card.calibration is not None else None


def score(pred: Prediction, truth: Expression, truth_path: Path) -> dict:
    """Every metric of `hinge eval`'s table, by key; with draws also what single samples, the samples' mean
    and (for a calibrated HINGE prediction) the raw spread before its per-gene scale would score.

    The raw spread is the file's std over the scale, and its draws narrowed by the scale around X (the one-shot mean
    the coupled draws centre on), censored again at the model space's floor: exact but for draws the floor had moved.
    """
    numbers = _table(pred, truth, truth_path)
    if pred.draws is None:
        return numbers
    point_only = {"std": None, "q05": None, "q95": None, "draws": None}
    one = _table(replace(pred, values=pred.draws[:, 0], **point_only), truth, truth_path)
    numbers["sampling.one_sample_coexpression"] = one["correlation.model.coexpression.consistency"]
    numbers["sampling.one_sample_depth_partial"] = one[ROWS[0][1]]
    mean = pred.draws.mean(1)
    numbers["sampling.samples_mean_depth_partial"] = _table(replace(pred, values=mean, **point_only), truth, truth_path)[ROWS[0][1]]
    scale = spread_scale(pred)
    if scale is not None:
        center = pred.values[:, None]
        draws = np.maximum(center + (pred.draws - center) / scale, np.float32(MODEL_SPACE_FLOOR))
        gaussian = gaussian_batch(pred.values, pred.std / scale)
        raw = _table(replace(pred, std=gaussian.std, q05=gaussian.q05, q95=gaussian.q95, draws=draws), truth, truth_path)
        numbers |= {f"raw.{key}": raw[f"calibration.{key}"] for key in RAW_KEYS}
        one_raw = _table(replace(pred, values=draws[:, 0], **point_only), truth, truth_path)
        numbers["raw.one_sample_coexpression"] = one_raw["correlation.model.coexpression.consistency"]
    return numbers


def fold_scores(s: Settings, base: Run, panels: dict, backbone: Path | None) -> dict[str, dict[str, dict[str, list[dict]]]]:
    """scores[panel][method][fold]: one entry per seed (baselines: one), computing only what `scores/` lacks."""
    key = encoder_key(parse_encoders(s.config.embed.encoder))
    results: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for panel in s.panels:
        for test in s.folds:
            genes = panels[panel.name, test]
            truth_path = Path(base.sample(test)["expression"]["path"])
            truth, inputs = None, None  # read once per fold and panel, and only if something is computed
            for method in panel.methods:
                for seed in s.seeds_of(method):
                    name = method if seed is None else f"{method}/seed{seed}"
                    path = s.out / "scores" / panel.name / test / f"{name}.json"
                    numbers = json.loads(path.read_text()) if path.exists() and not s.overwrite else {}
                    fold_root = s.out / "folds" / panel.name / test / name
                    if s.regenerate and seed is not None and (fold_root / "checkpoints" / "best.safetensors").is_file():
                        started, truth = time.time(), truth or read_expression(truth_path)
                        pred, info = regenerate_hinge(fold_root, test, panel_config(s.variant_config(method), panel), seed,
                                                      numbers.get("info", {}))
                        numbers = {**score(pred, truth, truth_path), **{k: numbers.get(k) for k in TIMING_KEYS}, "info": info,
                                   "genes": genes, "regenerate_seconds": time.time() - started}
                        write_json(path, numbers)
                        numbers = json.loads(path.read_text())
                    elif (s.rescore or s.regenerate) and seed is None:
                        numbers = {}  # a baseline costs seconds: run it again
                    elif s.rescore and Path(numbers.get("info", {}).get("prediction", "")).is_file():
                        truth = truth or read_expression(truth_path)
                        kept = {k: numbers.get(k) for k in (*TIMING_KEYS, "info", "genes")}
                        numbers = {**score(read_prediction(Path(kept["info"]["prediction"])), truth, truth_path), **kept}
                        write_json(path, numbers)
                        numbers = json.loads(path.read_text())
                    if ROWS[0][1] not in numbers:  # not scored yet, or scored before scores were flat metric tables
                        log.info("%s  fold %s  %s", panel.name, test, name)
                        started, cpu = time.time(), CpuSnapshot.now()
                        truth = truth or read_expression(truth_path)
                        if seed is None:
                            inputs = inputs or BaselineInputs.read(base, key, test, genes, s.per_slide, s.transform)
                            pred, info = run_baseline(method, inputs, test, genes, s.n_samples)
                        else:
                            pred, info = run_hinge(method, base, fold_root, test, genes,
                                                   backbone, panel_config(s.variant_config(method), panel), s, seed)
                        seconds = time.time() - started
                        numbers = {**score(pred, truth, truth_path), "seconds": seconds,
                                   "others_busy": others_busy(cpu, CpuSnapshot.now()), "info": info, "genes": genes}
                        path.parent.mkdir(parents=True, exist_ok=True)
                        write_json(path, numbers)
                        numbers = json.loads(path.read_text())
                        log.info("  depth-partial %.3f  raw %.3f  (%.0f s)", _get(numbers, ROWS[0][1]), _get(numbers, ROWS[1][1]),
                                 seconds)
                    results.setdefault(panel.name, {}).setdefault(method, {}).setdefault(test, []).append(numbers)
    return results


def _get(numbers: dict, key: str) -> float:
    """One fold's value of a row (NaN where undefined: written as null)."""
    value = numbers.get(key)
    return float("nan") if value is None else float(value)


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def summarise(results: dict) -> dict:
    """Per panel, method and row: mean and std over folds (ddof 0) of the seed-averaged fold values, the values per
    fold, and the seed spread (the std over seeds of the mean over folds; None with one seed)."""
    out: dict = {}
    for panel, methods in results.items():
        for method, folds in methods.items():
            names = sorted(folds)
            for _, key, _ in ROWS:
                table = np.array([[_get(run, key) for run in folds[f]] for f in names])  # (folds, seeds)
                per_fold = np.array([_mean(row) if _mean(row) is not None else np.nan for row in table])
                finite = per_fold[np.isfinite(per_fold)]
                per_seed = [_mean(table[:, k]) for k in range(table.shape[1])]
                spread = [v for v in per_seed if v is not None]
                out.setdefault(panel, {}).setdefault(method, {})[key] = {
                    "mean": float(finite.mean()) if len(finite) else None,
                    "std": float(finite.std()) if len(finite) else None,
                    "seed_std": float(np.std(spread)) if len(spread) > 1 else None,
                    "folds": dict(zip(names, [None if not np.isfinite(v) else float(v) for v in per_fold], strict=True)),
                }
    return out


def _sampling(s: Settings) -> str:
    sampler = s.config.generate.sampler
    if sampler == "reverse":
        return f"reverse sampler, {s.steps} steps x {s.n_samples} samples"
    return f"{sampler} sampler (one pass), {s.n_samples} samples"


FEATURE_NORM_WORDS = {"slide": "slide by slide, then by the training spots (`--feature-norm slide`)",
                      "training": "by the training spots only (`--feature-norm training`)"}


SPACE_WORDS = {"none": "log2(counts + 1) (`--normalize none`)", "total": "ln(CP10k + 1), counts scaled to 10,000 per spot (`--normalize total`)"}


def markdown(summary: dict, s: Settings) -> str:
    lines = ["# HER2ST patient C, leave-one-section-out", "",
             (f"Folds: {', '.join(s.folds)}. Model space {SPACE_WORDS[s.transform.normalize]}; every method trained on it and "
              "scored by `hinge eval`'s metrics (panels chosen on log2(counts + 1)). "
             f"Every method's image features standardised {FEATURE_NORM_WORDS[s.config.warmup.feature_norm]}. "
             f"HINGE: `{s.config.preset}` config, early stopping with patience {s.config.train.patience}, "
             f"{_sampling(s)}; seeds {', '.join(map(str, s.seeds))} for "
             f"{' and '.join(MAIN_HINGE)}, {', '.join(map(str, s.ablation_seeds))} for the ablations. Mean ± std over folds "
             "(HINGE: of each fold's mean over seeds; in brackets the std over seeds of the mean over folds); the best mean "
             "of each row is bold; — = undefined (the training mean has no spread, so only its errors count)."), ""]
    for panel in s.panels:
        methods = [m for m in panel.methods if m in summary.get(panel.name, {})]
        epochs = panel_config(s.config, panel).train.epochs
        lines += [(f"## {panel.name}: {panel.n_genes} genes ({panel.select}, chosen on the training sections); "
                  f"HINGE trains up to {epochs} epochs"), "",
                  "| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for label, key, higher in ROWS:
            cells = [{"mean": None} if m == "train-mean" and key not in MEAN_ONLY_ROWS else summary[panel.name][m][key]
                     for m in methods]
            means = [c["mean"] for c in cells if c["mean"] is not None]
            best = None if higher is None or not means else max(means) if higher else min(means)
            row = []
            for c in cells:
                if c["mean"] is None:
                    row.append("—")
                    continue
                digits = 0 if key == "seconds" else 3
                text = f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"
                if c.get("seed_std") is not None and key != "seconds":
                    text += f" (seeds ±{c['seed_std']:.{digits}f})"
                row.append(f"**{text}**" if best is not None and c["mean"] == best else text)
            if s.transform.normalize == "total":
                label = label.replace("log2 counts", "log2 CP10k" if s.transform.log_base == 2 else "ln CP10k")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines += ["", *paired_lines(summary[panel.name]), ""]
        lines += [f"- `{m}`: {HINGE_VARIANTS[m].what}" for m in methods if m in HINGE_VARIANTS] + [""]
    lines += ["One-off costs:", ""] + [f"- {name}: {seconds:.0f} s" for name, seconds in s.timings.items()] + [""]
    lines += [load_line(s.others_busy), ""] if s.others_busy is not None else []
    return "\n".join(lines)


def paired_lines(methods: dict) -> list[str]:
    """Each HINGE method minus ridge on the headline, fold by fold: the difference the targets are about."""
    key = ROWS[0][1]
    if "ridge" not in methods:
        return []
    ridge_folds = methods["ridge"][key]["folds"]
    lines = ["Depth-partial Pearson minus ridge's, per fold (mean over folds):", ""]
    for method in (m for m in methods if m in HINGE_VARIANTS):
        folds = methods[method][key]["folds"]
        diffs = {f: folds[f] - ridge_folds[f] for f in folds if folds[f] is not None and ridge_folds.get(f) is not None}
        if diffs:
            cells = ", ".join(f"{f} {d:+.3f}" for f, d in diffs.items())
            lines.append(f"- `{method}`: {np.mean(list(diffs.values())):+.3f} ({cells})")
    return lines


# ----------------------------------------------------------------------------- command line


def settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/her2st-hest"), help="prepared HER2ST (made if absent)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/her2st"))
    parser.add_argument("--config", default="small", help="HINGE config preset or YAML")
    # The validation figure flattens early: replaying the 90 stored fold runs of 20 epochs / patience 8, stopping at
    # 12 / patience 4 would have chosen an epoch 0.002 worse on the validation section (default model), at half the epochs.
    parser.add_argument("--epochs", type=int, default=12, help="HINGE training epochs (early-stopped)")
    parser.add_argument("--patience", type=int, default=4, help="HINGE early stopping patience (epochs)")
    parser.add_argument("--samples", type=int, default=GenerateConfig.n_samples, help="samples per spot when predicting")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="reverse-process steps when predicting (and calibrating)")
    parser.add_argument("--folds", default=",".join(SECTIONS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds (0..N-1) of HINGE's default and paper model")
    parser.add_argument("--ablation-seeds", type=int, help="seeds of each ablation (default: --seeds)")
    parser.add_argument("--methods", help=f"comma-separated subset of the methods (default: all but {', '.join(OPT_IN)})")
    parser.add_argument("--panel200", action="store_true", help="also the ~200-gene hmhvg panel (baselines and HINGE's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke version: folds C2,C3, one seed, ridge/MLP/HINGE default/paper, short training")
    parser.add_argument("--overwrite", action="store_true", help="recompute scores already in --out/scores")
    parser.add_argument("--rescore", action="store_true",
                        help="score HINGE's stored predictions again (and rerun the baselines) without retraining")
    parser.add_argument("--regenerate", action="store_true",
                        help="calibrate HINGE's trained fold runs again (`hinge calibrate`) and predict anew, without retraining")
    parser.add_argument("--sampler", default=GenerateConfig.sampler, choices=SAMPLERS, help="HINGE's sampler")
    parser.add_argument("--feature-norm", default=WarmupConfig.feature_norm, choices=FEATURE_NORMS,
                        help="every method's image features: slide-standardised first, or by the training spots only")
    parser.add_argument("--normalize", default=WarmupConfig.normalize, choices=NORMALIZE,
                        help="every method's targets and scoring space: log2(counts + 1), or counts scaled to 10,000 first")
    args = parser.parse_args(argv)
    ensure_data(args.data)
    corpus = [Path(line) for line in (args.data / "corpus.txt").read_text().split() if line]
    overrides: dict = {"train": {"epochs": args.epochs, "patience": args.patience}}
    folds, panels, seeds = tuple(args.folds.split(",")), PANELS if args.panel200 else PANELS[:1], tuple(range(args.seeds))
    ablation_seeds = tuple(range(args.seeds if args.ablation_seeds is None else args.ablation_seeds))
    if args.quick:
        overrides = {"train": {"epochs": 8}, "warmup": {"epochs": 2}, "pretrain": {"epochs": 1}}
        folds, corpus, seeds, ablation_seeds = folds[:2], corpus[:6], (0,), (0,)
        panels = (replace(PANELS[0], methods=QUICK_METHODS),)
    if args.methods:
        chosen = tuple(args.methods.split(","))
        unknown = sorted(set(chosen) - set(METHODS))
        if unknown:
            parser.error(f"--methods: {', '.join(unknown)} are not methods ({', '.join(METHODS)})")
        panels = tuple(replace(p, methods=tuple(m for m in p.methods if m in chosen)) for p in panels)
    else:
        panels = tuple(replace(p, methods=tuple(m for m in p.methods if m not in OPT_IN)) for p in panels)
    unknown = sorted(set(folds) - set(SECTIONS))
    if unknown:
        parser.error(f"--folds: {', '.join(unknown)} are not sections of patient C ({', '.join(SECTIONS)})")
    overrides["tile"] = LEGACY_ST
    overrides.setdefault("warmup", {}).update(feature_norm=args.feature_norm, normalize=args.normalize)
    overrides["generate"] = {"sampler": args.sampler, "n_samples": args.samples, "steps": args.steps}  # train calibrates with them too
    cfg = load_config(args.config, None, overrides)
    return Settings(args.data, args.out, cfg, folds, panels, args.samples, args.steps, corpus, args.overwrite,
                    rescore=args.rescore, regenerate=args.regenerate, seeds=seeds, ablation_seeds=ablation_seeds, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = settings(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    base = base_run(s)
    panels = choose_panels(base, s)
    needs_backbone = any(HINGE_VARIANTS[m].pretrained for p in s.panels for m in p.methods if m in HINGE_VARIANTS)
    backbone = pretrained_backbone(s, {g for genes in panels.values() for g in genes}) if needs_backbone else None
    results = fold_scores(s, base, panels, backbone)
    summary = summarise(results)
    timed = [r for methods in results.values() for folds in methods.values() for runs in folds.values() for r in runs]
    s.others_busy = mean_busy(timed)
    if s.others_busy is not None and reads_high(s.others_busy):
        log.warning("%s", load_line(s.others_busy))
    folds_total = sum(r["seconds"] for r in timed)
    s.timings["total compute (one-off costs + every method on every fold)"] = sum(s.timings.values()) + folds_total
    report = markdown(summary, s)
    write_text_atomic(s.out / "results.md", report)
    write_json(s.out / "results.json", {"summary": summary, "timings": s.timings, "folds": list(s.folds), "seeds": list(s.seeds),
                                        "config": s.config.to_dict(), "samples": s.n_samples, "steps": s.steps,
                                        "machine": {"cpus": os.cpu_count(), "others_busy": s.others_busy}})
    print(report)
    print(f"wrote {s.out / 'results.md'} and {s.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
