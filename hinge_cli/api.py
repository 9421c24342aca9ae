"""The pipeline from Python: the same stages, run directory and guarantees as the `hinge` command.

    import hinge_cli
    from hinge_cli import api as hinge

    hinge.tile(sheet="data/samples.csv", run="runs/demo", config="tiny")
    hinge.embed(run="runs/demo")
    hinge.train(run="runs/demo", settings={"warmup": {"holdout": ["synth3"]}})
    adata = hinge.generate(sample_id="synth3", run="runs/demo")
    result = hinge.evaluate("runs/demo/predictions/synth3.h5ad", "data/synth3.h5ad", run="runs/demo")

Each function resolves the config as the command does (preset < the run's hinge.yaml <
`settings`), runs the stage, and records the config in hinge.yaml only after it succeeded.
Outputs are written atomically and skipped when they exist unless `overwrite=True`.
`settings` holds config overrides by section, with the keys of hinge.yaml:
`{"train": {"epochs": 20, "device": "cpu"}}`. Problems you can fix raise `HingeError`,
worded with these functions' argument names. Progress is silent unless you pass a
`progress` (see `hinge_cli.core.progress`); log records go to the `hinge_cli` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.errors import HingeError, setting, worded
from hinge_cli.run.directory import Run, SampleReport, Shard

if TYPE_CHECKING:
    from anndata import AnnData

    from hinge_cli.config import HingeConfig
    from hinge_cli.eval import EvalSummary
    from hinge_cli.stages.calibrate import Recalibrated
    from hinge_cli.stages.generate import Target
    from hinge_cli.stages.train import StageSummary

PathLike = str | Path
Settings = Mapping[str, Mapping[str, Any]]
Result = TypeVar("Result")

__all__ = ["embed", "evaluate", "generate", "generate_samples", "pretrain_warmup", "tile", "train"]

# ----------------------------------------------------------------------------- messages

_FLAG_MESSAGES = contextvars.ContextVar("hinge_flag_messages", default=False)
SWITCHES = ("overwrite", "keep-going", "keep-samples", "average-views")
RENAMED = {"samples": "sheet"}  # tile's --samples CSV is `sheet` here
FUNCTIONS = {"tile": "tile", "embed": "embed", "pretrain-warmup": "pretrain_warmup", "train": "train",
             "calibrate": "calibrate", "generate": "generate", "eval": "evaluate", "view": "view"}


@contextlib.contextmanager
def flag_messages() -> Iterator[None]:
    """Within it (the command line), errors keep the core's wording in flags: --overwrite, `hinge train`."""
    token = _FLAG_MESSAGES.set(True)
    try:
        yield
    finally:
        _FLAG_MESSAGES.reset(token)


class PythonWords:
    """This module's words for the settings and commands an error names: `overwrite=True`, `n_samples=8`,
    `hinge_cli.api.train()`."""

    def setting(self, name: str, value: str | None) -> str:
        argument = RENAMED.get(name, name).replace("-", "_")
        if name in SWITCHES:
            return f"{argument}=True" + ("" if value is None else f" {value}")
        return argument if value is None else f"{argument}={value}"

    def command(self, name: str) -> str:
        return f"hinge_cli.api.{FUNCTIONS.get(name, name.replace('-', '_'))}()"


PYTHON = PythonWords()


