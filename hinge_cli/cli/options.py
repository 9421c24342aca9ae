"""The machinery of the `hinge` command line: its vocabulary of options, one-line parse errors, and the command decorator.

Every subcommand is declared in `hinge_cli.cli.app` with the option types below, so an option
that several commands share has one name, one type and one help text (tests/test_options.py
walks the commands to keep it so). Flags that override a config field are `setting(...)`:
unset, they keep the run's value, and their help shows the dataclass default.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
import time
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer._click.exceptions import BadOptionUsage, BadParameter, MissingParameter, NoArgsIsHelpError, NoSuchOption, UsageError
from typer.core import TyperCommand, TyperGroup

from hinge_cli.api import flag_messages
from hinge_cli.cli.terminal import LOG_FORMATS, error, progress, say, setup_output, shout, verbosity
from hinge_cli.config import POSITIVE, Rule, field_default, field_rule
from hinge_cli.core.devices import resolve_device
from hinge_cli.core.files import user_os_error
from hinge_cli.core.progress import Progress
from hinge_cli.errors import HingeError


def _visible_options(command: Any, ctx: Any) -> list[str]:
    return [opt for param in command.get_params(ctx) if getattr(param, "param_type_name", "") == "option"
            and not getattr(param, "hidden", False) for opt in param.opts if opt.startswith("--")]


def parse_error_line(exc: UsageError, group: TyperGroup, args: Sequence[str]) -> str:
    """One line for a parse error: the command, the flag at fault, and what it accepts."""
    ctx = exc.ctx
    name = next((arg for arg in args if arg in group.commands), None)
    command = ctx.command if ctx is not None else group.commands.get(name or "", group)
    where = ctx.command_path if ctx is not None else " ".join(["hinge", *([name] if name else [])])
    options = _visible_options(command, ctx or typer.Context(command))
    valid = f"valid options: {', '.join(options)}" if options else ""
    if isinstance(exc, NoSuchOption):
        close = difflib.get_close_matches(exc.option_name, options, n=1, cutoff=0.75)
        return f"{where}: no such option {exc.option_name}; " + (f"did you mean {close[0]}? " if close else "") + valid
    if isinstance(exc, BadOptionUsage):
        return f"{where}: {exc.option_name} needs a value; {valid}"
    if isinstance(exc, MissingParameter) and exc.param is not None:
        return f"{where}: {'/'.join(exc.param.opts)} is required; {valid}"
    if isinstance(exc, BadParameter) and exc.param is not None:
        message = exc.message[:1].lower() + exc.message[1:]
        return f"{where} {'/'.join(exc.param.opts)}: {message}"
    if command is group:
        return f"{where}: {exc.format_message()[:1].lower()}{exc.format_message()[1:]} (commands: {', '.join(group.commands)})"
    return f"{where}: {exc.format_message()}; {valid}"


def _plain_switches(params: list[Any]) -> list[Any]:
    """Boolean flags are plain switches: no `<bool>` type beside them in the help."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class HingeCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_switches(super().get_params(ctx))


class HingeGroup(TyperGroup):
    """The `hinge` group: parse errors and user errors print as one line and exit 2, never a box or a traceback."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_switches(super().get_params(ctx))

    def main(self, args: Sequence[str] | None = None, *pos: Any, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        setup_output(False, False, fresh=True)  # errors in parsing already speak in the chosen format
        try:
            code = super().main(argv, *pos, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except UsageError as exc:
            error(parse_error_line(exc, self, argv))
            code = 2
        except HingeError as exc:  # raised while parsing, before a command runs
            error(str(exc))
            code = 2
        except typer.Abort:
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


# ----------------------------------------------------------------------------- the vocabulary


def default(section: type, name: str, none: str = "none") -> str:
    """'(default: X; its valid range)' from the config dataclass, so help cannot drift from the code (Rich would swallow
    '[X]')."""
    value, rule = field_default(section, name), field_rule(section, name)
    return f"(default: {none if value is None else value}{'; ' + rule.text if rule is not None else ''})"


def setting(section: type, name: str, text: str, none: str = "none") -> Any:
    """A flag that overrides config `section.name`: unset, it keeps the run's value; its help shows the default."""
    hint = typing.get_type_hints(section)[name]
    value_type = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
    return Annotated[Optional[value_type], typer.Option(help=f"{text} {default(section, name, none)}.")]


def device_setting(section: type) -> Any:
    """`--device`, resolved before the command runs: a GPU that is not there is one line, even when nothing is left to do."""
    return Annotated[Optional[str], typer.Option(help=f"Where tensors run: auto, cpu, cuda (this process's GPU) or cuda:N "
                                                      f"{default(section, 'device')}.", metavar="auto|cpu|cuda[:N]", callback=check_device)]


def switch(name: str, text: str, *short: str, hidden: bool = False) -> Any:
    """A boolean flag: given or not (there is no --flag true)."""
    return Annotated[bool, typer.Option(name, *short, help=text, hidden=hidden)]


def path_option(text: str, kind: str, *names: str, exists: bool = True) -> Any:
    """A path checked before the command runs: kind is file, folder or either, so a folder given for a file is one line."""
    return Annotated[Optional[Path], typer.Option(*names, help=text, exists=exists, file_okay=kind != "folder",
                                                  dir_okay=kind != "file")]


def text_option(text: str, *names: str, hidden: bool = False) -> Any:
    return Annotated[Optional[str], typer.Option(*names, help=text, hidden=hidden)]


Verbose = switch("--verbose", "More detail, and tracebacks for errors.", "-v")
Quiet = switch("--quiet", "Only warnings and errors; no progress.", "-q")
LogFormat = Annotated[Optional[str], typer.Option(
    "--log-format", help="Progress as Rich bars or plain timestamped lines "
    "(default: $HINGE_LOG_FORMAT, else rich on a terminal, plain in a log file).",
    metavar="auto|rich|plain", callback=lambda value: check_log_format(value))]
