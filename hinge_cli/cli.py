"""The `hinge` command line: one small function per subcommand, no logic of its own."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hinge_cli import __version__
from hinge_cli.errors import HingeError

app = typer.Typer(
    name="hinge",
    help="Predict spatial gene expression from H&E histology (HINGE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True)
_state = {"verbose": False, "quiet": False}


class RichProgress:
    """Rich bars for the core's loops, all in one live display; silent under -q."""

    def __init__(self) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        self._bars = Progress(*columns, console=err)
        self._open = 0

    @contextlib.contextmanager
    def task(self, label: str, total: int | None) -> Iterator[Callable[..., None]]:
        if _state["quiet"]:
            yield lambda n=1, status=None: None
            return
        if self._open == 0:
            self._bars.start()
        self._open += 1
        task_id = self._bars.add_task(label, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            self._bars.update(task_id, advance=n, **({"status": status} if status is not None else {}))

        try:
            yield advance
        finally:
            self._open -= 1
            if self._open == 0:
                self._bars.stop()
                for done in list(self._bars.task_ids):
                    self._bars.remove_task(done)


def say(line: str) -> None:
    """A result line for the user (summaries); silent under -q and on torchrun's other ranks."""
    if not _state["quiet"]:
        err.print(line, highlight=False, soft_wrap=True)


def _setup(verbose: bool, quiet: bool, fresh: bool = False) -> None:
    """-v/-q may come before the subcommand (fresh: the app callback, first) or after it."""
    _state["verbose"] = verbose or (not fresh and _state["verbose"])
    _state["quiet"] = quiet or (not fresh and _state["quiet"]) or int(os.environ.get("RANK", "0")) > 0  # torchrun: rank 0 speaks
    level = logging.DEBUG if _state["verbose"] else logging.WARNING if _state["quiet"] else logging.INFO
    root = logging.getLogger("hinge_cli")
    root.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, markup=False)]
    root.setLevel(level)
    root.propagate = False


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
    """Register a subcommand whose user errors print as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup(kwargs.pop("verbose", False), kwargs.pop("quiet", False))
        try:
            return fn(*args, **kwargs)
        except HingeError as exc:
            if _state["verbose"]:
                err.print(traceback.format_exc(), markup=False)
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished outputs are kept; run the same command again to resume")
            raise typer.Exit(130) from None

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
    _setup(verbose, quiet, fresh=True)


@command
def tile(
    slides: Annotated[Optional[list[Path]], typer.Argument(help="Slide files (OpenSlide formats, or JPEG/PNG/TIFF).")] = None,
    run: RunDir = None,
    spots: Annotated[Optional[Path], typer.Option(help="Spot .h5ad (obsm['spatial'] in level-0 px): one patch per spot.")] = None,
    sample_id: Annotated[Optional[str], typer.Option(help="Sample id (default: the slide's file stem).")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="µm/px of level 0 when the slide does not say.")] = None,
    samples: Annotated[Optional[Path], typer.Option(help="CSV with columns sample_id, slide[, spots, mpp].")] = None,
    config: ConfigOpt = None,
    target_mpp: Annotated[Optional[float], typer.Option(help="µm/px of the patches [0.5].")] = None,
    patch_px: Annotated[Optional[int], typer.Option(help="Patch side in pixels [224].")] = None,
    grid: Annotated[Optional[str], typer.Option(help="Lattice without spots: hex|square [hex].")] = None,
    spot_um: Annotated[Optional[float], typer.Option(help="Grid spot diameter in µm [55].")] = None,
    pitch_um: Annotated[Optional[float], typer.Option(help="Grid centre-to-centre spacing in µm [100].")] = None,
    min_tissue: Annotated[Optional[float], typer.Option(help="Grid spots keep this tissue fraction [0.5].")] = None,
    tissue_threshold: Annotated[Optional[float], typer.Option(help="Saturation cut-off 0-1 for tissue [Otsu].")] = None,
    no_images: Annotated[bool, typer.Option("--no-images", help="Store coordinates only, no pixels.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Parallel patch readers [2].")] = None,
    shard: ShardOpt = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Record failed slides and go on (exit 3).")] = False,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Detect tissue and cut patches at a fixed µm/px: one per spot, or on a grid over the tissue."""
    from hinge_cli.run import Run, Shard
    from hinge_cli.tile import SampleSpec, read_sample_sheet, tile_samples

    if samples is not None:
        specs = read_sample_sheet(samples)
    elif slides:
        if len(slides) > 1 and (spots is not None or sample_id is not None):
            raise HingeError("--spots and --sample-id apply to one slide", "tile one slide per call, or use --samples sheet.csv")
        specs = [SampleSpec(sample_id or s.stem, s, spots, mpp) for s in slides]
    else:
        raise HingeError("no slide given", "pass slide files, or --samples sheet.csv")
    if mpp is not None:
        specs = [s if s.mpp is not None else s._replace(mpp=mpp) for s in specs]
    overrides = {
        "tile": {
            "target_mpp": target_mpp, "patch_px": patch_px, "grid": grid, "spot_um": spot_um, "pitch_um": pitch_um,
            "min_tissue": min_tissue, "workers": workers, "images": False if no_images else None,
            "tissue": {"threshold": tissue_threshold},
        }
    }
    the_run = Run(run)
    cfg = the_run.config(config, overrides, record=False)
    summary = tile_samples(
        the_run, specs, cfg.tile, shard=Shard.parse(shard), overwrite=overwrite, keep_going=keep_going, progress=RichProgress()
    )
    the_run.record_config(cfg)
    for line in summary.lines():
        say(line) if not summary.failed else err.print(line, highlight=False, soft_wrap=True)
    if summary.failed:
        raise typer.Exit(3)


