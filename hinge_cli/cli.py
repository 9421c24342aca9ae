"""The `hinge` command line: one small function per subcommand, no logic of its own."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hinge_cli import __version__
from hinge_cli.config import EmbedConfig, GenerateConfig, HingeConfig, TileConfig, TissueConfig, TrainConfig, WarmupConfig, field_default
from hinge_cli.errors import HingeError
from hinge_cli.files import user_os_error
from hinge_cli.run import Run, SampleReport, Shard
from hinge_cli.terminal import RichProgress, err, say, setup_output, verbosity

app = typer.Typer(
    name="hinge",
    help="Predict spatial gene expression from H&E histology (HINGE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def default(section: type, name: str, none: str = "none") -> str:
    """'(default: X)' from the config dataclass, so help cannot drift from the code (Rich would swallow '[X]')."""
    value = field_default(section, name)
    return f"(default: {none if value is None else value})"


def setting(section: type, name: str, text: str, none: str = "none") -> Any:
    """A flag that overrides config `section.name`: unset, it keeps the run's value; its help shows the default."""
    hint = typing.get_type_hints(section)[name]
    value_type = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
    return Annotated[Optional[value_type], typer.Option(help=f"{text} {default(section, name, none)}.")]


def finish(summary: Any) -> None:
    """Print a stage's closing lines; a per-sample stage with failures (under --keep-going) exits 3."""
    failed = bool(getattr(summary, "failed", None))
    for line in summary.lines():
        err.print(line, highlight=False, soft_wrap=True) if failed else say(line)
    if failed:
        raise typer.Exit(3)


def run_stage(run: Run, preset: str | None, overrides: dict[str, Any], stage: Callable[[HingeConfig], Any]) -> None:
    """Resolve the config (preset < hinge.yaml < flags), run the stage, and record the flags only once it succeeded."""
    cfg = run.config(preset, overrides, record=False)
    summary = stage(cfg)
    run.record_config(cfg)
    finish(summary)


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More detail, and tracebacks for errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")]
RunDir = Annotated[Optional[Path], typer.Option("--run", help="Run directory (default: $HINGE_RUN or ./hinge-run).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo outputs that already exist.")]
ConfigOpt = Annotated[
    Optional[str], typer.Option("--config", help="tiny|small|default or a .yaml file (default: the run's, else default).")
]
ShardOpt = Annotated[
    Optional[str], typer.Option("--shard", help="I/N: do every N-th sample from the I-th (0-based) (default: SLURM array).")
]


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register a subcommand whose user errors print as one line and exit 2; it also takes -v/-q, like every command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_output(kwargs.pop("verbose", False), kwargs.pop("quiet", False))
        try:
            return fn(*args, **kwargs)
        except (HingeError, OSError) as exc:
            user = exc if isinstance(exc, HingeError) else user_os_error(exc)
            if user is None:
                raise
            if verbosity["verbose"]:
                err.print(traceback.format_exc(), markup=False)
            err.print(f"[bold red]error:[/] {user}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished outputs are kept; run the same command again to resume")
            raise typer.Exit(130) from None

    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=hint)
              for name, hint in (("verbose", Verbose), ("quiet", Quiet))]
    signature = inspect.signature(fn, eval_str=True)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *shared])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**fn.__annotations__, "verbose": Verbose, "quiet": Quiet}
    return app.command(context_settings={"help_option_names": ["-h", "--help"]})(wrapper)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hinge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Verbose = False,
    quiet: Quiet = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    setup_output(verbose, quiet, fresh=True)


