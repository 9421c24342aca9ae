"""`hinge generate`: a slide (or a sample already in the run) in, an AnnData of predicted expression out.

The slide is tiled and embedded with exactly the settings the checkpoint records
(`hinge_cli.stages.slide_inputs`), caching both in the run like `hinge tile`/`hinge embed` do. The sampler (`hinge_cli.stages.predictors`)
then runs in batches of spots, each batch written straight into the output's datasets, so
memory stays at one batch plus per-spot metadata however many spots a slide has. The
file is written under a lock to a temporary name and renamed into place. With `model="ridge"`
the closed-form baseline `hinge train` stored beside the checkpoint predicts instead, into the
same format at `<sample>.ridge.h5ad`: its mean and a per-gene Gaussian from its out-of-fold residuals.
With `given` (panel completion, `hinge_cli.predict.given`) the genes measured on the spots are held fixed and the
others drawn conditioned on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hinge_cli import __version__
from hinge_cli.config import GenerateConfig
from hinge_cli.core.figures import MapPanel, spot_maps
from hinge_cli.core.files import atomic_path
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.data.bins import HDBins, bin_frame
from hinge_cli.data.expression import expression_unit
from hinge_cli.data.features import SlideShift, prediction_view
from hinge_cli.data.shift import ExtremeFeatures, shift_report, warn_if_outside
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.eval.viewer import build_view, write_view
from hinge_cli.formats.embeddings import EmbeddingReader, open_embeddings
from hinge_cli.formats.prediction import PredictionSpots, SpatialFrame, ridge_prediction_path, write_prediction
from hinge_cli.formats.tiles import Tiles, read_tiles
from hinge_cli.model.sampler import sampling_steps
from hinge_cli.predict.given import GivenSource, read_given
from hinge_cli.predict.trained import TrainedModel, load_trained_model, require_panel
from hinge_cli.run.directory import Run, SampleReport, Shard
from hinge_cli.run.output import sample_output
from hinge_cli.slide.reader import hires_image
from hinge_cli.slide.stats import slide_stats
from hinge_cli.stages.predictors import (
    Predictor,
    completion_predictor,
    generate_stage,
    genes_ridge_predictor,
    hinge_predictor,
    ridge_predictor,
)
from hinge_cli.stages.slide_inputs import Encoders, Target, ensure_embeddings, ensure_tiles

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.25  # relative µm/px difference from the training slides that earns a warning
MODELS = ("hinge", "ridge")


# ----------------------------------------------------------------------------- output


def _provenance(model: TrainedModel, spots: Tiles, encoders_sha: list[str]) -> dict[str, Any]:
    a, card = spots.attrs, model.card
    return {
        "version": __version__, "checkpoint": str(model.path.resolve()), "checkpoint_sha256": card.sha256,
        "encoders": list(card.encoders), "encoder_key": model.key, "encoder_weights_sha256": encoders_sha,
        "n_genes": model.net.n_genes, "transform": card.transform.to_dict(), "slide": str(a.slide), "mpp": a.mpp_source,
        "feature_norm": "slide" if card.per_slide else "training", "tile_mode": a.mode, "target_mpp": a.mpp_target, "patch_px": a.patch_px,
    }


def _shift(model: TrainedModel, sample: str, spots: Tiles, embeddings: EmbeddingReader, rows: Callable[[np.ndarray], np.ndarray],
           image: np.ndarray, scalef: float) -> dict[str, Any]:
    """{"shift": the slide against the training slides} for uns['hinge'], with a warning when it lies outside them;
    {} for a model whose card predates the shift report. `rows` is what the model does to the slide's features: where
    that is standardising by the slide's own moments, they are not read again."""
    if model.card.shift is None:
        log.info("%s: the model's card keeps no training-slide statistics (trained before the shift report), so no shift report", sample)
        return {}
    moments = rows if isinstance(rows, SlideShift) else SlideShift.read(embeddings, sample)
    report = shift_report(model.card.shift, slide_stats(spots, moments, (image, scalef)))
    warn_if_outside(sample, report)
    return {"shift": report}


