"""What the command line shows: progress, result lines and log records, for a terminal or for a log file.

On a terminal loops are Rich bars. When stderr is not a terminal (a SLURM job's log), or with
`--log-format plain` / `HINGE_LOG_FORMAT=plain`, every line is plain text with a timestamp,
written and flushed at once, and each loop reports at a steady cadence instead of redrawing.
The core reports through `hinge_cli.core.progress` and `logging` and never imports Rich; this is the other end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from hinge_cli.core.progress import SILENT
from hinge_cli.core.progress import Progress as ProgressProtocol

PLAIN_EVERY_PERCENT = 10  # a plain loop reports each time it passes another 10% of its total ...
PLAIN_EVERY_SECONDS = 30.0  # ... or when this long has passed since its last line, whichever comes first
PLAIN_MIN_SECONDS = 5.0  # but short loops do not report every 10%: a line at most this often per loop
LOG_FORMATS = ("auto", "rich", "plain")

err = Console(stderr=True)
verbosity = {"verbose": False, "quiet": False, "plain": False}


def clock(seconds: float | None) -> str:
    """A duration as 42s, 3m05s or 2h07m: short enough for a log line."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Meter:
    """One loop's count, average rate and ETA since it started: the ETA counts down between updates."""

    total: int | None
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        return self.done / max(self.elapsed(), 1e-9)

    def eta(self) -> float | None:
        if not self.total or not self.done:
            return None
        return max(0.0, (self.total - self.done) / self.rate())

    def percent(self) -> int | None:
        return int(100 * self.done / self.total) if self.total else None

    def describe(self) -> str:
        rate = self.rate()
        speed = f"{rate:.1f}/s" if rate >= 1 else f"{clock(1 / rate) if rate else '?'}/it"
        if self.total is None:
            return f"{self.done} done, {speed}, {clock(self.elapsed())} elapsed"
        return f"{self.done}/{self.total} ({self.percent()}%), {speed}, ETA {clock(self.eta())}"


def write_plain(line: str) -> None:
    """One timestamped line on stderr, flushed now so a log file shows it while the job runs."""
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    sys.stderr.flush()


def _stage_start(stage: str, label: str, total: int | None) -> None:
    say(f"{stage}: {label}, {'?' if total is None else total} to do")


@dataclass
class _Loop:
    label: str
    meter: Meter
    nested: bool
    status: str = ""
    last_line: float = field(default_factory=time.monotonic)
    last_percent: int = 0

    def due(self, now: float) -> bool:
        quiet_for = now - self.last_line
        if quiet_for >= PLAIN_EVERY_SECONDS:
            return True
        percent = self.meter.percent()
        return (percent is not None and percent >= self.last_percent + PLAIN_EVERY_PERCENT
                and (not self.nested or quiet_for >= PLAIN_MIN_SECONDS))

    def line(self, now: float) -> str:
        self.last_line = now
        percent = self.meter.percent()
        if percent is not None:
            self.last_percent = percent - percent % PLAIN_EVERY_PERCENT
        return f"{self.label}: {self.meter.describe()}" + (f"  {self.status}" if self.status else "")


