"""What `generate` needs of a slide before it samples: its tiles and features, made as the checkpoint records.

A new slide is tiled with the tiling the model was trained with and embedded with its encoders; both are cached
in the run like `hinge tile`/`hinge embed` do, and cached ones are used only while they match (a damaged or
unfinished one is made again). Visium HD bins are tiled as spots that keep no pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hinge_cli.config import TileConfig
from hinge_cli.core.files import describe_input
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.data.bins import HDBins
from hinge_cli.data.samples import SampleSpec
from hinge_cli.encoders.embedding import embed_sample, parse_weights
from hinge_cli.encoders.registry import Encoder, build_encoder, locate_weights, missing_weights_error
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.embeddings import open_embeddings
from hinge_cli.formats.tiles import Tiles, read_tiles
from hinge_cli.predict.trained import TrainedModel
from hinge_cli.run.directory import Run
from hinge_cli.slide.tiling import tile_sample

log = logging.getLogger(__name__)


class Target(NamedTuple):
    """One sample to predict: a new slide (tiled on demand) or, with slide None, a sample already in the run; `hd`: the
    spots are a Visium HD capture area's bins, whose output takes the bin size's own coordinates and scale factors."""

    sample_id: str
    slide: Path | None = None
    spots: Path | None = None
    mpp: float | None = None
    hd: HDBins | None = None

    def tile_config(self, trained: TileConfig) -> TileConfig:
        """How this target is tiled: as the model was trained, and for bins with the bin as the spot, keeping no pixels
        (encoders read the slide around each bin: a patch per bin would be gigabytes)."""
        if self.hd is None:
            return trained
        return replace(trained, images=False, spot_um=float(self.hd.bin_um), pitch_um=float(self.hd.bin_um))


def _tile_differences(run: Run, target: Target, cfg: TileConfig, tiles: Tiles) -> list[str]:
    """How the sample's existing `tiles` differ from what `target` with the checkpoint's tiling would give."""
    made = tiles.attrs.to_h5()
    wanted: dict[str, Any] = {"mpp_target": cfg.target_mpp, "patch_px": cfg.patch_px}
    if target.slide is not None:
        wanted |= {"slide": str(Path(target.slide).resolve()), "mode": "spots" if target.spots is not None else "grid",
                   "spot_um": cfg.spot_um}
        if target.spots is None:
            wanted |= {"grid": cfg.grid, "pitch_um": cfg.pitch_um}
    diffs = [f"{k} {made.get(k)} (wanted {v})" for k, v in wanted.items()
             if (str(made.get(k)) != str(v) if isinstance(v, str) else float(made.get(k, np.nan)) != float(v))]
    if target.spots is not None:
        recorded = run.stage(target.sample_id, "tile").get("inputs", {}).get("spots", {})
        now = describe_input(Path(target.spots))
        if recorded.get("path") != now["path"]:
            diffs.append(f"spots {recorded.get('path')} (wanted {now['path']})")
        elif recorded.get("sha256") and now.get("sha256") and recorded["sha256"] != now["sha256"]:
            diffs.append(f"the spots in {now['path']} changed since they were tiled")  # e.g. Space Ranger run again
    return diffs


def ensure_tiles(run: Run, target: Target, cfg: TileConfig, overwrite: bool, progress: Progress = SILENT) -> tuple[Tiles, bool]:
    """The sample's tiles, read once: a new slide is tiled with the checkpoint's settings unless matching, finished tiles
    are cached; with whether it was tiled now. Tiles a killed job left without their record are unfinished work: tiled
    again (damaged or altered recorded ones are the readers' to refuse)."""
    path = run.tiles(target.sample_id)
    cached = path.exists()
    if cached and target.slide is not None and run.stage(target.sample_id, "tile").get("status") != "ok":
        log.info("%s: its tiles were left by a job that did not finish: tiling again", target.sample_id)
    elif cached:
        tiles = read_tiles(path)
        diffs = _tile_differences(run, target, cfg, tiles)
        if not diffs:
            return tiles, False
        if target.slide is None or not overwrite:
            fix = (f"pass {setting('overwrite')} to re-tile it, or {setting('sample-id', 'NEW')} to keep both" if target.slide is not None
                   else f"predict from the slide instead: {setting('slide', 'SLIDE')} {setting('sample-id', 'NEW')}")
            raise HingeError(f"{target.sample_id}: cached tiles differ from what this checkpoint needs: {'; '.join(diffs)}", fix)
    elif target.slide is None:
        raise HingeError(f"sample {target.sample_id} is not tiled in {run.root}",
                         f"give its slide with {setting('slide')} (or check {setting('run')} and the sample id)")
    tile_sample(run, SampleSpec(target.sample_id, Path(target.slide), target.spots, target.mpp), cfg, progress,
                register_expression=False)
    return read_tiles(path), True


class Encoders:
    """The checkpoint's encoders, built on first use (cached embeddings need none) and checked against training's weights."""

    def __init__(self, model: TrainedModel, weights: Sequence[str], device: str):
        self.model = model
        self.specs = model.specs
        self.paths = parse_weights(weights, self.specs) if weights else {}
        self.device = device
        self._built: list[Encoder] | None = None

    def check_available(self) -> None:
        for spec in self.specs:
            if spec.needs_weights and locate_weights(spec, self.paths.get(spec.name)) is None:
                raise missing_weights_error(spec)

    def get(self) -> list[Encoder]:
        if self._built is None:
            self.check_available()
            built = [build_encoder(s.name, self.paths.get(s.name), self.device) for s in self.specs]
            for enc, trained in zip(built, self.model.trained_weights(), strict=False):  # older cards list no weights
                if trained and enc.weights_sha256 != trained:
                    raise HingeError(f"weights {enc.weights} of encoder '{enc.spec.name}' are not those the model was trained with "
                                     f"(sha256 {enc.weights_sha256[:12]}..., trained {trained[:12]}...)",
                                     f"pass the training weights with {setting('weights')} {enc.spec.name}=FILE")
            self._built = built
        return self._built


def ensure_embeddings(run: Run, sample: str, tiles: Tiles, model: TrainedModel, encoders: Encoders, retiled: bool,
                      overwrite: bool, progress: Progress = SILENT) -> Path:
    """The sample's features under the checkpoint's encoder key, computed unless cached and matching its `tiles`."""
    path = run.embeddings(model.key, sample)
    unfinished = path.exists() and run.stage(sample, f"embed:{model.key}").get("status") != "ok"
    if unfinished:
        log.info("%s: its features were left by a job that did not finish: embedding again", sample)
    if path.exists() and not retiled and not unfinished:
        with open_embeddings(path) as src:
            shape, barcodes = src.shape, src.barcodes()
        if barcodes == tiles.barcodes and shape[-1] == model.net.image_dim:
            return path
        if not overwrite:
            raise HingeError(f"{path} does not match {sample}'s tiles or the model ({shape[0]} spots x {shape[-1]} dims; "
                             f"tiles {len(tiles.barcodes)} spots, model {model.net.image_dim} dims)",
                             f"pass {setting('overwrite')} to embed the sample again")
    embed_sample(run, sample, encoders.get(), model.embed_config(encoders.device), progress)
    return path
