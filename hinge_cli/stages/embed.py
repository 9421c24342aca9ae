"""`hinge embed`: `tiles/<sample>.h5` in, `embeddings/<encoder-key>/<sample>.h5` out.

The stage picks this shard's samples, skips those the manifest records as finished
(warning when their views differ from the asked-for ones) and embeds the rest one by
one with `hinge_cli.encoders.embedding.embed_sample`. Each output is written under a
lock to a temporary name, renamed into place and then recorded, so an interrupted run
resumes with exactly the unfinished samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from hinge_cli.config import EmbedConfig
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.encoders.embedding import embed_sample, parse_weights
from hinge_cli.encoders.imported import import_features
from hinge_cli.encoders.registry import (
    DEFAULT_ENCODER,
    MAX_VIEWS,
    build_encoder,
    encoder_key,
    get_spec,
    locate_weights,
    missing_weights_error,
    parse_encoders,
)
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.run.directory import Run, SampleReport, Shard
from hinge_cli.run.lineage import changed_settings, embeddings_current, require_current_tiles, stale_embeddings_error

log = logging.getLogger(__name__)


def _stale(run: Run, sample: str, stage: str, cfg: EmbedConfig) -> list[str]:
    """Settings that differ from those the existing embeddings were made with."""
    return changed_settings(run.stage(sample, stage).get("params"), asdict(cfg), ignore=("device", "workers", "batch_size"))


def tiled_samples(run: Run) -> list[str]:
    """Samples whose tiling the manifest records as finished for the tiles file now on disk."""
    return [s for s in run.samples() if run.is_done(s, "tile", run.tiles(s))]


def fail_altered_tiles(run: Run, shard: Shard, summary: SampleReport, stage: str, keep_going: bool) -> None:
    """Count as failed, in one line each, the samples whose finished tiling is recorded for another tiles file than the
    one now on disk (damaged, or replaced outside hinge): leaving them out in silence would lose them from training."""
    for sample in shard.select([s for s in run.samples() if run.stage(s, "tile").get("status") == "ok"
                                and not run.is_done(s, "tile", run.tiles(s))]):
        with summary.attempt(run, sample, stage, keep_going):
            raise HingeError(f"its tiles file {run.tiles(sample)} is not the one `{command('tile')}` recorded (damaged, "
                             "replaced or removed)", f"re-run `{command('tile')} {setting('overwrite')}` for {sample}, then embed again")


def embed_samples(
    run: Run,
    cfg: EmbedConfig,
    weights: Sequence[str] = (),
    shard: Shard = Shard(),
    overwrite: bool = False,
    keep_going: bool = False,
    progress: Progress = SILENT,
) -> SampleReport:
    """Embed this shard's share of the run's tiled samples with the configured encoder(s)."""
    if cfg.views not in (1, MAX_VIEWS):
        raise HingeError(f"{setting('views')} {cfg.views} is not supported", f"use {setting('views', '1')} or {setting('views', '8')} (the dihedral group)")
    if cfg.batch_size < 1:
        raise HingeError(f"{setting('batch-size')} {cfg.batch_size} must be at least 1", f"give e.g. {setting('batch-size', '64')}")
    specs = parse_encoders(cfg.encoder)
    paths = parse_weights(weights, specs)
    for spec in specs:  # fail before any work, not after the first sample
        if spec.needs_weights and locate_weights(spec, paths.get(spec.name)) is None:
            raise missing_weights_error(spec)
    if [s.name for s in specs] == [DEFAULT_ENCODER]:
        log.info("encoder: the weight-free default (stain, nuclei and texture statistics); "
                 "give --encoder uni,conch etc. with their weights for foundation-model features")
    samples = tiled_samples(run)
    if not samples:
        raise HingeError(f"no tiled samples in {run.root}", f"run {command('tile')} first (or point {setting('run')} at the right folder)")
    key = encoder_key(specs)
    summary = SampleReport(f"embed ({key})")
    fail_altered_tiles(run, shard, summary, f"embed:{key}", keep_going)
    todo = []
    for sample in shard.select(samples):
        final = run.embeddings(key, sample)
        require_current_tiles(run, sample)
        if not overwrite and run.is_done(sample, f"embed:{key}", final):
            if not embeddings_current(run, sample, key):
                raise stale_embeddings_error(sample, key)
            stale = _stale(run, sample, f"embed:{key}", cfg)
            if stale:
                log.warning("%s: existing embeddings have %s; pass --overwrite to redo", sample, ", ".join(stale))
            summary.skipped.append(sample)
        else:
            todo.append(sample)
    if not todo:
        return summary
    encoders = [build_encoder(s.name, paths.get(s.name), cfg.device) for s in specs]
    with progress.task("samples", len(todo)) as advance:
        for sample in todo:
            with summary.attempt(run, sample, f"embed:{key}", keep_going):
                embed_sample(run, sample, encoders, cfg, progress, overwrite=overwrite)
            advance(1)
    return summary


def import_samples(
    run: Run,
    source: Path,
    encoder: str,
    patch_size_level0: float | None = None,
    shard: Shard = Shard(),
    overwrite: bool = False,
    keep_going: bool = False,
    progress: Progress = SILENT,
) -> SampleReport:
    """Take this shard's tiled samples' features from TRIDENT/HEST files instead of computing them."""
    samples = tiled_samples(run)
    if not samples:
        raise HingeError(f"no tiled samples in {run.root}", f"run {command('tile')} first (spot positions come from the tiles)")
    if Path(source).is_file() and len(samples) > 1:
        raise HingeError(f"{source} is one file but the run has {len(samples)} samples",
                         "give the folder of TRIDENT feature files, one <sample>.h5 each")
    name = get_spec(encoder).name
    summary = SampleReport(f"embed ({name}, imported)")
    fail_altered_tiles(run, shard, summary, f"embed:{name}", keep_going)
    with progress.task("samples", len(shard.select(samples))) as advance:
        for sample in shard.select(samples):
            require_current_tiles(run, sample)
            if not overwrite and run.is_done(sample, f"embed:{name}", run.embeddings(name, sample)):
                if not embeddings_current(run, sample, name):
                    raise stale_embeddings_error(sample, name)
                summary.skipped.append(sample)
            else:
                with summary.attempt(run, sample, f"embed:{name}", keep_going):
                    import_features(run, sample, source, name, patch_size_level0)
            advance(1)
    return summary