RunDir = Annotated[Optional[Path], typer.Option(
    "--run", help="Run directory (default: $HINGE_RUN, else ./hinge-run).", file_okay=False)]
ConfigOpt = text_option("Config preset tiny|small|default, or a .yaml file (default: the run's, else default).", "--config")
ShardOpt = text_option("I/N: do every N-th sample from the I-th, counting from 0 (default: the SLURM array task).", "--shard")
Overwrite = switch("--overwrite", "Redo outputs that already exist instead of keeping them.")
KeepGoing = switch("--keep-going", "Record a failed sample and go on with the others; exit 3 with a summary.")
Slides = Annotated[Optional[list[Path]], typer.Argument(
    help="Slide files (OpenSlide formats, or JPEG/PNG/TIFF).", exists=True, dir_okay=False, show_default=False)]
SampleIds = Annotated[Optional[list[str]], typer.Option(
    "--sample-id", help="Sample id, comma-separated or repeated: the id of the one slide given (default: its file stem), "
    "or for generate without a slide, samples already in the run.")]
Spots = path_option("Spot .h5ad (obsm['spatial'] in level-0 px): one patch per spot instead of a grid.", "file", "--spots")
def ranged_option(rule: Rule, name: str, text: str) -> Any:
    """A numeric flag outside the config (a slide's or a file's own fact), checked against `rule` at parse time, with its
    range in the help as the config's settings have theirs."""
    def check(value: float | None) -> float | None:
        if value is not None and not rule.holds(value):
            raise HingeError(f"{name} {value!r} {rule.text}", f"give a valid {name}, or leave it out")
        return value

    return Annotated[Optional[float], typer.Option(name, help=f"{text} ({rule.text}).", callback=check)]


Mpp = ranged_option(POSITIVE, "--mpp", "µm/px of level 0, when the slide does not say")
Visium = path_option("A Space Ranger outs/ folder: its image, spots and scale factors.", "folder", "--visium")
VisiumHD = path_option("A Space Ranger Visium HD outs/ folder (its binned_outputs/).", "folder", "--visium-hd")


def bin_um_option(default: int) -> Any:
    """--bin-um: the bins tile pools (8 µm by default) or generate predicts (16 µm)."""
    return Annotated[int, typer.Option("--bin-um", help=f"With --visium-hd: the bin size in µm, 2|8|16 (default: {default}).",
                                       metavar="<int>", show_default=False)]


Image = text_option("With --visium or --visium-hd: the full-resolution image file, or hires|lowres from its spatial/ "
                    "folder (default: hires).", "--image")
Weights = Annotated[Optional[list[str]], typer.Option(
    "--weights", help="FILE, or NAME=FILE per learned encoder (default: the Hugging Face cache).")]
GenesFile = path_option("Use only these genes (a file, one symbol per line).", "file", "--genes")
GenesToPlot = text_option("Also draw maps of these genes, comma-separated.", "--genes-to-plot")
CountsLayer = text_option("The layer with raw counts in the .h5ad files this command reads (default: X, else layers['counts']).",
                          "--layer")


def ids(values: str | Sequence[str] | None) -> list[str]:
    """Comma-separated and/or repeated values as one list."""
    values = [values] if isinstance(values, str) else values or []
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def deprecated(old: str, new: str) -> None:
    shout(f"warning: {old} is deprecated; use {new}")


# ----------------------------------------------------------------------------- commands


def finish(summary: Any, seconds: float, wrote: Path | None = None) -> None:
    """The stage's end line (what it wrote, how long); a per-sample stage with failures (under --keep-going) exits 3."""
    failed = bool(getattr(summary, "failed", None))
    lines = list(summary.lines())
    if not hasattr(summary, "seconds"):
        lines[0] += f" in {seconds:.1f}s" + (f" -> {wrote}" if wrote is not None else "")
    for line in lines:
        shout(line) if failed else say(line)
    if failed:
        raise typer.Exit(3)


def run_command(stage: str, work: Callable[[Progress], Any], wrote: Path | None = None) -> None:
    """Run a stage through the API with progress for the terminal or the log, time it and print its summary."""
    started = time.monotonic()
    with progress(stage) as reporter:
        summary = work(reporter)
    finish(summary, time.monotonic() - started, wrote)


def command_decorator(app: typer.Typer) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@command`: registers a subcommand that also takes -v/-q/--log-format; user errors print as one line and exit 2."""

    def command(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            setup_output(kwargs.pop("verbose", False), kwargs.pop("quiet", False), kwargs.pop("log_format", None))
            try:
                with flag_messages():
                    return fn(*args, **kwargs)
            except (HingeError, OSError) as exc:
                user = exc if isinstance(exc, HingeError) else user_os_error(exc)  # a full disk, a read-only run...
                if user is None:
                    raise
                if verbosity["verbose"]:
                    shout(traceback.format_exc())
                error(str(user))
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                shout("interrupted: finished outputs are kept; run the same command again to resume")
                raise typer.Exit(130) from None

        shared = {"verbose": Verbose, "quiet": Quiet, "log_format": LogFormat}
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None if name == "log_format" else False,
                                   annotation=hint) for name, hint in shared.items()]
        signature = inspect.signature(fn, eval_str=True)
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**fn.__annotations__, **shared}
        return app.command(cls=HingeCommand)(wrapper)

    return command


def check_device(value: str | None) -> str | None:
    if value is not None:
        resolve_device(value)
    return value


def check_log_format(value: str | None) -> str | None:
    if value is not None and value not in LOG_FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_FORMATS)}")
    return value
