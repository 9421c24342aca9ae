"""HER2ST under simulated shifts: what a new patient's slide does to ridge and HINGE, one shift at a time.

    make bench-shift                        # 5 folds, HINGE seed 0 (~30 min on 2 cores when nothing is trained yet)
    make bench-shift ARGS=--quick           # 2 folds, short training (~8 min)
    python benchmarks/her2st/shift.py --seeds 3   # beside `make bench-her2st`'s fold runs (same --out): reuses them

The folds are benchmark.py's leave-one-section-out folds of patient C, and so are the trained models:
whatever fold run `--out` lacks is trained first (benchmark.py's protocol, HINGE's default and ridge).
Each held-out section is then predicted and scored under one shift at a time:

- thin-660: its counts binomially thinned to a median of 660 UMI per spot (a shallow section of another
  lab). The predictions are the unshifted ones: nothing in `generate` reads the section's counts.
- stain-weak, stain-strong: HED stain jitter (Tellez et al. 2018) of the whole slide: the haematoxylin,
  eosin and residual optical densities scaled by 1 + σu and shifted by σv, σ 0.05 and 0.2 (the same
  direction, four times as far). Tellez draws u and v uniform in [-1, 1]; here each is ±1 with a sign
  drawn per fold, so a strong jitter is strong on every fold (a uniform draw left one fold's strong
  jitter 0.6 RGB levels from the original).
- jpeg50-blur1: the slide blurred (Gaussian, σ = 1 px), then JPEG-compressed at quality 50.
- mpp+10%: the slide's µm/px stated 10% too large, so every patch covers 10% more tissue than it says.

An image shift writes a new slide, tiled and embedded as the original was. The fold's HINGE and the ridge
stored beside it (`generate --model ridge`: same spots, features and split) predict it through
`generate`'s own code, and `hinge eval`'s metrics score it against the (thinned) truth: coverage and CRPS
through the observation model (each draw counted at the measured spot's own depth). The shift score is
the prediction's `uns['hinge']['shift']`. Writes `shift.md` and `shift.json` under --out; every score is
kept under `shift/scores/`, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import benchmark
import numpy as np
import tifffile
from PIL import Image, ImageFilter
from scipy import sparse

from hinge_cli.core.files import atomic_path, write_text_atomic
from hinge_cli.core.progress import SILENT
from hinge_cli.data.expression import Expression, read_expression
from hinge_cli.data.samples import SampleSpec
from hinge_cli.data.sources import read_sample_sheet
from hinge_cli.eval import HEADLINE, Prediction, read_prediction, write_json
from hinge_cli.predict.trained import TrainedModel, load_trained_model
from hinge_cli.run.directory import Run
from hinge_cli.slide.writer import write_pyramidal_tiff
from hinge_cli.stages.embed import embed_samples
from hinge_cli.stages.generate import predict_sample
from hinge_cli.stages.predictors import hinge_predictor, ridge_predictor
from hinge_cli.stages.tile import tile_samples
from hinge_cli.stages.train import shift_reference

log = logging.getLogger("bench-shift")
Image.MAX_IMAGE_PIXELS = None  # whole slides: HER2ST's are ~92 Mpx

SHIFTS = ("none", "thin-660", "stain-weak", "stain-strong", "jpeg50-blur1", "mpp+10%")
IMAGE_SHIFTS = ("stain-weak", "stain-strong", "jpeg50-blur1", "mpp+10%")  # each tiles and embeds a slide of its own
THIN_MEDIAN = 660  # UMI per spot: the other patient's section of issue 29
STAIN_SIGMA = {"stain-weak": 0.05, "stain-strong": 0.2}
BLUR_SIGMA, JPEG_QUALITY, MPP_FACTOR = 1.0, 50, 1.1
# Ruifrok & Johnston's optical densities of haematoxylin, eosin and DAB (the residual channel) in R, G, B
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
BAND = 1024  # image rows jittered at a time
METHODS = ("ridge", "hinge")
COLUMNS = (  # (label, key in a score)
    ("depth-partial Pearson", HEADLINE.key),
    ("Pearson, ln CP10k", "correlation.model.pearson.mean"),
    ("inside the central 68% (0.683 ideal)", "calibration.within_1std"),
    ("CRPS", "calibration.crps"),
    ("spots < 100 UMI left out", "correlation.low_count_spots"),
    ("shift score", "shift.score"),
    ("flagged", "shift.outside"),
)


# ----------------------------------------------------------------------------- the shifts


def hed_jitter(rgb: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The slide's stain optical densities scaled by 1 + σu and shifted by σv (u, v in {-1, 1}³, signs from `seed`)."""
    u, v = np.random.default_rng(seed).choice([-1.0, 1.0], (2, 3))
    out = np.empty_like(rgb)
    for top in range(0, rgb.shape[0], BAND):
        band = rgb[top : top + BAND].astype(np.float32)
        density = -np.log((band + 1.0) / 256.0) @ HED_FROM_RGB.astype(np.float32)
        density = density * (1.0 + sigma * u).astype(np.float32) + (sigma * v).astype(np.float32)
        back = 256.0 * np.exp(-(density @ RGB_FROM_HED.astype(np.float32))) - 1.0
        out[top : top + BAND] = np.clip(np.rint(back), 0, 255).astype(np.uint8)
    return out


