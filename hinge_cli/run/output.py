"""The one routine every per-sample output goes through: tiles, embeddings (made or imported) and predictions.

Two jobs never write one output (its lock), a job that waited never replaces what another finished and recorded (the
check is made under the lock), a killed writer's temporaries go, and the manifest's `ok` record is the last write: an
output without it is unfinished work, which the same command redoes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hinge_cli.core.files import OutputFinished, output_lock, remove_stale_temporaries
from hinge_cli.run.directory import Run


@contextlib.contextmanager
def sample_output(run: Run, sample: str, stage: str, final: Path, *, overwrite: bool) -> Iterator[dict[str, Any]]:
    """Hold `final` for one sample's `stage`; yield the dict of facts to record, which the caller fills while it writes
    `final` (atomically) and records `running`; record `ok` with them once the block ends. Without `overwrite`, an output
    recorded as finished raises OutputFinished and is kept."""
    with output_lock(final):
        if not overwrite and run.is_done(sample, stage, final):
            raise OutputFinished(sample)
        remove_stale_temporaries(final)
        record: dict[str, Any] = {}
        yield record
        run.record_output(sample, stage, final, **record)
