"""The chain of inputs behind each output, and the refusal when a link has changed since it was made.

tiles <- slide (+ spots); embeddings <- tiles; the warm-up (panel, feature scaling) and every later
checkpoint <- embeddings + expression, and <- the panel in genes.txt. Each stage records what it was
made from (the manifest; a checkpoint's card its panel); a consumer compares that with what is on disk
now and names the stage to redo when they differ. Records written before this existed carry no such
facts and are trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hinge_cli.core.files import describe_input
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.run.directory import Run

WARMUP = "pretrain-warmup"
GENES_FILE = "genes.txt"  # the run's panel, written by pretrain-warmup


def require_current_tiles(run: Run, sample: str) -> None:
    """Refuse tiles whose slide or spot file changed after tiling."""
    for name, recorded in run.stage(sample, "tile").get("inputs", {}).items():
        path = Path(recorded["path"])
        if path.exists() and describe_input(path) != recorded:
            raise HingeError(f"{sample}: the tiles are stale: its {name} file {path} changed after `{command('tile')}` ran",
                             f"re-tile {sample} (`{command('tile')} ... {setting('overwrite')}` with its slide and spots), then embed it again")


def tiles_made_from(run: Run, sample: str) -> dict[str, Any] | None:
    """The fingerprint of the tiles file an embedding is made from, for its manifest record."""
    return run.stage(sample, "tile").get("output_file")


def embeddings_current(run: Run, sample: str, encoder_key: str) -> bool:
    """Whether the sample's embeddings were made from the tiles file now on disk."""
    made_from = run.stage(sample, f"embed:{encoder_key}").get("tiles_file")
    return made_from is None or made_from == tiles_made_from(run, sample)


def stale_embeddings_error(sample: str, encoder_key: str) -> HingeError:
    return HingeError(f"{sample}: the embeddings ({encoder_key}) are stale: `{command('tile')}` has replaced the tiles they were made from",
                      f"run `{command('embed')} {setting('encoder')} {encoder_key.replace('+', ',')} {setting('overwrite')}`")


def require_ready_for_training(run: Run, samples: Sequence[str], encoder_key: str) -> None:
    """Refuse samples whose tiling or embedding did not finish, or whose chain has a stale link.

    A file left by a killed job is not a finished sample: training on it (or without it) would be silent.
    """
    for sample in samples:
        if not run.is_done(sample, "tile", run.tiles(sample)):
            raise HingeError(f"{sample}: tiling did not finish (the manifest records no finished tiles for {run.tiles(sample)})",
                             f"run the same `{command('tile')}` command again: it redoes unfinished samples")
        require_current_tiles(run, sample)
        if not run.is_done(sample, f"embed:{encoder_key}", run.embeddings(encoder_key, sample)):
            raise HingeError(f"{sample}: embeddings ({encoder_key}) are missing or did not finish",
                             f"run `{command('embed')} {setting('encoder')} {encoder_key.replace('+', ',')}` (it redoes unfinished samples)")
        if not embeddings_current(run, sample, encoder_key):
            raise stale_embeddings_error(sample, encoder_key)


def training_inputs(run: Run, samples: Sequence[str], encoder_key: str) -> dict[str, Any]:
    """Per sample, the embeddings file and the expression file the warm-up used: recorded with its manifest entry."""
    return {s: {"embeddings": run.stage(s, f"embed:{encoder_key}").get("output_file"),
                "expression": run.sample(s).get("expression")} for s in samples}


def require_unchanged_since_warmup(run: Run, samples: Sequence[str], encoder_key: str) -> None:
    """Refuse to train on embeddings or expression that changed after the warm-up fixed the panel and feature scaling."""
    recorded = run.manifest().get("stages", {}).get(WARMUP, {}).get("inputs")
    if recorded is None:
        return
    now = training_inputs(run, samples, encoder_key)
    changed = [s for s in samples if s in recorded and recorded[s] != now[s]]
    if changed:
        raise HingeError(f"the embeddings or expression of {', '.join(changed)} changed after `{command('pretrain-warmup')}` ran",
                         f"run `{command('pretrain-warmup')} {setting('overwrite')}`, then `{command('train')} {setting('overwrite')}`")


def changed_settings(recorded: dict[str, Any] | None, now: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """`name was (now new)` for each setting that differs from those an output was made with (nested keys dotted)."""
    out: list[str] = []
    for key, value in now.items():
        if key in ignore or recorded is None or key not in recorded:
            continue
        if isinstance(value, dict) and isinstance(recorded[key], dict):
            out += [f"{key}.{line}" for line in changed_settings(recorded[key], value)]
        elif recorded[key] != value:
            out.append(f"{key} {recorded[key]} (now {value})")
    return out