def blurred_jpeg(rgb: np.ndarray) -> np.ndarray:
    """A Gaussian blur of σ = 1 px, then one JPEG round trip at quality 50: a softer, lossier scanner."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(BLUR_SIGMA)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


def thinned(truth: Expression, seed: int, median: float = THIN_MEDIAN) -> Expression:
    """Every count kept with the probability that takes the spots' median total to `median` (binomial thinning)."""
    share = min(1.0, median / float(np.median(truth.totals)))
    counts = truth.counts.copy().astype(np.float32)
    counts.data = np.random.default_rng(seed).binomial(np.rint(counts.data).astype(np.int64), share).astype(np.float32)
    counts.eliminate_zeros()
    return replace(truth, counts=sparse.csr_matrix(counts), totals=np.asarray(counts.sum(1)).ravel())


def shifted_slide(spec: SampleSpec, shift: str, seed: int, root: Path) -> SampleSpec:
    """The held-out section's sample under an image shift: a new slide, or the same one with its µm/px overstated."""
    if shift == "mpp+10%":
        return spec._replace(mpp=float(spec.mpp) * MPP_FACTOR)
    path = root / f"{spec.sample_id}.tif"
    if not path.exists():
        rgb = tifffile.imread(spec.slide, key=0)
        rgb = blurred_jpeg(rgb) if shift == "jpeg50-blur1" else hed_jitter(rgb, STAIN_SIGMA[shift], seed)
        with atomic_path(path) as tmp:
            write_pyramidal_tiff(tmp, rgb, float(spec.mpp))
    return spec._replace(slide=path)


def shifted_run(s: benchmark.Settings, spec: SampleSpec, shift: str, seed: int) -> Run:
    """A run holding the held-out section tiled and embedded under `shift` (made once, shared by every seed)."""
    root = s.out / "shift" / spec.sample_id / shift
    root.mkdir(parents=True, exist_ok=True)
    run = Run(root / "run")
    started = time.time()
    tile_samples(run, [shifted_slide(spec, shift, seed, root)], s.config.tile)
    embed_samples(run, s.config.embed)
    log.info("%s %s: tiled and embedded (%.0f s)", spec.sample_id, shift, time.time() - started)
    return run


# ----------------------------------------------------------------------------- predictions and scores


def predictions(run: Run, sample: str, model: TrainedModel, s: benchmark.Settings, seed: int, where: Path) -> dict[str, Prediction]:
    """HINGE's and the stored ridge's predictions of `sample` in `run`, through `generate`'s code (kept in `where`)."""
    cfg = replace(s.config.generate, seed=seed, keep_samples=True)
    out = {}
    for method in METHODS:
        path = where / f"{method}-seed{seed}.h5ad"
        if s.overwrite:
            path.unlink(missing_ok=True)
        if not path.exists():
            predictor = ridge_predictor(model, cfg) if method == "ridge" else hinge_predictor(model, cfg)
            predict_sample(run, sample, model, path, cfg, progress=SILENT, predictor=predictor)
        out[method] = read_prediction(path)
    return out


def fold_model(root: Path) -> TrainedModel:
    """A fold run's trained model, its training slides' statistics measured again as `hinge train` measures them now
    (fold runs trained before the focus measure keep no focus in their cards)."""
    model = load_trained_model(root / "checkpoints" / "best.safetensors", "cpu")
    return replace(model, card=replace(model.card, shift=shift_reference(Run(root), model.card.samples, model.key)))


def scored(pred: Prediction, truth: Expression, truth_path: Path) -> dict:
    """`hinge eval`'s metric table of `pred`, with the shift report's score and verdict."""
    shift = pred.provenance.get("shift", {})
    return {**benchmark._table(pred, truth, truth_path), "shift.score": shift.get("score"),
            "shift.outside": None if "outside" not in shift else float(bool(shift["outside"]))}


