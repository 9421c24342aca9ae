"""The `hinge` command line: one small function per subcommand, no logic of its own."""

from __future__ import annotations

import contextlib
import functools
import logging
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
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        self._bars = Progress(*columns, console=err)
        self._open = 0

    @contextlib.contextmanager
    def task(self, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if _state["quiet"]:
            yield lambda n=1: None
            return
        if self._open == 0:
            self._bars.start()
        self._open += 1
        task_id = self._bars.add_task(label, total=total)
        try:
            yield lambda n=1: self._bars.advance(task_id, n)
        finally:
            self._open -= 1
            if self._open == 0:
                self._bars.stop()
                for done in list(self._bars.task_ids):
                    self._bars.remove_task(done)


def _setup(verbose: bool, quiet: bool) -> None:
    _state["verbose"] = _state["verbose"] or verbose
    _state["quiet"] = _state["quiet"] or quiet
    level = logging.DEBUG if _state["verbose"] else logging.WARNING if _state["quiet"] else logging.INFO
    root = logging.getLogger("hinge_cli")
    root.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, markup=False)]
    root.setLevel(level)
    root.propagate = False


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More detail, and tracebacks for errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")]
RunDir = Annotated[Optional[Path], typer.Option("--run", help="Run directory [default: $HINGE_RUN or ./hinge-run].")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo outputs that already exist.")]
ConfigOpt = Annotated[
    Optional[str], typer.Option("--config", help="tiny|small|default or a .yaml file [default: the run's, else default].")
]
ShardOpt = Annotated[
    Optional[str], typer.Option("--shard", help="I/N: do every N-th sample from the I-th (0-based) [default: SLURM array].")
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
    _setup(verbose, quiet)


@command
def tile(
    slides: Annotated[Optional[list[Path]], typer.Argument(help="Slide files (OpenSlide formats, or JPEG/PNG/TIFF).")] = None,
    run: RunDir = None,
    spots: Annotated[Optional[Path], typer.Option(help="Spot .h5ad (obsm['spatial'] in level-0 px): one patch per spot.")] = None,
    sample_id: Annotated[Optional[str], typer.Option(help="Sample id [default: the slide's file stem].")] = None,
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
    cfg = the_run.config(config, overrides)
    summary = tile_samples(
        the_run, specs, cfg.tile, shard=Shard.parse(shard), overwrite=overwrite, keep_going=keep_going, progress=RichProgress()
    )
    for line in summary.lines():
        err.print(line, highlight=False)
    if summary.failed:
        raise typer.Exit(3)


@command
def embed(
    run: RunDir = None,
    encoder: Annotated[Optional[str], typer.Option(help="NAME[,NAME...]: features concatenated in order [default].")] = None,
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
    config: Annotated[str, typer.Option(help="tiny|small|default or a .yaml file.")] = "default",
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
    cfg = the_run.config(config, overrides)
    summary = embed_samples(
        the_run, cfg.embed, weights or [], shard=Shard.parse(shard), overwrite=overwrite, keep_going=keep_going,
        progress=RichProgress(),
    )
    for line in summary.lines():
        err.print(line, highlight=False)
    if summary.failed:
        raise typer.Exit(3)


def main() -> None:
    try:
        app()
    except HingeError as exc:  # raised while parsing, before a command runs
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