@command
def tile(
    slides: Annotated[Optional[list[Path]], typer.Argument(help="Slide files (OpenSlide formats, or JPEG/PNG/TIFF).")] = None,
    run: RunDir = None,
    spots: Annotated[Optional[Path], typer.Option(help="Spot .h5ad (obsm['spatial'] in level-0 px): one patch per spot.")] = None,
    sample_id: Annotated[Optional[str], typer.Option(help="Sample id (default: the slide's file stem).")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="µm/px of level 0 when the slide does not say.")] = None,
    samples: Annotated[Optional[Path], typer.Option(help="CSV with columns sample_id, slide[, spots, mpp, layer].")] = None,
    visium: Annotated[Optional[Path], typer.Option(help="A Space Ranger outs/ folder: its spots, counts and scale factors.")] = None,
    image: Annotated[str, typer.Option(help="With --visium: the full-resolution image file, or hires|lowres from outs/spatial.")] = "hires",
    hest: Annotated[Optional[Path], typer.Option(help="A HEST-1k folder (wsis/, st/, metadata/): every sample, or --ids.")] = None,
    ids: Annotated[Optional[str], typer.Option(help="With --hest: the sample ids to tile, comma-separated.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="The spot files' layer with raw counts (default: X, else layers['counts']).")] = None,
    config: ConfigOpt = None,
    target_mpp: setting(TileConfig, "target_mpp", "µm/px of the patches") = None,
    patch_px: setting(TileConfig, "patch_px", "Patch side in pixels") = None,
    grid: setting(TileConfig, "grid", "Lattice without spots: hex|square") = None,
    spot_um: setting(TileConfig, "spot_um", "Grid spot diameter in µm") = None,
    pitch_um: setting(TileConfig, "pitch_um", "Grid centre-to-centre spacing in µm") = None,
    min_tissue: setting(TileConfig, "min_tissue", "Grid spots keep this tissue fraction") = None,
    tissue_threshold: setting(TissueConfig, "threshold", "Saturation cut-off 0-1 for tissue", none="Otsu") = None,
    no_images: Annotated[bool, typer.Option("--no-images", help="Store coordinates only, no pixels.")] = False,
    workers: setting(TileConfig, "workers", "Parallel patch readers") = None,
    shard: ShardOpt = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Record failed slides and go on (exit 3).")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Detect tissue and cut patches at a fixed µm/px: one per spot, or on a grid over the tissue."""
    from hinge_cli.data.sources import sample_specs
    from hinge_cli.tile import tile_samples

    the_run = Run(run)
    specs = sample_specs(the_run, slides=slides or (), spots=spots, sample_id=sample_id, mpp=mpp, sheet=samples, visium=visium,
                         image=image, hest=hest, ids=_ids(ids), layer=layer)
    overrides = {
        "tile": {
            "target_mpp": target_mpp, "patch_px": patch_px, "grid": grid, "spot_um": spot_um, "pitch_um": pitch_um,
            "min_tissue": min_tissue, "workers": workers, "images": False if no_images else None,
            "tissue": {"threshold": tissue_threshold},
        }
    }
    run_stage(the_run, config, overrides, lambda cfg: tile_samples(
        the_run, specs, cfg.tile, shard=Shard.parse(shard), overwrite=overwrite, keep_going=keep_going, progress=RichProgress()))


@command
def embed(
    run: RunDir = None,
    encoder: setting(EmbedConfig, "encoder", "NAME,NAME...: features concatenated in that order") = None,
    weights: Annotated[
        Optional[list[str]], typer.Option(help="FILE, or NAME=FILE per learned encoder (default: the Hugging Face cache).")
    ] = None,
    views: setting(EmbedConfig, "views", "1, or 8 dihedral views (test-time augmentation)") = None,
    average_views: Annotated[
        bool, typer.Option("--average-views", help="With --views 8: store the mean (N, D), not every view (N, 8, D).")
    ] = False,
    batch_size: setting(EmbedConfig, "batch_size", "Patches per forward pass") = None,
    device: setting(EmbedConfig, "device", "auto|cpu|cuda") = None,
    workers: setting(EmbedConfig, "workers", "Background patch readers") = None,
    config: ConfigOpt = None,
    list_encoders: Annotated[bool, typer.Option("--list", help="List encoders, dimensions and whether weights were found.")] = False,
    import_features: Annotated[Optional[Path], typer.Option(help="TRIDENT/HEST feature .h5 files (a folder of <sample>.h5) to use instead of embedding; --encoder names their model.")] = None,
    patch_size_level0: Annotated[Optional[float], typer.Option(help="With --import-features: patch side in level-0 px when the files do not say.")] = None,
    shard: ShardOpt = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Record failed samples and go on (exit 3).")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Turn every tiled sample into one feature vector per spot (pathology encoders)."""
    from hinge_cli.embed import embed_samples, import_samples
    from hinge_cli.encoders import REGISTRY, locate_weights
    from hinge_cli.encoders.embedding import parse_weights

    if list_encoders:
        given = parse_weights(weights or [], list(REGISTRY.values())) if weights else {}
        for spec in REGISTRY.values():
            found = "no weights needed" if not spec.needs_weights else str(locate_weights(spec, given.get(spec.name)) or "weights not found")
            typer.echo(f"{spec.name:12} {spec.dim:5d}  {spec.description}  [{found}]")
        return
    overrides = {
        "embed": {
            "encoder": encoder, "views": views, "average_views": True if average_views else None,
            "batch_size": batch_size, "device": device, "workers": workers,
        }
    }
    if import_features is not None and (encoder is None or "," in encoder):
        raise HingeError("--import-features needs the one encoder that made the features", "add e.g. --encoder uni")
    the_run = Run(run)

    def stage(cfg: HingeConfig) -> SampleReport:
        if import_features is not None:
            return import_samples(the_run, import_features, cfg.embed.encoder, patch_size_level0, shard=Shard.parse(shard),
                                  overwrite=overwrite, keep_going=keep_going, progress=RichProgress())
        return embed_samples(the_run, cfg.embed, weights or [], shard=Shard.parse(shard), overwrite=overwrite,
                             keep_going=keep_going, progress=RichProgress())

    run_stage(the_run, config, overrides, stage)


def _ids(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _corpus_files(values: list[str]) -> list[Path]:
    """--corpus takes files, quoted globs, or .txt lists of files (one per line)."""
    import glob

    files: list[Path] = []
    for value in values:
        if value.endswith(".txt") and Path(value).is_file():
            files += [Path(line.strip()) for line in Path(value).read_text().splitlines() if line.strip()]
        elif any(ch in value for ch in "*?["):
            matches = sorted(glob.glob(value))
            if not matches:
                raise HingeError(f"--corpus pattern {value} matches no file", "check the pattern (quote it so the shell leaves it alone)")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(value))
    return files


def _resolved(path: Path | None) -> str | None:
    """A path as hinge.yaml records it: absolute, so later commands find it from any directory."""
    return str(path.resolve()) if path is not None else None


def _backbone_spec(value: str | None) -> str | None:
    """random, or cellfm:CKPT / FILE with the file's path resolved."""
    if value is None or value == "random":
        return value
    return "cellfm:" + _resolved(Path(value[len("cellfm:"):])) if value.startswith("cellfm:") else _resolved(Path(value))


@command
def pretrain_warmup(
    run: RunDir = None,
    config: ConfigOpt = None,
    backbone: setting(WarmupConfig, "backbone", "random | cellfm:CKPT | FILE.safetensors (an earlier pre-training)") = None,
    vocab: Annotated[Optional[Path], typer.Option(help="CellFM gene list (CSV, symbol first) for cellfm:CKPT.")] = None,
    corpus: Annotated[Optional[list[str]], typer.Option(help="Expression-only .h5ad to pre-train the backbone on; repeat, quote a glob, or give a .txt list.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="The corpus files' layer with raw counts (default: X, else layers['counts']).")] = None,
    holdout: Annotated[Optional[str], typer.Option(help="Sample ids kept out of training, comma-separated.")] = None,
    genes: Annotated[Optional[Path], typer.Option(help="Gene panel file, one symbol per line.")] = None,
    n_genes: setting(WarmupConfig, "n_genes", "Panel size when choosing genes") = None,
    select: setting(WarmupConfig, "select", "Panel selection: hvg | hmhvg") = None,
    normalize: setting(WarmupConfig, "normalize", "none: log2(counts+1); total: library-size normalise first") = None,
    fill_missing: setting(WarmupConfig, "fill_missing", "none: a panel gene missing in a sample is an error; zero: treat as 0") = None,
    val_fraction: setting(WarmupConfig, "val_fraction", "Fraction of spots for validation") = None,
    val_samples: Annotated[Optional[str], typer.Option(help="Whole samples for validation instead, comma-separated.")] = None,
    warmup_epochs: setting(WarmupConfig, "epochs", "Warm-start curriculum epochs") = None,
    warmup_mask_ratio: setting(WarmupConfig, "mask_ratio", "Curriculum cap on the hidden fraction") = None,
    seed: setting(TrainConfig, "seed", "Seed of every random draw") = None,
    batch_size: setting(TrainConfig, "batch_size", "Spots per step") = None,
    lr: setting(TrainConfig, "lr", "Learning rate") = None,
    device: setting(TrainConfig, "device", "auto | cpu | cuda") = None,
    overwrite: Overwrite = False,
) -> None:
    """Choose the gene panel, get a backbone (CellFM, pre-training on a corpus, or random) and run the warm-start curriculum."""
    from hinge_cli.train import pretrain_warmup as stage

    warmup = {
        "backbone": _backbone_spec(backbone), "vocab": _resolved(vocab), "corpus": [_resolved(f) for f in _corpus_files(corpus)] if corpus else None,
        "corpus_layer": layer,
        "holdout": _ids(holdout) if holdout is not None else None, "genes": _resolved(genes), "n_genes": n_genes,
        "select": select, "normalize": normalize, "fill_missing": fill_missing, "val_fraction": val_fraction,
        "val_samples": _ids(val_samples) if val_samples is not None else None, "epochs": warmup_epochs,
        "mask_ratio": warmup_mask_ratio,
    }
    the_run = Run(run)
    overrides = {"warmup": warmup, "train": {"seed": seed, "batch_size": batch_size, "lr": lr, "device": device}}
    run_stage(the_run, config, overrides, lambda cfg: stage(the_run, cfg, overwrite=overwrite, progress=RichProgress()))


@command
def train(
    run: RunDir = None,
    config: ConfigOpt = None,
    epochs: setting(TrainConfig, "epochs", "Epochs") = None,
    batch_size: setting(TrainConfig, "batch_size", "Spots per step (the global batch under torchrun)") = None,
    lr: setting(TrainConfig, "lr", "Peak learning rate") = None,
    patience: setting(TrainConfig, "patience", "Early stopping: epochs without a better validation loss") = None,
    device: setting(TrainConfig, "device", "auto | cpu | cuda") = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again from the warm-up instead of resuming.")] = False,
) -> None:
    """Train on all timesteps from the warm-up; resumes from checkpoints/last after an interruption."""
    from hinge_cli.train import train as stage

    the_run = Run(run)
    overrides = {"train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience, "device": device}}
    run_stage(the_run, config, overrides, lambda cfg: stage(the_run, cfg, overwrite=overwrite, progress=RichProgress()))


@command
def eval(  # noqa: A001 - the subcommand is called eval
    pred: Annotated[list[Path], typer.Option("--pred", help="Prediction .h5ad from `hinge generate`; repeat for several slides.")],
    truth: Annotated[list[Path], typer.Option("--truth", help="Measured counts .h5ad, one per --pred, in the same order.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder [<run>/eval/<sample> with --run, else ./hinge-eval].")] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="Run directory: outputs go to <run>/eval/<sample> [$HINGE_RUN].")] = None,
    genes: Annotated[Optional[Path], typer.Option(help="Evaluate only these genes (file, one symbol per line).")] = None,
    genes_to_plot: Annotated[Optional[str], typer.Option(help="Also draw maps of these genes, comma-separated.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="The truth files' layer with raw counts (default: X, else layers['counts']).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Score predictions against measured expression: metrics.json, report.md and maps."""
    from hinge_cli.eval import evaluate

    the_run = Run(run) if run is not None or os.environ.get("HINGE_RUN") else None
    summary = evaluate(pred, truth, out=out, run=the_run, genes=genes, genes_to_plot=_ids(genes_to_plot),
                       overwrite=overwrite, progress=RichProgress(), layer=layer)
    finish(summary)


@command
def generate(
    slide: Annotated[Optional[list[Path]], typer.Option(help="New slide(s) to predict; tiled and embedded as the model was trained.")] = None,
    sample_id: Annotated[
        Optional[list[str]], typer.Option(help="Samples already in the run (repeat or comma-separate); with one --slide, its id.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Output .h5ad (one sample) or folder (<sample>.h5ad each); default: the run's predictions/.")
    ] = None,
    run: RunDir = None,
    spots: Annotated[Optional[Path], typer.Option(help="Spot .h5ad for the slide: predict at its spots, not on a grid.")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="µm/px of level 0 when the slide does not say.")] = None,
    visium: Annotated[Optional[Path], typer.Option(help="A Space Ranger outs/ folder: predict at its spots.")] = None,
    image: Annotated[str, typer.Option(help="With --visium: the full-resolution image file, or hires|lowres from outs/spatial.")] = "hires",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Model to use; default: the run's checkpoints/best.safetensors.")] = None,
    samples: setting(GenerateConfig, "n_samples", "Samples per spot; X is their mean, layers['std'] their spread") = None,
    steps: setting(GenerateConfig, "steps", "Reverse-process steps", none="the trained T") = None,
    seed: setting(GenerateConfig, "seed", "Seed: the same seed gives the same predictions") = None,
    plot: Annotated[Optional[str], typer.Option(help="GENE,...: a PNG per gene beside the output (H&E, mean, std).")] = None,
    keep_samples: Annotated[bool, typer.Option("--keep-samples", help="Also store every sample in obsm['samples'] (N, S, G).")] = False,
    batch_size: setting(GenerateConfig, "batch_size", "Spots per batch of the reverse process") = None,
    device: setting(GenerateConfig, "device", "auto | cpu | cuda (bf16 autocast on CUDA)") = None,
    weights: Annotated[
        Optional[list[str]], typer.Option(help="FILE, or NAME=FILE, for the checkpoint's learned encoder; default: the Hugging Face cache.")
    ] = None,
    shard: ShardOpt = None,
    overwrite: Overwrite = False,
) -> None:
    """Predict spot expression for new slides (or tiled samples) and write AnnData files scanpy can plot."""
    from hinge_cli.generate import Target
    from hinge_cli.generate import generate as stage

    the_run = Run(run)
    ids = [i for value in sample_id or [] for i in _ids(value)]
    if visium is not None:
        if slide or spots is not None or mpp is not None or len(ids) > 1:
            raise HingeError("--visium names the slide, its spots and µm/px", "drop --slide, --spots and --mpp (one --sample-id at most)")
        from hinge_cli.data.sources import visium_sample

        spec = visium_sample(the_run, visium, image, ids[0] if ids else None)
        targets = [Target(spec.sample_id, spec.slide, spec.spots, spec.mpp)]
    elif slide:
        if len(slide) > 1 and (spots is not None or ids):
            raise HingeError("--spots and --sample-id apply to one --slide", "predict one slide per call, or drop them")
        if len(ids) > 1:
            raise HingeError("one --slide takes one --sample-id", "give a single id, or run once per slide")
        targets = [Target(ids[0] if ids else s.stem, s, spots, mpp) for s in slide]
    elif ids:
        if spots is not None or mpp is not None:
            raise HingeError("--spots and --mpp need --slide", "give the slide, or drop them to predict the tiled samples")
        targets = [Target(i) for i in ids]
    else:
        raise HingeError("nothing to predict", "pass --slide SLIDE, --visium OUTS, or --sample-id ID of a sample already in the run")
    overrides = {"generate": {"n_samples": samples, "steps": steps, "seed": seed, "batch_size": batch_size, "device": device,
                              "keep_samples": True if keep_samples else None}}
    run_stage(the_run, None, overrides, lambda cfg: stage(
        the_run, targets, cfg.generate, checkpoint=checkpoint, weights=weights or [], genes_to_plot=_ids(plot), out=out,
        shard=Shard.parse(shard), overwrite=overwrite, progress=RichProgress()))


def main() -> None:
    try:
        app()
    except HingeError as exc:  # raised while parsing, before a command runs
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