def _python_api(fn: Callable[..., Result]) -> Callable[..., Result]:
    """Errors raised inside speak this module's argument names, unless the command line is the caller."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Result:
        try:
            return fn(*args, **kwargs)
        except HingeError as exc:
            if _FLAG_MESSAGES.get():
                raise
            raise HingeError(worded(exc.problem, PYTHON), worded(exc.fix, PYTHON) if exc.fix else None) from None

    return wrapper


# ----------------------------------------------------------------------------- shared steps


def run_configured(run: Run, config: str | Path | None, overrides: Settings | None,
                   stage: Callable[[HingeConfig], Result]) -> Result:
    """Resolve the config (preset < hinge.yaml < overrides), run the stage, and record the config only once it
    succeeded and made something (a re-run that skipped every sample did not use its settings), or where no hinge.yaml
    was recorded at all (the first run was killed before it)."""
    cfg = run.config(config, {section: dict(values) for section, values in (overrides or {}).items()}, record=False)
    run.settings = cfg  # recorded with the stage's first `ok`, before it
    result = stage(cfg)
    if not isinstance(result, SampleReport) or result.done or not run.config_path.exists():  # a kill may have come before it
        run.record_config(cfg)
    return result


def _listed(values: PathLike | Sequence[Any] | None) -> list[Any]:
    """One value or several: a lone path or string is not a sequence of characters here."""
    return [values] if isinstance(values, (str, Path)) else list(values or [])


def _absolute(path: PathLike | None) -> str | None:
    """A path as hinge.yaml records it: absolute, so later stages find it from any directory."""
    return str(Path(path).resolve()) if path is not None else None


def warmup_paths(warmup: Mapping[str, Any]) -> dict[str, Any]:
    """The warm-up section with its file settings made absolute (backbone cellfm:CKPT or FILE, vocab, genes, corpus)."""
    out = dict(warmup)
    backbone = out.get("backbone")
    if backbone is not None and backbone != "random":
        out["backbone"] = ("cellfm:" + str(_absolute(backbone[len("cellfm:"):])) if backbone.startswith("cellfm:")
                           else _absolute(backbone))
    for key in ("vocab", "genes"):
        out[key] = _absolute(out.get(key))
    if out.get("corpus"):
        from hinge_cli.data.corpus import corpus_files

        out["corpus"] = [_absolute(f) for f in corpus_files(out["corpus"])]
    return out


def targets(run: Run, slides: Sequence[PathLike] = (), sample_ids: Sequence[str] = (), spots: PathLike | None = None,
            mpp: float | None = None, visium: PathLike | None = None, image: str = "hires", visium_hd: PathLike | None = None,
            bin_um: int = 16) -> list[Target]:
    """What to predict: new slides, a Space Ranger folder, the `bin_um` bins of a Visium HD one, or samples already tiled
    in the run."""
    from hinge_cli.stages.generate import Target

    slides, sample_ids = [Path(s) for s in _listed(slides)], _listed(sample_ids)
    if visium_hd is not None:
        if visium is not None or slides or spots is not None or mpp is not None or len(sample_ids) > 1:
            raise HingeError(f"{setting('visium-hd')} names the slide, its bins and µm/px",
                             f"drop the slides, {setting('visium')}, {setting('spots')} and {setting('mpp')} (one {setting('sample-id')} at most)")
        from hinge_cli.data.bins import HDBins, visium_hd_bins

        spec = visium_hd_bins(run, Path(visium_hd), image, bin_um, sample_ids[0] if sample_ids else None)
        return [Target(spec.sample_id, spec.slide, spec.spots, spec.mpp, HDBins(Path(visium_hd).resolve(), bin_um))]
    if visium is not None:
        if slides or spots is not None or mpp is not None or len(sample_ids) > 1:
            raise HingeError("--visium names the slide, its spots and µm/px", "drop the slides, --spots and --mpp (one --sample-id at most)")
        from hinge_cli.data.sources import visium_sample

        spec = visium_sample(run, Path(visium), image, sample_ids[0] if sample_ids else None)
        return [Target(spec.sample_id, spec.slide, spec.spots, spec.mpp)]
    if slides:
        if len(slides) > 1 and (spots is not None or sample_ids):
            raise HingeError("--spots and --sample-id apply to one slide", "predict one slide per call, or drop them")
        if len(sample_ids) > 1:
            raise HingeError("one slide takes one --sample-id", "give a single id, or run once per slide")
        return [Target(sample_ids[0] if sample_ids else s.stem, s, None if spots is None else Path(spots), mpp) for s in slides]
    if sample_ids:
        if spots is not None or mpp is not None:
            raise HingeError("--spots and --mpp need a slide", "give the slide, or drop them to predict the tiled samples")
        return [Target(i) for i in sample_ids]
    raise HingeError("nothing to predict", "give a slide, --visium OUTS, or --sample-id ID of a sample already in the run")


# ----------------------------------------------------------------------------- stages


@_python_api
def tile(slides: Sequence[PathLike] = (), *, run: PathLike | None = None, spots: PathLike | None = None,
         sample_id: str | None = None, mpp: float | None = None, sheet: PathLike | None = None, visium: PathLike | None = None,
         image: str = "hires", hest: PathLike | None = None, ids: Sequence[str] = (), layer: str | None = None,
         visium_hd: PathLike | None = None, bin_um: int = 8, pool_um: float = 55.0,
         config: str | Path | None = None, settings: Settings | None = None, shard: Shard = Shard(),
         overwrite: bool = False, keep_going: bool = False, progress: Progress = SILENT) -> SampleReport:
    """Detect tissue and cut patches at a fixed µm/px into `<run>/tiles/<sample>.h5`: one per spot, or a grid.

    Samples come from `slides` (with `spots`, `sample_id`, `mpp` for one slide), a `sheet` CSV
    (sample_id, slide[, spots, mpp, layer]), a Space Ranger `visium` outs/ folder, a Visium HD outs/ folder
    `visium_hd` (its `bin_um` bins pooled into `pool_um` pseudo-spots), or a HEST-1k folder `hest` (all samples, or
    `ids`). `settings["tile"]` overrides tiling (target_mpp,
    patch_px, grid, ...). Returns what was done, skipped and (with keep_going) failed.
    """
    from hinge_cli.data.sources import sample_specs
    from hinge_cli.stages.tile import tile_samples

    the_run = Run(run)
    if visium_hd is not None:  # pseudo-spots are pool_um squares pool_um apart: the run's spot size and lattice
        tiling = {**(settings or {}).get("tile", {})}
        tiling.update({key: pool_um for key in ("spot_um", "pitch_um") if tiling.get(key) is None})
        settings = {**(settings or {}), "tile": tiling}
    specs = sample_specs(the_run, slides=[Path(s) for s in _listed(slides)], spots=None if spots is None else Path(spots),
                         sample_id=sample_id, mpp=mpp, sheet=None if sheet is None else Path(sheet),
                         visium=None if visium is None else Path(visium), image=image,
                         hest=None if hest is None else Path(hest), ids=_listed(ids), layer=layer,
                         visium_hd=None if visium_hd is None else Path(visium_hd), bin_um=bin_um, pool_um=pool_um)
    return run_configured(the_run, config, settings, lambda cfg: tile_samples(
        the_run, specs, cfg.tile, shard=shard, overwrite=overwrite, keep_going=keep_going, progress=progress))


@_python_api
def embed(run: PathLike | None = None, *, weights: Sequence[str] = (), import_features: PathLike | None = None,
          patch_size_level0: float | None = None, config: str | Path | None = None, settings: Settings | None = None,
          shard: Shard = Shard(), overwrite: bool = False, keep_going: bool = False, progress: Progress = SILENT) -> SampleReport:
    """Turn every tiled sample into one feature vector per spot: `<run>/embeddings/<encoder>/<sample>.h5`.

    `settings["embed"]` chooses the encoder(s) ("uni,conch"), views, batch_size, device. `weights`
    are FILE or NAME=FILE for learned encoders (default: the Hugging Face cache). With
    `import_features` (TRIDENT/HEST .h5 files, or their folder), the features are taken from
    there instead; settings["embed"]["encoder"] names the model that made them.
    """
    from hinge_cli.stages.embed import embed_samples, import_samples

    the_run = Run(run)
    encoder = (settings or {}).get("embed", {}).get("encoder")
    if import_features is not None and (encoder is None or "," in encoder):
        raise HingeError("--import-features needs the one encoder that made the features", "add e.g. --encoder uni")

    def stage(cfg: HingeConfig) -> SampleReport:
        if import_features is not None:
            return import_samples(the_run, Path(import_features), cfg.embed.encoder, patch_size_level0, shard=shard,
                                  overwrite=overwrite, keep_going=keep_going, progress=progress)
        return embed_samples(the_run, cfg.embed, _listed(weights), shard=shard, overwrite=overwrite, keep_going=keep_going,
                             progress=progress)

    return run_configured(the_run, config, settings, stage)


@_python_api
def pretrain_warmup(run: PathLike | None = None, *, config: str | Path | None = None, settings: Settings | None = None,
                    overwrite: bool = False, progress: Progress = SILENT) -> StageSummary:
    """Choose the gene panel, get a backbone and run the warm-start curriculum: `<run>/checkpoints/warmup.*`.

    `settings["warmup"]` holds the choices of `hinge pretrain-warmup`: holdout, genes (a file) or
    n_genes and select, backbone (random | cellfm:CKPT | FILE), vocab, corpus (files or globs),
    val_fraction or val_samples, epochs, mask_ratio; `settings["train"]` seed, batch_size, lr, device.
    File paths are recorded absolute.
    """
    from hinge_cli.stages.train import pretrain_warmup as stage

    the_run = Run(run)
    overrides = dict(settings or {})
    overrides["warmup"] = warmup_paths(overrides.get("warmup", {}))
    return run_configured(the_run, config, overrides, lambda cfg: stage(the_run, cfg, overwrite=overwrite, progress=progress))


@_python_api
def train(run: PathLike | None = None, *, config: str | Path | None = None, settings: Settings | None = None,
          warmup: bool = True, overwrite: bool = False, progress: Progress = SILENT) -> StageSummary:
    """Train the generator: `<run>/checkpoints/best.*` and `last.*`, resuming from `last` after an interruption.

    With `warmup` (the default) the warm-up runs first unless its checkpoint exists (or
    `overwrite`), so one call goes from embeddings to a trained model; `warmup=False` needs an
    earlier `pretrain_warmup`. `settings["train"]` sets epochs, batch_size, lr, patience, device.
    """
    from hinge_cli.stages.train import train as stage

    the_run = Run(run)
    if warmup and (overwrite or not the_run.checkpoint("warmup").exists()):
        pretrain_warmup(the_run.root, config=config, settings=settings, overwrite=overwrite, progress=progress)
        config = None  # the warm-up recorded it in hinge.yaml
    return run_configured(the_run, config, settings, lambda cfg: stage(the_run, cfg, overwrite=overwrite, progress=progress))


@_python_api
def calibrate(run: PathLike | None = None, *, settings: Settings | None = None, progress: Progress = SILENT) -> Recalibrated:
    """Fit the spread scale and gene coupling of the run's trained models again with `settings["generate"]`.

    What `train` does after its loop, for a model trained by an older hinge or to calibrate another
    sampler; the weights are untouched. `.models` lists the checkpoints whose cards were updated.
    """
    from hinge_cli.stages.calibrate import recalibrate

    the_run = Run(run)
    return run_configured(the_run, None, settings, lambda cfg: recalibrate(the_run, cfg))


@_python_api
def generate_samples(slides: Sequence[PathLike] = (), *, sample_ids: Sequence[str] = (), spots: PathLike | None = None,
                     mpp: float | None = None, visium: PathLike | None = None, image: str = "hires",
                     visium_hd: PathLike | None = None, bin_um: int = 16,
                     run: PathLike | None = None, checkpoint: PathLike | None = None, out: PathLike | None = None,
                     weights: Sequence[str] = (), genes_to_plot: Sequence[str] = (), settings: Settings | None = None,
                     shard: Shard = Shard(), overwrite: bool = False, keep_going: bool = False, model: str = "hinge",
                     given: PathLike | None = None, given_genes: PathLike | None = None, given_layer: str | None = None,
                     progress: Progress = SILENT) -> SampleReport:
    """Predict several slides or samples, one .h5ad each (`out`: a folder, default the run's predictions/).

    The form `hinge generate` uses: sharding over array jobs, and with keep_going a failed
    slide is recorded and the others go on. `model="ridge"`: the baseline `train` fitted,
    to `<sample>.ridge.h5ad`. `given`: an .h5ad of genes measured on the (one) slide's spots, held fixed while
    the rest of the panel is generated (optionally only the genes listed in `given_genes`, counts from `given_layer`).
    `visium_hd`: a Visium HD outs/ folder, predicted at each in-tissue bin of `bin_um` µm (Space Ranger's barcodes).
    Returns what was done, skipped and failed.
    """
    the_run = Run(run)
    return _generate(the_run, targets(the_run, slides, sample_ids, spots, mpp, visium, image, visium_hd, bin_um), checkpoint, out, weights,
                     genes_to_plot, settings, shard, overwrite, keep_going, model, given, given_genes, given_layer, progress)


def _generate(the_run: Run, wanted: list[Target], checkpoint: PathLike | None, out: PathLike | None, weights: Sequence[str],
              genes_to_plot: Sequence[str], settings: Settings | None, shard: Shard, overwrite: bool, keep_going: bool,
              model: str, given: PathLike | None, given_genes: PathLike | None, given_layer: str | None,
              progress: Progress) -> SampleReport:
    from hinge_cli.predict.given import GivenSource
    from hinge_cli.stages.generate import generate as stage

    return run_configured(the_run, None, settings, lambda cfg: stage(
        the_run, wanted, cfg.generate, checkpoint=None if checkpoint is None else Path(checkpoint), weights=_listed(weights),
        genes_to_plot=_listed(genes_to_plot), out=None if out is None else Path(out), shard=shard, overwrite=overwrite,
        keep_going=keep_going, model=model, progress=progress,
        given=None if given is None else GivenSource(Path(given), None if given_genes is None else Path(given_genes), given_layer)))


@_python_api
def generate(slide: PathLike | None = None, *, sample_id: str | None = None, spots: PathLike | None = None,
             mpp: float | None = None, visium: PathLike | None = None, image: str = "hires",
             visium_hd: PathLike | None = None, bin_um: int = 16, run: PathLike | None = None,
             checkpoint: PathLike | None = None, out: PathLike | None = None, weights: Sequence[str] = (),
             genes_to_plot: Sequence[str] = (), settings: Settings | None = None, overwrite: bool = False,
             model: str = "hinge", given: PathLike | None = None, given_genes: PathLike | None = None,
             given_layer: str | None = None, progress: Progress = SILENT) -> AnnData:
    """Predict one slide (or a sample already in the run) and return the AnnData of predicted expression.

    X is the point prediction in the model's space (`settings["generate"]["point"]`: the one-shot mean by default, or
    the mean over samples), layers["std"] the predictive spread; obsm["spatial"]
    and uns["spatial"] make it plottable with scanpy. The slide is tiled and embedded as the
    checkpoint (default: the run's best) was trained. The prediction is also written, as the
    command writes it: to `out` if given, else `<run>/predictions/<sample>.h5ad` (the run keeps
    every prediction with its provenance). `settings["generate"]` sets n_samples, steps, seed,
    batch_size, device, keep_samples. `model="ridge"` predicts with the closed-form baseline `train`
    fitted on the same spots instead (its mean and a per-gene Gaussian; default file `<sample>.ridge.h5ad`).
    `given`: measured genes of this slide held fixed, the rest generated (var["given"], obs["n_given"] mark them).
    `visium_hd`: a Visium HD outs/ folder, predicted at each in-tissue bin of `bin_um` µm: obs_names are Space Ranger's
    barcodes, obsm["spatial"] full-resolution pixels and uns["spatial"] the bin size's scale factors.
    """
    import anndata

    the_run = Run(run)
    (target,) = targets(the_run, [] if slide is None else [slide], [] if sample_id is None else [sample_id], spots, mpp,
                        visium, image, visium_hd, bin_um)
    report = _generate(the_run, [target], checkpoint, out, weights, genes_to_plot, settings, Shard(), overwrite, False, model,
                       given, given_genes, given_layer, progress)
    return anndata.read_h5ad(report.outputs[target.sample_id])


@_python_api
def evaluate(pred: PathLike | Sequence[PathLike], truth: PathLike | Sequence[PathLike], *, out: PathLike | None = None,
             run: PathLike | None = None, genes: PathLike | None = None, genes_to_plot: Sequence[str] = (),
             layer: str | None = None, maps: bool = True, baseline: PathLike | Sequence[PathLike] | None = None,
             overwrite: bool = False, progress: Progress = SILENT) -> EvalSummary:
    """Score predictions against measured counts (pairs in order): metrics.json, report.md and maps/ per slide.

    Returns the typed result: `.slides[i].metrics` is a `SlideMetrics` (e.g.
    `.correlation.depth_partial.pearson.mean`, the headline). Outputs go to `out`, else
    `<run>/eval/<sample>/` with a `run`, else ./hinge-eval. `layer` names the truth files' layer of
    raw counts (default: X, else scanpy's layers['counts']); `maps=False` skips the pictures. `baseline`: one
    prediction per `pred` scored on the same spots and genes and reported side by side (default: the ridge
    prediction `<name>.ridge.h5ad` beside `<name>.h5ad` where `generate(model="ridge")` wrote one).
    """
    from hinge_cli.eval import evaluate as stage

    return stage([Path(p) for p in _listed(pred)], [Path(t) for t in _listed(truth)], out=None if out is None else Path(out), run=None if run is None else Run(run),
                 genes=None if genes is None else Path(genes), genes_to_plot=_listed(genes_to_plot), overwrite=overwrite,
                 progress=progress, layer=layer, maps=maps,
                 baselines=None if not baseline else [Path(b) for b in _listed(baseline)])


def view(pred: PathLike, *, truth: PathLike | None = None, out: PathLike | None = None, layer: str | None = None,
         overwrite: bool = False) -> Path:
    """Write one self-contained HTML page showing `pred` over its tissue (with `truth`: the measured values and the
    error too); `out` defaults to the prediction's name with .html. Returns the page's path."""
    from hinge_cli.eval.viewer import build_view, write_view

    target = Path(out) if out is not None else Path(pred).with_suffix(".html")
    if target.exists() and not overwrite:  # before reading anything: nothing to do
        raise HingeError(f"{target} exists", "pass --overwrite to replace it, or choose another --out")
    return write_view(target, build_view(Path(pred), None if truth is None else Path(truth), layer), overwrite=overwrite)