def predict_sample(run: Run, sample: str, model: TrainedModel, out: Path, cfg: GenerateConfig,
                   genes_to_plot: Sequence[str] = (), progress: Progress = SILENT, predictor: Predictor | None = None,
                   overwrite: bool = True, tiles: Tiles | None = None, hd: HDBins | None = None) -> dict:
    """Predict one embedded sample (default: HINGE with its configured sampler, coupled unless set) in batches and write `out`; returns the manifest
    record. Without `overwrite`, an `out` another job finished and recorded while this one waited is kept (OutputFinished).
    `tiles`: the sample's tiles when the caller has read them already. The embeddings are opened once, for everything.
    `hd`: the spots are these Visium HD bins, and the output is placed in their capture area's frame."""
    started = time.time()
    predictor = predictor or hinge_predictor(model, cfg)
    spots = tiles if tiles is not None else read_tiles(run.tiles(sample))
    with open_embeddings(run.embeddings(model.key, sample)) as features:
        return _predict(run, sample, model, out, cfg, genes_to_plot, progress, predictor, overwrite, spots, features, started, hd)


def _frame(model: TrainedModel, spots: Tiles, image: np.ndarray, scalef: float,
           hd: HDBins | None) -> tuple[np.ndarray, SpatialFrame, dict[str, Any]]:
    """The output's spot centres, its uns['spatial'] frame, and what provenance says of it: the slide's own pixels, or
    for bins the full-resolution pixels and scale factors of the bin size (as Space Ranger and spatialdata-io read them)."""
    if hd is None:
        return spots.coords.astype(np.float64), SpatialFrame.of_slide(image, scalef, spots.attrs.spot_um / spots.attrs.mpp_source), {}
    coords, frame = bin_frame(hd.outs, hd.bin_um, spots.barcodes)
    trained = model.tiling.spot_um
    return coords, frame, {"visium_hd": {"outs": str(Path(hd.outs).resolve()), "bin_um": hd.bin_um, "trained_spot_um": trained,
                                         "means": f"the expression of a {trained:g} µm neighbourhood centred on each bin"}}


def _predict(run: Run, sample: str, model: TrainedModel, out: Path, cfg: GenerateConfig, genes_to_plot: Sequence[str],
             progress: Progress, predictor: Predictor, overwrite: bool, spots: Tiles, features: EmbeddingReader,
             started: float, hd: HDBins | None) -> dict:
    genes = model.genes
    plot_cols = [genes.index(g) for g in genes_to_plot]
    n, g = len(spots.barcodes), len(genes)
    mpp = spots.attrs.mpp_source
    image, scalef = hires_image(spots.attrs.slide, mpp)
    weights_sha = [w or "none" for w in features.attrs.weights_sha256]
    model_rows = model.slide_features(features, sample)
    coords, frame, placed = _frame(model, spots, image, scalef, hd)
    provenance = {**_provenance(model, spots, weights_sha), **predictor.provenance, **placed,
                  **_shift(model, sample, spots, features, model_rows, image, scalef)}
    given = predictor.given
    sheet = PredictionSpots(spots.barcodes, coords, spots.tissue_frac, None if given is None else given.per_spot,
                            None if hd is None else np.ones(len(coords), np.int64))  # bins: Space Ranger's in-tissue call
    maps = np.zeros((len(predictor.map_titles), n, len(plot_cols)), np.float32)
    extreme = ExtremeFeatures()
    with sample_output(run, sample, predictor.stage, out.resolve(), overwrite=overwrite) as record:
        run.record_stage(sample, predictor.stage, "running", params={**provenance, "output": str(out.resolve())})
        with (atomic_path(out) as tmp,
              write_prediction(tmp, sample, sheet, genes, frame, provenance,
                               keep_draws=predictor.keep_draws, with_spread=predictor.with_spread,
                               given=None if given is None else given.per_gene) as writer,
              progress.task(f"{sample}: {'sampling' if predictor.name == 'hinge' else predictor.name}", n) as advance):
            for start in range(0, n, cfg.batch_size):
                stop = min(n, start + cfg.batch_size)
                rows = model_rows(features.rows(start, stop))
                extreme.add(model.norm(prediction_view(rows)))
                batch = predictor.predict(rows, start, stop)
                writer.write(start, stop, batch)
                for i, part in enumerate((batch.mean, batch.std)[: len(maps)]):
                    maps[i, start:stop] = part[:, plot_cols]
                advance(stop - start)
        extreme.warn(sample)
        plots = [str(p) for p in _plots(out, sample, genes_to_plot, maps, predictor.map_titles, frame.hires, coords * frame.hires_scale,
                                        frame.spot_diameter * frame.hires_scale, expression_unit(**provenance["transform"]))]
        if cfg.view:
            plots.append(str(write_view(out.with_suffix(".html"), build_view(out), overwrite=True)))
        record.update({"n_spots": n, "n_genes": g, "seconds": round(time.time() - started, 2),
                       "checkpoint_sha256": model.card.sha256, "plots": plots})
    log.info("%s: %d spots x %d genes -> %s in %.1fs", sample, n, g, out, record["seconds"])
    return {"output": str(out.resolve()), **record}


