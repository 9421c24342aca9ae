"""The run directory: its layout, its config, its manifest, and how array jobs share it.

`manifest.json` records what was done with which inputs, updated under an exclusive
lock so concurrent jobs do not lose entries. Safe writing itself (atomic renames,
output locks) lives in `files.py`, which the core uses without knowing about runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from hinge_cli.config import HingeConfig, dump_config, load_config
from hinge_cli.core.files import OutputFinished, OutputLocked, fingerprint, output_lock, same_file, sweep_leftovers, write_text_atomic
from hinge_cli.errors import HingeError, setting

log = logging.getLogger(__name__)

DEFAULT_RUN = "hinge-run"
SAFE_SAMPLE_ID = re.compile(r"\w[\w.+=@,-]*")  # no '/', no leading '.', so no way out of the run's folders


def safe_sample_id(sample: str) -> str:
    """`sample`, if it can name files inside the run; a HingeError otherwise."""
    if not SAFE_SAMPLE_ID.fullmatch(sample) or ".." in sample:
        raise HingeError(f"sample id {sample!r} cannot name a file in the run (it may only hold letters, digits and . _ - + = @ ,"
                         " and may not start with '.' or contain '..')", f"rename the file or give a plain {setting('sample-id')}")
    return sample


def default_run_dir() -> Path:
    return Path(os.environ.get("HINGE_RUN", DEFAULT_RUN))


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("hinge-cli", "torch", "numpy", "h5py", "anndata", "openslide-python", "openslide-bin", "tifffile"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


@dataclass
class SampleReport:
    """What a per-sample stage did: the closing lines, and exit code 3 when something failed."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # sample -> the file written for it, where the user chose it

    def lines(self) -> list[str]:
        out = [f"{self.stage}: {len(self.done)} done, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"]
        out += [f"  {sample}: {self.outputs[sample]}" for sample in self.done + self.skipped if sample in self.outputs]
        out += [f"  failed {sample}: {why}" for sample, why in self.failed.items()]
        return out

    @contextlib.contextmanager
    def attempt(self, run: Run, sample: str, stage: str, keep_going: bool) -> Iterator[None]:
        """One sample's work: done on success; on failure recorded in the manifest, then raised unless keep_going."""
        try:
            yield
        except OutputFinished:
            self.skipped.append(sample)
        except Exception as exc:
            if not isinstance(exc, OutputLocked):  # another job is writing it: not this sample's failure
                run.record_stage(sample, stage, "failed", error=str(exc))
            if not keep_going:
                raise
            log.error("%s: %s", sample, exc)
            self.failed[sample] = str(exc)
        else:
            self.done.append(sample)


