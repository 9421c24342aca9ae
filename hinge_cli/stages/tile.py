"""`hinge tile`: slides in, `tiles/<sample>.h5` (+ a thumbnail) out, one sample at a time.

Each sample is written under a lock to a temporary file and renamed into place,
and is done only once the manifest records it (the last write), so a re-run
redoes exactly the samples that were not finished, whatever files they left.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from hinge_cli.config import TileConfig
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.data.samples import SampleSpec
from hinge_cli.errors import HingeError, setting
from hinge_cli.run.directory import Run, SampleReport, Shard
from hinge_cli.run.lineage import changed_settings
from hinge_cli.slide.tiling import tile_sample

log = logging.getLogger(__name__)


def _stale_params(run: Run, sample: str, cfg: TileConfig) -> list[str]:
    """Settings that differ from those the existing tiles were made with."""
    return changed_settings(run.stage(sample, "tile").get("params"), asdict(cfg), ignore=("workers",))


def _require_same_files(run: Run, spec: SampleSpec) -> None:
    """Refuse to skip a tiled sample asked for with another slide or spot file: its tiles, and the expression the run
    registered for it, come from the files it was tiled with."""
    recorded = run.stage(spec.sample_id, "tile").get("inputs", {})
    for name, given in (("slide", spec.slide), ("spots", spec.spots)):
        was = recorded.get(name, {}).get("path")
        now = str(Path(given).resolve()) if given is not None else None
        if name in recorded and was != now:
            raise HingeError(f"{spec.sample_id} was tiled from the {name} file {was}, not {now or 'none'}",
                             f"pass {setting('overwrite')} to tile {spec.sample_id} again from the new file (its tiles and registered "
                             f"expression are replaced), or give it another {setting('sample-id')}")


def tile_samples(
    run: Run,
    specs: list[SampleSpec],
    cfg: TileConfig,
    shard: Shard = Shard(),
    overwrite: bool = False,
    keep_going: bool = False,
    progress: Progress = SILENT,
) -> SampleReport:
    """Tile this shard's share of `specs`; failures stop the run unless `keep_going`."""
    by_id = {s.sample_id: s for s in specs}
    mine = shard.select(list(by_id))
    summary = SampleReport("tile")
    with progress.task("slides", len(mine)) as advance:
        for sample in mine:
            spec = by_id[sample]
            if not overwrite and run.is_done(sample, "tile", run.tiles(sample)):
                _require_same_files(run, spec)
                stale = _stale_params(run, sample, cfg)
                if stale:
                    log.warning("%s: existing tiles were made with %s; pass --overwrite to redo", sample, ", ".join(stale))
                summary.skipped.append(sample)
                advance(1)
                continue
            with summary.attempt(run, sample, "tile", keep_going):
                tile_sample(run, spec, cfg, progress, overwrite=overwrite)
            advance(1)
    return summary