def fold_shift_scores(s: benchmark.Settings, base: Run, test: str, seeds: tuple[int, ...]) -> dict:
    """scores[shift][method][seed] of one held-out section, computing only what `shift/scores/` lacks."""
    fold = benchmark.SECTIONS.index(test)
    spec = next(x for x in read_sample_sheet(s.data / "patient_c.csv") if x.sample_id == test)
    truth_path = Path(base.sample(test)["expression"]["path"])
    truth = None
    runs: dict[str, Run] = {}
    out: dict = {}
    for seed in seeds:
        fold_root = s.out / "folds" / benchmark.PANELS[0].name / test / "hinge" / f"seed{seed}"
        model = None
        for shift in SHIFTS:
            path = s.out / "shift" / "scores" / test / shift / f"seed{seed}.json"
            if path.exists() and not s.overwrite:
                out.setdefault(shift, {})[seed] = json.loads(path.read_text())
                continue
            truth = truth or read_expression(truth_path)
            model = model or fold_model(fold_root)
            if shift in IMAGE_SHIFTS:
                runs[shift] = runs.get(shift) or shifted_run(s, spec, shift, fold)
                preds = predictions(runs[shift], test, model, s, seed, runs[shift].root.parent)
            else:  # thinning changes the truth alone: the section's own prediction
                preds = predictions(Run(fold_root), test, model, s, seed, s.out / "shift" / test / "none")
            target = thinned(truth, fold) if shift == "thin-660" else truth
            numbers = {method: scored(pred, target, truth_path) for method, pred in preds.items()}
            numbers["median_umi"] = float(np.median(target.totals))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, numbers)
            out.setdefault(shift, {})[seed] = json.loads(path.read_text())
            log.info("%s seed %d %-13s depth-partial ridge %.3f hinge %.3f; coverage ridge %.3f hinge %.3f; shift score %s",
                     test, seed, shift, *(_get(numbers[m], HEADLINE.key) for m in METHODS),
                     *(_get(numbers[m], "calibration.within_1std") for m in METHODS), numbers["hinge"]["shift.score"])
    return out


# ----------------------------------------------------------------------------- the table


def _get(numbers: dict, key: str) -> float:
    value = numbers.get(key)
    return float("nan") if value is None else float(value)


def summarise(scores: dict[str, dict]) -> dict:
    """[shift][method][column]: mean and std over folds of each fold's mean over seeds, the std over seeds of the mean
    over folds, and the per-fold values; plus each shift's depth-partial drop from `none`, paired by fold and seed."""
    folds = sorted(scores)
    seeds = sorted({seed for test in folds for shift in scores[test].values() for seed in shift})
    out: dict = {}
    for shift in SHIFTS:
        for method in METHODS:
            cells = {}
            for key in [key for _, key in COLUMNS] + ["drop"]:
                table = np.full((len(folds), len(seeds)), np.nan)
                for i, test in enumerate(folds):
                    for j, seed in enumerate(seeds):
                        runs = scores[test].get(shift, {})
                        if seed not in runs:
                            continue
                        if key == "drop":
                            table[i, j] = _get(scores[test]["none"][seed][method], HEADLINE.key) - _get(runs[seed][method], HEADLINE.key)
                        else:
                            table[i, j] = _get(runs[seed][method], key)
                per_fold = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in table])
                per_seed = [np.nanmean(table[:, j]) for j in range(len(seeds)) if np.isfinite(table[:, j]).any()]
                finite = per_fold[np.isfinite(per_fold)]
                cells[key] = {"mean": float(finite.mean()) if len(finite) else None, "std": float(finite.std()) if len(finite) else None,
                              "seed_std": float(np.std(per_seed)) if len(per_seed) > 1 else None,
                              "folds": dict(zip(folds, [None if not np.isfinite(v) else float(v) for v in per_fold], strict=True))}
            out.setdefault(shift, {})[method] = cells
    return out


def _text(cell: dict, digits: int = 3) -> str:
    if cell["mean"] is None:
        return "—"
    text = f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    return text + (f" (seeds ±{cell['seed_std']:.{digits}f})" if cell.get("seed_std") is not None else "")


