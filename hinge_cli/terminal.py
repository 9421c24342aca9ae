"""What the command line shows: Rich progress bars, result lines and log records, quiet or verbose.

The core reports through `hinge_cli.progress` and `logging` and never imports Rich; this is the other end.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True)
verbosity = {"verbose": False, "quiet": False}


class RichProgress:
    """Rich bars for the core's loops, all in one live display; silent under -q."""

    def __init__(self) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        self._bars = Progress(*columns, console=err)
        self._open = 0

    @contextlib.contextmanager
    def task(self, label: str, total: int | None) -> Iterator[Callable[..., None]]:
        if verbosity["quiet"]:
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
    if not verbosity["quiet"]:
        err.print(line, highlight=False, soft_wrap=True)


def setup_output(verbose: bool, quiet: bool, fresh: bool = False) -> None:
    """-v/-q may come before the subcommand (fresh: the app callback, first) or after it."""
    verbosity["verbose"] = verbose or (not fresh and verbosity["verbose"])
    verbosity["quiet"] = quiet or (not fresh and verbosity["quiet"]) or int(os.environ.get("RANK", "0")) > 0  # torchrun: rank 0 speaks
    level = logging.DEBUG if verbosity["verbose"] else logging.WARNING if verbosity["quiet"] else logging.INFO
    root = logging.getLogger("hinge_cli")
    root.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, markup=False)]
    root.setLevel(level)
    root.propagate = False