class PlainProgress:
    """Progress as log lines: each loop reports every 10% (a nested one at most every 5 s) or every 30 s.

    Used as a context manager around the stage (the CLI does), a background tick sees to the
    30 s: an open loop that does not advance still reports, and so does a stage between loops.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._loops: list[_Loop] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = self._last_line = time.monotonic()

    def _write(self, line: str) -> None:
        self._last_line = time.monotonic()
        write_plain(line)

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, PLAIN_EVERY_SECONDS / 4)):
            with self._lock:
                now = time.monotonic()
                for loop in self._loops:
                    if now - loop.last_line >= PLAIN_EVERY_SECONDS:
                        self._write(loop.line(now))
                if not self._loops and now - self._last_line >= PLAIN_EVERY_SECONDS:
                    self._write(f"{self.stage}: working, {clock(now - self._started)} so far")

    def __enter__(self) -> PlainProgress:
        self._stop.clear()
        threading.Thread(target=self._tick, daemon=True, name="hinge-progress").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def task(self, label: str, total: int | None) -> Iterator[Callable[..., None]]:
        with self._lock:
            loop = _Loop(label, Meter(total), nested=bool(self._loops))
            if not self._loops:
                self._last_line = time.monotonic()
                _stage_start(self.stage, label, total)
            self._loops.append(loop)

        def advance(n: int = 1, status: str | None = None) -> None:
            with self._lock:
                loop.meter.done += n
                loop.status = status if status is not None else loop.status
                now = time.monotonic()
                if loop.due(now):
                    self._write(loop.line(now))

        try:
            yield advance
        finally:
            with self._lock:
                self._loops.remove(loop)


class CountdownColumn(ProgressColumn):
    """ETA from the loop's average rate, counting down between updates (Rich's own holds still until the next one)."""

    def render(self, task: Task) -> Text:
        deadline = task.fields.get("deadline")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return Text(f"ETA {clock(left)}" if not task.finished else "", style="progress.remaining")


class RichProgress:
    """Rich bars for the core's loops, all in one live display; a nested loop's bar goes when it ends."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   CountdownColumn(), TextColumn("{task.fields[status]}")]
        self._bars = Progress(*columns, console=err)
        self._open = 0

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    @contextlib.contextmanager
    def task(self, label: str, total: int | None) -> Iterator[Callable[..., None]]:
        if self._open == 0:
            _stage_start(self.stage, label, total)
            self._bars.start()
        self._open += 1
        task_id = self._bars.add_task(label, total=total, status="", deadline=None)
        meter = Meter(total)

        def advance(n: int = 1, status: str | None = None) -> None:
            meter.done += n
            eta = meter.eta()
            fields = {"deadline": None if eta is None else time.monotonic() + eta}
            self._bars.update(task_id, advance=n, **fields, **({"status": status} if status is not None else {}))

        try:
            yield advance
        finally:
            self._open -= 1
            if self._open == 0:
                self._bars.stop()
                for done in list(self._bars.task_ids):
                    self._bars.remove_task(done)
            else:
                self._bars.remove_task(task_id)


@contextlib.contextmanager
def progress(stage: str) -> Iterator[ProgressProtocol]:
    """The progress reporter for `stage` in the current output mode, for as long as the stage runs: silent under -q."""
    if verbosity["quiet"]:
        yield SILENT
        return
    with PlainProgress(stage) if verbosity["plain"] else RichProgress(stage) as reporter:
        yield reporter


def say(line: str) -> None:
    """A result line for the user (summaries); silent under -q and on torchrun's other ranks."""
    if not verbosity["quiet"]:
        shout(line)


def shout(line: str) -> None:
    """A line shown even under -q: failures and errors."""
    if verbosity["plain"]:
        write_plain(line)
    else:
        err.print(line, highlight=False, soft_wrap=True, markup=False)


def error(text: str) -> None:
    """A user error: one line, `error: ...`, red on a terminal."""
    if verbosity["plain"]:
        write_plain(f"error: {text}")
    else:
        err.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{record.getMessage()}"


def _plain_chosen(log_format: str | None) -> bool:
    chosen = log_format or os.environ.get("HINGE_LOG_FORMAT") or "auto"
    if chosen not in LOG_FORMATS:
        chosen = "auto"
    return chosen == "plain" or (chosen == "auto" and not err.is_terminal)


def setup_output(verbose: bool, quiet: bool, log_format: str | None = None, fresh: bool = False) -> None:
    """-v/-q/--log-format may come before the subcommand (fresh: the app callback, first) or after it."""
    verbosity["verbose"] = verbose or (not fresh and verbosity["verbose"])
    verbosity["quiet"] = quiet or (not fresh and verbosity["quiet"]) or int(os.environ.get("RANK", "0")) > 0  # torchrun: rank 0 speaks
    if fresh or log_format is not None:
        verbosity["plain"] = _plain_chosen(log_format)
    level = logging.DEBUG if verbosity["verbose"] else logging.WARNING if verbosity["quiet"] else logging.INFO
    if verbosity["plain"]:
        handler: logging.Handler = logging.StreamHandler()  # sys.stderr as it is now (a test runner swaps it)
        handler.setFormatter(_PlainFormatter())
    else:
        handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    root = logging.getLogger("hinge_cli")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