def _plots(out: Path, sample: str, genes: Sequence[str], maps: np.ndarray, titles: Sequence[str], image: np.ndarray,
           xy: np.ndarray, diameter: float, unit: str) -> list[Path]:
    """One PNG per gene beside the output: H&E and each of `maps` (mean, and spread over samples where there is one)."""
    paths = []
    for k, gene in enumerate(genes):
        panels = [MapPanel(title, maps[i, :, k], unit) for i, title in enumerate(titles)]
        paths.append(spot_maps(out.with_name(f"{out.stem}_{gene}.png"), xy, diameter, panels, f"{sample}: {gene}", image,
                               image_panel=True))
    return paths


# ----------------------------------------------------------------------------- stage


def output_paths(run: Run, samples: Sequence[str], out: Path | None, model: str = "hinge") -> dict[str, Path]:
    """One .h5ad per sample: `out` itself for a single sample named *.h5ad, else `<out>/<sample>.h5ad`.

    The ridge baseline's default names are `<sample>.ridge.h5ad` beside them, so it never replaces HINGE's.
    """
    if out is not None and Path(out).suffix == ".h5ad" and Path(out).is_dir():
        raise HingeError(f"{setting('out')} {out} is a folder, though named like a prediction file",
                         f"give a file path that is not a folder, or a folder without the .h5ad ending (or remove {out})")
    if out is None or Path(out).suffix != ".h5ad":
        paths = _hinge_paths(run, samples, out)
        return paths if model == "hinge" else {s: ridge_prediction_path(p) for s, p in paths.items()}
    if len(samples) > 1:
        raise HingeError(f"{setting('out')} {out} is one file but {len(samples)} samples are asked for",
                         f"give a folder as {setting('out')}; each sample is written to <folder>/<sample>.h5ad")
    return {samples[0]: Path(out)}


def _hinge_paths(run: Run, samples: Sequence[str], out: Path | None) -> dict[str, Path]:
    if out is None:
        return {s: run.prediction(s) for s in samples}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HingeError(f"{setting('out')} {out} is an existing file that is not .h5ad", "give a .h5ad path, or a folder")
    return {s: out / f"{s}.h5ad" for s in samples}


def _check_mpp(sample: str, tiles: Tiles, model: TrainedModel) -> None:
    mpp = tiles.attrs.mpp_source
    trained = model.tiling.mpp_source
    if abs(mpp / trained - 1) > MPP_TOLERANCE:
        log.warning("%s: the slide has %.3g µm/px, the training slides %.3g µm/px; patches are resampled to %.3g µm/px "
                    "but a different scanner or magnification may still shift the predictions",
                    sample, mpp, trained, model.tiling.target_mpp)


def _interrupted(run: Run, sample: str, path: Path, stage: str) -> bool:
    """Whether `path` is this run's own output of `sample` that landed but was never recorded as finished."""
    entry = run.stage(sample, stage)
    return entry.get("status") in ("running", "failed") and entry.get("params", {}).get("output") == str(Path(path).resolve())


WORKSPACE = ".hinge-work"  # beside the outputs: new slides' tiles and features when the run cannot be written


def workspace(run: Run, targets: Sequence[Target], paths: dict[str, Path]) -> Run:
    """Where new slides are tiled and embedded: the run, or for new slides on a read-only run (a shared, published
    model) a work folder beside the outputs, so that it still predicts them and writes only where it was told to."""
    if not run.read_only or not targets or any(t.slide is None or run.tiles(t.sample_id).exists() for t in targets):
        return run
    folder = Path(next(iter(paths.values()))).parent / WORKSPACE
    log.warning("run %s is read-only: the new slides' tiles and features go to %s", run.root, folder)
    return Run(folder)