def targets(summary: dict) -> list[str]:
    """The issue's targets, read off the summary: coverage on thinned counts, drops under image shifts, the flags."""
    def mean(shift: str, method: str, key: str) -> float:
        value = summary[shift][method][key]["mean"]
        return float("nan") if value is None else value

    lines = []
    for method in METHODS:
        coverage = mean("thin-660", method, "calibration.within_1std")
        lines.append(f"- thinned counts, {method}: coverage {coverage:.3f}, target [0.60, 0.76]: "
                     f"{'met' if 0.60 <= coverage <= 0.76 else 'missed'}")
    for shift in IMAGE_SHIFTS:
        hinge, ridge = mean(shift, "hinge", "drop"), mean(shift, "ridge", "drop")
        lines.append(f"- {shift}: HINGE's depth-partial drop {hinge:+.3f} against ridge's {ridge:+.3f} + 0.01: "
                     f"{'met' if hinge <= ridge + 0.01 else 'missed'}")
    for shift, wanted in (("stain-strong", True), ("jpeg50-blur1", True), ("stain-weak", False)):
        share = mean(shift, "hinge", "shift.outside")
        lines.append(f"- {shift}: flagged on {share:.0%} of the folds' slides, wanted {'all' if wanted else 'none'}: "
                     f"{'met' if share == float(wanted) else 'missed'}")
    return lines


def markdown(summary: dict, s: benchmark.Settings, seeds: tuple[int, ...], seconds: float) -> str:
    lines = ["# HER2ST patient C under simulated shifts", "",
             (f"Folds {', '.join(s.folds)} (leave one section out); HINGE's default (`{s.config.preset}`, seeds "
              f"{', '.join(map(str, seeds))}) and the ridge stored beside it, on the same spots and features; units "
              "ln(CP10k + 1). Mean ± std over folds of each fold's mean over seeds (in brackets the std over seeds). "
              "Depth-partial scores leave out spots under 100 UMI (the column says how many per section). Coverage and "
              "CRPS through the observation model: each draw counted at the measured spot's own depth. `drop` is the "
              "depth-partial Pearson lost against the unshifted section, fold by fold. `flagged`: the share of "
              "sections the shift report warned about."), "",
             "| shift | method | " + " | ".join(label for label, _ in COLUMNS) + " | drop |",
             "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for shift in SHIFTS:
        for method in METHODS:
            cells = summary[shift][method]
            row = [_text(cells[key], 0 if key == "correlation.low_count_spots" else 2 if key.startswith("shift.") else 3)
                   for _, key in COLUMNS]
            lines.append(f"| {shift} | {method} | " + " | ".join(row) + f" | {_text(cells['drop'])} |")
    lines += ["", "Targets (issue 29):", "", *targets(summary), "", f"Compute: {seconds:.0f} s on this run (training reused where present).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/her2st-hest"), help="prepared HER2ST (made if absent)")
    parser.add_argument("--out", type=Path, help="benchmark.py's --out, whose fold runs are reused "
                                                 "(default bench-out/her2st; with --quick bench-out/her2st-quick)")
    parser.add_argument("--seeds", type=int, default=1, help="HINGE fold runs of seeds 0..N-1")
    parser.add_argument("--folds", default=",".join(benchmark.SECTIONS))
    parser.add_argument("--quick", action="store_true", help="folds C2,C3, one seed, short training")
    parser.add_argument("--overwrite", action="store_true", help="predict and score again what shift/ holds (after `hinge calibrate`)")
    args = parser.parse_args(argv)
    out = args.out or Path("bench-out/her2st-quick" if args.quick else "bench-out/her2st")
    settings_args = ["--data", str(args.data), "--out", str(out), "--methods", ",".join(METHODS), "--seeds", str(args.seeds),
                     "--folds", args.folds] + (["--quick"] if args.quick else [])
    s = replace(benchmark.settings(settings_args), overwrite=args.overwrite)
    started = time.time()
    s.out.mkdir(parents=True, exist_ok=True)
    base = benchmark.base_run(s)
    panels = benchmark.choose_panels(base, s)
    backbone = benchmark.pretrained_backbone(s, {g for genes in panels.values() for g in genes})
    benchmark.fold_scores(replace(s, overwrite=False), base, panels, backbone)  # trains the fold runs --out lacks
    seeds = s.seeds
    scores = {test: fold_shift_scores(s, base, test, seeds) for test in s.folds}
    summary = summarise(scores)
    report = markdown(summary, s, seeds, time.time() - started)
    write_text_atomic(s.out / "shift.md", report)
    write_json(s.out / "shift.json", {"summary": summary, "folds": list(s.folds), "seeds": list(seeds), "scores": scores,
                                      "config": s.config.to_dict()})
    print(report)
    print(f"wrote {s.out / 'shift.md'} and {s.out / 'shift.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