@command
def embed(
    run: RunDir = None,
    encoder: Annotated[Optional[str], typer.Option(help="NAME,NAME...: features concatenated in that order (default: default).")] = None,
    weights: Annotated[
        Optional[list[str]], typer.Option(help="FILE, or NAME=FILE per learned encoder [Hugging Face cache].")
    ] = None,
    views: Annotated[Optional[int], typer.Option(help="1, or 8 dihedral views (test-time augmentation) [1].")] = None,
    average_views: Annotated[
        bool, typer.Option("--average-views", help="With --views 8: store the mean (N, D), not every view (N, 8, D).")
    ] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Patches per forward pass [64].")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto|cpu|cuda [auto].")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Background patch readers [2].")] = None,
    config: ConfigOpt = None,
    list_encoders: Annotated[bool, typer.Option("--list", help="List encoders, dimensions and whether weights were found.")] = False,
    shard: ShardOpt = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Record failed samples and go on (exit 3).")] = False,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Turn every tiled sample into one feature vector per spot (pathology encoders)."""
    from hinge_cli.embed import embed_samples, parse_weights
    from hinge_cli.encoders import REGISTRY, locate_weights
    from hinge_cli.run import Run, Shard

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
    the_run = Run(run)
    cfg = the_run.config(config, overrides, record=False)
    summary = embed_samples(
        the_run, cfg.embed, weights or [], shard=Shard.parse(shard), overwrite=overwrite, keep_going=keep_going,
        progress=RichProgress(),
    )
    the_run.record_config(cfg)
    for line in summary.lines():
        say(line)
    if summary.failed:
        raise typer.Exit(3)


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