def generate(run: Run, targets: Sequence[Target], cfg: GenerateConfig, *, checkpoint: Path | None = None,
             weights: Sequence[str] = (), genes_to_plot: Sequence[str] = (), out: Path | None = None, shard: Shard = Shard(),
             overwrite: bool = False, keep_going: bool = False, model: str = "hinge", given: GivenSource | None = None,
             progress: Progress = SILENT) -> SampleReport:
    """Predict this shard's share of `targets`: tile and embed new slides as the checkpoint was trained, then sample.

    checkpoint: the model (default: the run's best); model: "ridge" predicts with the baseline `hinge train`
    stored beside the checkpoint instead (to `<sample>.ridge.h5ad` by default); weights: the encoder's, when not in the Hugging Face cache;
    genes_to_plot: a PNG each beside the output; out: a .h5ad for one sample, or a folder (default: the run's);
    keep_going: a failed sample is recorded and the others go on; given: genes measured on the one slide, held fixed.
    """
    if cfg.n_samples < 1:
        raise HingeError(f"{setting('n-samples')} {cfg.n_samples} must be at least 1", f"give e.g. {setting('n-samples', '8')}")
    if cfg.batch_size < 1:
        raise HingeError(f"{setting('batch-size')} {cfg.batch_size} must be at least 1", f"give e.g. {setting('batch-size', '64')}")
    if model not in MODELS:
        raise HingeError(f"{setting('model')} {model} is not one of {', '.join(MODELS)}", f"give {setting('model')} hinge or {setting('model')} ridge")
    ids = [t.sample_id for t in targets]
    if not ids or len(set(ids)) != len(ids):
        raise HingeError("no samples, or a sample id given twice", f"give each slide or {setting('sample-id')} once")
    if given is not None:
        given.check_request(model, len(ids))
    by_id = {t.sample_id: t for t in targets}
    paths = output_paths(run, sorted(ids), out, model)
    stage = generate_stage(model)
    mine = shard.select(ids)
    summary = SampleReport("generate")
    todo = []
    for sample in mine:
        if paths[sample].exists() and not overwrite and _interrupted(run, sample, paths[sample], stage):
            log.info("%s: %s was left by an interrupted generate; predicting it again", sample, paths[sample])
            todo.append(sample)
        elif paths[sample].exists() and not overwrite:
            if len(ids) == 1:
                raise HingeError(f"{paths[sample]} exists", f"pass {setting('overwrite')} to replace it, or choose another {setting('out')}")
            summary.skipped.append(sample)
            summary.outputs[sample] = str(paths[sample])
        else:
            todo.append(sample)
    if not todo:
        return summary
    checkpoint = Path(checkpoint) if checkpoint is not None else run.checkpoint("best")
    if not checkpoint.exists():
        raise HingeError(f"no trained model at {checkpoint}", f"run `{command('train')}` first, or pass {setting('checkpoint', 'PATH')}")
    if checkpoint.resolve().parent == run.checkpoint("best").resolve().parent:  # the run's own model: its panel is genes.txt's
        require_panel(run, [checkpoint])
    trained = load_trained_model(checkpoint, cfg.device)
    unknown = [gene for gene in genes_to_plot if gene not in trained.genes]
    if unknown:
        raise HingeError(f"{setting('genes-to-plot')} genes not in the model's panel: {', '.join(unknown)}",
                         f"choose among the {len(trained.genes)} panel genes, e.g. {', '.join(trained.genes[:5])}")
    trained.net.schedule.grid(sampling_steps(cfg.steps, trained.net.diffusion.steps))  # an impossible --steps fails now
    predictor = hinge_predictor(trained, cfg) if model == "hinge" else ridge_predictor(trained, cfg)
    encoders = Encoders(trained, weights, cfg.device)
    if any(not run.embeddings(trained.key, s).exists() for s in todo):
        encoders.check_available()  # before any tiling: a missing download is the likeliest failure
    trained_tiling = trained.tile_config()
    work = workspace(run, [by_id[s] for s in todo], paths)
    with progress.task("samples", len(todo)) as advance:
        for sample in todo:
            with summary.attempt(work, sample, predictor.stage, keep_going):
                tiles, retiled = ensure_tiles(work, by_id[sample], by_id[sample].tile_config(trained_tiling), overwrite, progress)
                _check_mpp(sample, tiles, trained)
                ensure_embeddings(work, sample, tiles, trained, encoders, retiled, overwrite, progress)
                if given is not None:  # one sample: its spots are known once it is tiled
                    measured = read_given(given, tiles, trained.genes, trained.card.transform)
                    predictor = (completion_predictor(trained, cfg, measured, work.embeddings(trained.key, sample), sample)
                                 if model == "hinge" else genes_ridge_predictor(run, trained, cfg, measured))
                predict_sample(work, sample, trained, paths[sample], cfg, genes_to_plot, progress, predictor, overwrite, tiles,
                               by_id[sample].hd)
                summary.outputs[sample] = str(paths[sample])
            advance(1)
    return summary
