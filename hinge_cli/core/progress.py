"""Progress reporting for long loops, without tying the core to a terminal.

The core calls `progress.task(label, total)` and advances it; library users get
the silent default, the CLI passes Rich bars or, for log files, plain lines
(`hinge_cli.cli.terminal`). The outermost task of a stage is its start line, so its
label says what is counted ("slides", "samples", "train epochs").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[..., None]  # advance(n=1, status=None): n more done; status shows beside the bar


class Progress(Protocol):
    def task(self, label: str, total: int | None) -> contextlib.AbstractContextManager[Advance]: ...


class Silent:
    """The default: loops report nothing."""

    @contextlib.contextmanager
    def task(self, label: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1, status=None: None


SILENT = Silent()