@command
def pretrain_warmup(
    run: RunDir = None,
    config: ConfigOpt = None,
    backbone: Annotated[str, typer.Option(help="random | cellfm:CKPT | FILE.safetensors (an earlier pre-training).")] = "random",
    vocab: Annotated[Optional[Path], typer.Option(help="CellFM gene list (CSV, symbol first) for cellfm:CKPT.")] = None,
    corpus: Annotated[Optional[list[str]], typer.Option(help="Expression-only .h5ad to pre-train the backbone on; repeat, quote a glob, or give a .txt list.")] = None,
    holdout: Annotated[Optional[str], typer.Option(help="Sample ids kept out of training, comma-separated.")] = None,
    genes: Annotated[Optional[Path], typer.Option(help="Gene panel file, one symbol per line.")] = None,
    n_genes: Annotated[int, typer.Option(help="Panel size when choosing genes.")] = 200,
    select: Annotated[str, typer.Option(help="Panel selection: hvg | hmhvg.")] = "hvg",
    normalize: Annotated[str, typer.Option(help="none: log2(counts+1); total: library-size normalise first.")] = "none",
    fill_missing: Annotated[str, typer.Option(help="none: a panel gene missing in a sample is an error; zero: treat as 0.")] = "none",
    val_fraction: Annotated[float, typer.Option(help="Fraction of spots for validation.")] = 0.1,
    val_samples: Annotated[Optional[str], typer.Option(help="Whole samples for validation instead, comma-separated.")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(help="Warm-start curriculum epochs [config].")] = None,
    warmup_mask_ratio: Annotated[Optional[float], typer.Option(help="Curriculum cap on the hidden fraction [0.2].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of every random draw [config].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Spots per step [config].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate [config].")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")] = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Choose the gene panel, get a backbone (CellFM, pre-training on a corpus, or random) and run the warm-start curriculum."""
    from hinge_cli.run import Run
    from hinge_cli.train import WarmupOptions, pretrain_warmup as stage

    if fill_missing not in ("none", "zero"):
        raise HingeError(f"--fill-missing {fill_missing} is not none or zero", "use --fill-missing zero to fill absent genes with 0")
    the_run = Run(run)
    overrides = {"train": {"seed": seed, "batch_size": batch_size, "lr": lr, "device": device}}
    cfg = the_run.config(config, overrides, record=False)
    opts = WarmupOptions(
        backbone=backbone, vocab=vocab, corpus=_corpus_files(corpus or []), holdout=_ids(holdout), genes=genes,
        n_genes=n_genes, select=select, normalize=normalize, fill_missing=fill_missing == "zero", val_fraction=val_fraction,
        val_samples=_ids(val_samples), warmup_epochs=warmup_epochs, warmup_mask_ratio=warmup_mask_ratio, seed=seed,
    )
    summary = stage(the_run, cfg, opts, overwrite=overwrite, progress=RichProgress())
    the_run.record_config(cfg)
    for line in summary.lines():
        say(line)


@command
def train(
    run: RunDir = None,
    config: ConfigOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs [config].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Spots per step (the global batch under torchrun) [config].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate [config].")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping: epochs without a better validation loss [config].")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again from the warm-up instead of resuming.")] = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Train on all timesteps from the warm-up; resumes from checkpoints/last after an interruption."""
    from hinge_cli.run import Run
    from hinge_cli.train import train as stage

    the_run = Run(run)
    overrides = {"train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience, "device": device}}
    cfg = the_run.config(config, overrides, record=False)
    summary = stage(the_run, cfg, overwrite=overwrite, progress=RichProgress())
    the_run.record_config(cfg)
    for line in summary.lines():
        say(line)


@command
def eval(  # noqa: A001 - the subcommand is called eval
    pred: Annotated[list[Path], typer.Option("--pred", help="Prediction .h5ad from `hinge generate`; repeat for several slides.")],
    truth: Annotated[list[Path], typer.Option("--truth", help="Measured counts .h5ad, one per --pred, in the same order.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder [<run>/eval/<sample> with --run, else ./hinge-eval].")] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="Run directory: outputs go to <run>/eval/<sample> [$HINGE_RUN].")] = None,
    genes: Annotated[Optional[Path], typer.Option(help="Evaluate only these genes (file, one symbol per line).")] = None,
    genes_to_plot: Annotated[Optional[str], typer.Option(help="Also draw maps of these genes, comma-separated.")] = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Score predictions against measured expression: metrics.json, report.md and maps."""
    from hinge_cli.eval import evaluate
    from hinge_cli.run import Run

    the_run = Run(run) if run is not None or os.environ.get("HINGE_RUN") else None
    summary = evaluate(pred, truth, out=out, run=the_run, genes=genes, genes_to_plot=_ids(genes_to_plot),
                       overwrite=overwrite, progress=RichProgress())
    for line in summary.lines():
        say(line)


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
    checkpoint: Annotated[Optional[Path], typer.Option(help="Model to use; default: the run's checkpoints/best.safetensors.")] = None,
    samples: Annotated[int, typer.Option(help="Samples per spot; X is their mean, layers['std'] their spread.")] = 8,
    steps: Annotated[Optional[int], typer.Option(help="Reverse-process steps; default: the trained T.")] = None,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same predictions.")] = 0,
    plot: Annotated[Optional[str], typer.Option(help="GENE,...: a PNG per gene beside the output (H&E, mean, std).")] = None,
    keep_samples: Annotated[bool, typer.Option("--keep-samples", help="Also store every sample in obsm['samples'] (N, S, G).")] = False,
    batch_size: Annotated[int, typer.Option(help="Spots per batch of the reverse process.")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (bf16 autocast on CUDA).")] = "auto",
    weights: Annotated[
        Optional[list[str]], typer.Option(help="FILE, or NAME=FILE, for the checkpoint's learned encoder; default: the Hugging Face cache.")
    ] = None,
    shard: ShardOpt = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Predict spot expression for new slides (or tiled samples) and write AnnData files scanpy can plot."""
    from hinge_cli.generate import GenerateOptions, Target, generate as stage
    from hinge_cli.run import Run, Shard

    ids = [i for value in sample_id or [] for i in _ids(value)]
    if slide:
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
        raise HingeError("nothing to predict", "pass --slide SLIDE, or --sample-id ID of a sample already in the run")
    opts = GenerateOptions(
        checkpoint=checkpoint, n_samples=samples, steps=steps, seed=seed, batch_size=batch_size, device=device,
        keep_samples=keep_samples, plot=_ids(plot), weights=weights or [], overwrite=overwrite,
    )
    summary = stage(Run(run), targets, opts, out=out, shard=Shard.parse(shard), progress=RichProgress())
    for line in summary.lines():
        say(line)


def main() -> None:
    try:
        app()
    except HingeError as exc:  # raised while parsing, before a command runs
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
