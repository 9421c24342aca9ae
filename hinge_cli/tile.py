"""`hinge tile`: slides in, `tiles/<sample>.h5` (+ a thumbnail) out, one sample at a time.

Each sample is written under a lock to a temporary file and renamed into place,
so an interrupted run leaves either a finished file or nothing, and a re-run
picks up exactly the samples that are missing.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from hinge_cli.config import TileConfig
from hinge_cli.errors import HingeError
from hinge_cli.formats.tiles import read_tile_attrs
from hinge_cli.progress import SILENT, Progress
from hinge_cli.run import Run, SampleReport, Shard
from hinge_cli.slide.tiling import SampleSpec, tile_sample

log = logging.getLogger(__name__)


def read_sample_sheet(path: Path) -> list[SampleSpec]:
    """Rows of `sample_id, slide[, spots, mpp]`; relative paths are relative to the sheet."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"sample sheet {path} does not exist", "check the path given to --samples")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"sample_id", "slide"} <= set(rows[0]):
        raise HingeError(f"sample sheet {path} needs the columns sample_id and slide", "add a header line: sample_id,slide,spots,mpp")
    specs = []
    for n, row in enumerate(rows, start=2):
        def resolve(value: str | None) -> Path | None:
            return (path.parent / value.strip()) if value and value.strip() else None

        mpp = (row.get("mpp") or "").strip()
        try:
            specs.append(SampleSpec(row["sample_id"].strip(), resolve(row["slide"]), resolve(row.get("spots")), float(mpp) if mpp else None))
        except ValueError:
            raise HingeError(f"{path} line {n}: mpp '{mpp}' is not a number", "give micrometres per pixel, e.g. 0.5") from None
    ids = [s.sample_id for s in specs]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise HingeError(f"sample sheet {path} repeats sample ids: {', '.join(duplicated)}", "give every row its own sample_id")
    return specs


def _stale_params(run: Run, sample: str, cfg: TileConfig) -> list[str]:
    """Names of settings that differ from those the existing tiles were made with."""
    made = read_tile_attrs(run.tiles(sample))
    differ = {"mpp_target": (made.mpp_target, cfg.target_mpp), "patch_px": (made.patch_px, cfg.patch_px)}
    return [f"{k} {was} (now {now})" for k, (was, now) in differ.items() if float(was) != float(now)]


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
            if run.tiles(sample).exists() and not overwrite:
                stale = _stale_params(run, sample, cfg)
                if stale:
                    log.warning("%s: existing tiles were made with %s; pass --overwrite to redo", sample, ", ".join(stale))
                summary.skipped.append(sample)
                advance(1)
                continue
            with summary.attempt(run, sample, "tile", keep_going):
                tile_sample(run, spec, cfg, progress)
            advance(1)
    return summary