@dataclass(frozen=True)
class Shard:
    """Which of N array jobs this is; samples are dealt round-robin over the sorted list."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """`I/N` (0-based), or the SLURM array variables when not given."""
        if text is None:
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
            if task is None or count is None:
                return cls()
            try:
                text = f"{int(task) - int(os.environ.get('SLURM_ARRAY_TASK_MIN', 0))}/{int(count)}"
            except ValueError:
                raise HingeError(f"SLURM_ARRAY_TASK_ID={task!r}, SLURM_ARRAY_TASK_COUNT={count!r} are not whole numbers",
                                 f"run inside a SLURM array job (sbatch {setting('array')}), or give {setting('shard', 'I')}/N") from None
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise HingeError(f"{setting('shard')} '{text}' is not of the form I/N", f"give e.g. {setting('shard', '0/4')} (I counts from 0)") from None
        if n < 1:
            raise HingeError(f"{setting('shard')} {text} has no shards (N = {n})", f"give N of 1 or more, e.g. {setting('shard', '0/4')}")
        if not 0 <= i < n:
            raise HingeError(f"{setting('shard')} {text} is out of range", f"I must be between 0 and {n - 1}")
        return cls(i, n)

    def select(self, names: Sequence[str]) -> list[str]:
        ordered = sorted(set(names))
        return [name for k, name in enumerate(ordered) if k % self.count == self.index]


class Run:
    """One run directory (`--run DIR`): layout, config and manifest."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_run_dir()
        self._warned_read_only = False
        self._swept = False
        self.settings: HingeConfig | None = None  # the config this command runs with: see `_commit_settings`

    # layout -----------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def config_path(self) -> Path:
        return self.root / "hinge.yaml"

    def tiles(self, sample: str) -> Path:
        return self.root / "tiles" / f"{safe_sample_id(sample)}.h5"

    def input_spots(self, sample: str) -> Path:
        """Spots hinge wrote itself from another layout (a Space Ranger folder), in the slide image's pixels."""
        return self.root / "inputs" / f"{safe_sample_id(sample)}.h5ad"

    def thumbnail(self, sample: str) -> Path:
        return self.root / "tiles" / f"{safe_sample_id(sample)}.png"

    def embeddings(self, encoder_key: str, sample: str) -> Path:
        return self.root / "embeddings" / encoder_key / f"{safe_sample_id(sample)}.h5"

    def checkpoint(self, name: str) -> Path:
        """Weights in safetensors; the JSON sidecar beside it has the same stem."""
        return self.root / "checkpoints" / f"{name}.safetensors"

    def log(self, stage: str) -> Path:
        return self.root / "logs" / f"{stage}.jsonl"

    def plot(self, stage: str) -> Path:
        return self.root / "plots" / f"{stage}_loss.png"

    def prediction(self, sample: str) -> Path:
        return self.root / "predictions" / f"{safe_sample_id(sample)}.h5ad"

    def eval_dir(self, sample: str) -> Path:
        return self.root / "eval" / safe_sample_id(sample)

    def training_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held by pretrain-warmup and train (rank 0 of a torchrun job): both write checkpoints/ and genes.txt."""
        if os.environ.get("RANK", "0") != "0":
            return contextlib.nullcontext()
        return output_lock(self.root / "training", what=f"run {self.root} is being trained")

    # config -----------------------------------------------------------------
    def config(self, preset: str | Path | None = None, overrides: dict[str, Any] | None = None, record: bool = True) -> HingeConfig:
        """Resolve the config (hinge.yaml, a preset, flags on top) and, with `record`, save it for later stages."""
        cfg = load_config(preset, self.config_path, overrides)
        if record:
            self.record_config(cfg)
        return cfg

    def record_config(self, cfg: HingeConfig) -> None:
        """Write hinge.yaml when `cfg` differs from it. The CLI calls this after a command succeeds,
        so a failed command's flags do not leak into later stages."""
        if self.read_only:
            return
        text = dump_config(cfg)
        if not self.config_path.exists() or self.config_path.read_text() != text:
            if self.config_path.exists() and load_config(None, self.config_path).preset != cfg.preset:
                log.warning("run config switches to preset '%s'; hinge.yaml is rewritten from it", cfg.preset)
            self.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.config_path, text)

    # manifest ---------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        """A run on read-only storage (a shared, published model): it can be predicted from, not recorded in."""
        return self.root.is_dir() and not os.access(self.root, os.W_OK)

    @contextlib.contextmanager
    def _manifest(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the manifest under an exclusive flock; a read-only run's is read, never written."""
        if self.read_only:
            if not self._warned_read_only:
                log.warning("run %s is read-only: its manifest is not updated (outputs elsewhere carry their provenance)",
                            self.root)
                self._warned_read_only = True
            yield self.manifest()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._swept:  # the first record of a stage: what killed jobs left behind goes
            self._swept = True
            removed = sweep_leftovers(self.root)
            if removed:
                log.debug("removed %d files left by killed jobs in %s: %s", len(removed), self.root,
                          ", ".join(str(p.relative_to(self.root)) for p in removed[:10]))
        with open(self.root / ".manifest.lock", "a") as lockfile:
            fcntl.flock(lockfile, fcntl.LOCK_EX)
            data = self.manifest()
            yield data
            write_text_atomic(self.manifest_path, json.dumps(data, indent=1, sort_keys=True))

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"version": 1, "samples": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except ValueError:
            raise HingeError(f"{self.manifest_path} is not valid JSON", f"restore it from a backup or start a new {setting('run')}") from None

    def sample(self, sample: str) -> dict[str, Any]:
        return self.manifest()["samples"].get(sample, {})

    def samples(self) -> list[str]:
        return sorted(self.manifest()["samples"])

    def register_sample(self, sample: str, **fields: Any) -> None:
        """Record sample-level facts (slide, spots, expression file) in the manifest."""
        with self._manifest() as data:
            data["samples"].setdefault(sample, {}).update(fields)

    def _commit_settings(self, status: str) -> None:
        """hinge.yaml lands before the first `ok` record of a command, so that outputs, settings and record commit
        together: a kill between them leaves work unrecorded, and the same command redoes it, instead of leaving a
        recorded stage whose settings later stages never see."""
        if status == "ok" and self.settings is not None:
            self.record_config(self.settings)

    def record_stage(self, sample: str, stage: str, status: str, **fields: Any) -> None:
        """Record one stage of one sample: status ok|failed|running plus whatever the stage reports."""
        self._commit_settings(status)
        entry = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}
        if status == "running":
            entry["versions"] = package_versions()
            entry["argv"] = sys.argv
        with self._manifest() as data:
            stages = data["samples"].setdefault(sample, {}).setdefault("stages", {})
            if status != "running":
                entry = {**stages.get(stage, {}), **entry}
            stages[stage] = {**entry, **fields}

    def record_run_stage(self, stage: str, status: str, **fields: Any) -> None:
        """Record a stage that concerns the whole run (training), not one sample."""
        self._commit_settings(status)
        entry = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                 "versions": package_versions(), "argv": sys.argv, **fields}
        with self._manifest() as data:
            data.setdefault("stages", {})[stage] = entry

    def stage(self, sample: str, stage: str) -> dict[str, Any]:
        return self.sample(sample).get("stages", {}).get(stage, {})

    def record_output(self, sample: str, stage: str, output: Path, **fields: Any) -> None:
        """Record `stage` ok for `output`, pinned by its fingerprint: the last write of a finished sample."""
        self.record_stage(sample, stage, "ok", output=str(output), output_file=fingerprint(output), **fields)

    def is_done(self, sample: str, stage: str, output: Path) -> bool:
        """Whether the manifest records `stage` ok for the file now at `output`.

        The file's existence alone proves nothing: a writer killed after the rename (or a
        job that wrote it without finishing the sample) leaves a file but no record.
        Records written before fingerprints existed are trusted while their output exists.
        """
        entry = self.stage(sample, stage)
        if entry.get("status") != "ok" or not Path(output).is_file():
            return False
        pinned = entry.get("output_file")
        return pinned is None or same_file(output, pinned)
