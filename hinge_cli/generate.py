"""`hinge generate`: a slide (or a sample already in the run) in, an AnnData of predicted expression out.

The slide is tiled and embedded with exactly the settings the checkpoint records,
caching both in the run like `hinge tile`/`hinge embed` do. The reverse process then
runs in batches of spots, each batch written straight into the output's datasets, so
memory stays at one batch plus per-spot metadata however many spots a slide has. The
file is written under a lock to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from hinge_cli import __version__
from hinge_cli.config import EmbedConfig, TileConfig, TissueConfig
from hinge_cli.data.features import FeatureNorm, prediction_view
from hinge_cli.devices import resolve_device
from hinge_cli.embed import TileSet, embed_sample, encoder_key, parse_weights
from hinge_cli.encoders import Encoder, EncoderSpec, build_encoder, locate_weights, missing_weights_error, parse_encoders
from hinge_cli.errors import HingeError
from hinge_cli.model import Hinge, load_checkpoint
from hinge_cli.figures import MapPanel, expression_unit, spot_maps
from hinge_cli.progress import SILENT, Progress
from hinge_cli.files import OutputLocked, atomic_path, output_lock, remove_stale_temporaries
from hinge_cli.run import Run, Shard
from hinge_cli.slide.reader import open_slide
from hinge_cli.tile import SampleSpec, tile_sample

log = logging.getLogger(__name__)

HIRES_MAX_SIDE = 2000  # the side of Space Ranger's "hires" image, which scanpy users expect
MPP_TOLERANCE = 0.25  # relative µm/px difference from the training slides that earns a warning
CHUNK_ROWS = 256


@dataclass
class GenerateOptions:
    """What `hinge generate` does beyond choosing samples; defaults match the command line."""

    checkpoint: Path | None = None  # None: the run's best checkpoint
    n_samples: int = 8
    steps: int | None = None  # None: every step of the trained schedule
    seed: int = 0
    batch_size: int = 64  # spots per reverse-process batch (each runs n_samples rows)
    device: str = "auto"
    keep_samples: bool = False
    plot: Sequence[str] = ()
    weights: Sequence[str] = ()
    overwrite: bool = False


class Target(NamedTuple):
    """One sample to predict: a new slide (tiled on demand) or, with slide None, a sample already in the run."""

    sample_id: str
    slide: Path | None = None
    spots: Path | None = None
    mpp: float | None = None


@dataclass
class GenerateSummary:
    done: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"predicted {len(self.done)}, skipped {len(self.skipped)} (output exists; --overwrite to redo)"]
        out += [f"  {sample}: {path}" for sample, path in {**self.done, **self.skipped}.items()]
        return out


@dataclass
class Model:
    """A trained checkpoint, checked to be self-consistent, with what generation needs from its sidecar."""

    path: Path
    net: Hinge
    meta: dict[str, Any]
    device: torch.device

    @property
    def extra(self) -> dict[str, Any]:
        return self.meta["extra"]

    @property
    def genes(self) -> list[str]:
        return list(self.meta["genes"])

    @property
    def specs(self) -> list[EncoderSpec]:
        return parse_encoders(",".join(self.meta["encoder"]))

    @property
    def key(self) -> str:
        return str(self.extra["encoder_key"])

    @property
    def norm(self) -> FeatureNorm:
        return FeatureNorm.from_dict(self.extra["feature_norm"])

    def tile_config(self) -> TileConfig:
        """The tiling the training samples were cut with: their recorded settings over the run config of that time."""
        base = dict(self.extra.get("config", {}).get("tile", {}))
        tissue = TissueConfig(**base.pop("tissue", {}))
        made = self.extra["tile"]
        settings = {k: made[k] for k in ("target_mpp", "patch_px", "spot_um", "pitch_um", "grid")}
        needs_patches = any(f.mpp is None for spec in self.specs for f in spec.fields)
        return TileConfig(**{**base, **settings, "images": needs_patches, "tissue": tissue})

    def embed_config(self, device: str) -> EmbedConfig:
        """Training's encoder settings; kept views were augmentations, so prediction needs only the original."""
        base = dict(self.extra.get("config", {}).get("embed", {}))
        made = self.extra.get("embed", {})
        averaged = int(made.get("views", 1)) > 1 and not bool(made.get("views_kept", False))
        return EmbedConfig(**{**base, "encoder": ",".join(self.meta["encoder"]), "views": 8 if averaged else 1,
                              "average_views": averaged, "device": device})

    def trained_weights(self) -> list[str | None]:
        recorded = self.extra.get("embed", {}).get("weights_sha256", "[]")
        return json.loads(recorded) if isinstance(recorded, str) else list(recorded)


def load_model(path: Path, device: str = "auto") -> Model:
    """Load a HINGE checkpoint and check that its sidecar describes its weights (panel, encoder, features)."""
    dev = resolve_device(device)
    loaded = load_checkpoint(path, device=dev)
    meta = loaded.meta
    if meta.get("kind") != "hinge" or not isinstance(loaded.model, Hinge):
        raise HingeError(f"{path} is a bare backbone, not a trained HINGE model",
                         "use checkpoints/best.safetensors after `hinge train`")
    net: Hinge = loaded.model
    extra = meta.get("extra", {})
    missing = [k for k in ("encoder_key", "feature_norm", "tile") if k not in extra]
    missing += [] if meta.get("encoder") else ["encoder"]
    if missing:
        raise HingeError(f"{path} does not record {', '.join(missing)}",
                         "use a checkpoint written by `hinge pretrain-warmup` or `hinge train`")
    genes = meta.get("genes") or []
    if len(genes) != net.n_genes or len(set(genes)) != len(genes):
        raise HingeError(f"{path}: the sidecar lists {len(genes)} panel genes but the weights predict {net.n_genes}",
                         "keep each checkpoint's .json beside its own .safetensors")
    model = Model(Path(path), net, meta, dev)
    specs = model.specs
    if model.key != encoder_key(specs):
        raise HingeError(f"{path}: encoder key {model.key} does not match its encoders {meta['encoder']}",
                         "re-create the checkpoint")
    dim = sum(s.dim for s in specs)
    if dim != net.image_dim or len(model.norm.mean) != net.image_dim:
        raise HingeError(f"{path}: encoder {model.key} gives {dim}-dim features, the model takes {net.image_dim}",
                         "train the model on features of the encoder its sidecar names")
    return model


# ----------------------------------------------------------------------------- inputs


def _tile_differences(run: Run, target: Target, cfg: TileConfig) -> list[str]:
    """How the sample's existing tiles differ from what `target` with the checkpoint's tiling would give."""
    with h5py.File(run.tiles(target.sample_id), "r") as h5:
        made = dict(h5.attrs)
    wanted: dict[str, Any] = {"mpp_target": cfg.target_mpp, "patch_px": cfg.patch_px}
    if target.slide is not None:
        wanted["slide"] = str(Path(target.slide).resolve())
        wanted["mode"] = "spots" if target.spots is not None else "grid"
        if target.spots is None:
            wanted |= {"grid": cfg.grid, "pitch_um": cfg.pitch_um, "spot_um": cfg.spot_um}
    diffs = [f"{k} {made.get(k)} (wanted {v})" for k, v in wanted.items()
             if (str(made.get(k)) != str(v) if isinstance(v, str) else float(made.get(k, np.nan)) != float(v))]
    if target.spots is not None:
        recorded = run.stage(target.sample_id, "tile").get("inputs", {}).get("spots", {}).get("path")
        if recorded != str(Path(target.spots).resolve()):
            diffs.append(f"spots {recorded} (wanted {Path(target.spots).resolve()})")
    return diffs


def ensure_tiles(run: Run, target: Target, cfg: TileConfig, overwrite: bool, progress: Progress = SILENT) -> bool:
    """Tile a new slide with the checkpoint's settings unless matching tiles are cached; True if tiled now."""
    if run.tiles(target.sample_id).exists():
        diffs = _tile_differences(run, target, cfg)
        if not diffs:
            return False
        if target.slide is None or not overwrite:
            fix = ("pass --overwrite to re-tile it, or --sample-id NEW to keep both" if target.slide is not None
                   else "predict from the slide instead: --slide SLIDE --sample-id NEW")
            raise HingeError(f"{target.sample_id}: cached tiles differ from what this checkpoint needs: {'; '.join(diffs)}", fix)
    elif target.slide is None:
        raise HingeError(f"sample {target.sample_id} is not tiled in {run.root}",
                         "give its slide with --slide (or check --run and the sample id)")
    tile_sample(run, SampleSpec(target.sample_id, Path(target.slide), target.spots, target.mpp), cfg, progress,
                register_expression=False)
    return True


class Encoders:
    """The checkpoint's encoders, built on first use (cached embeddings need none) and checked against training's weights."""

    def __init__(self, model: Model, weights: Sequence[str], device: str):
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
            for enc, trained in zip(built, self.model.trained_weights()):
                if trained and enc.weights_sha256 != trained:
                    raise HingeError(f"weights {enc.weights} of encoder '{enc.spec.name}' are not those the model was trained with "
                                     f"(sha256 {enc.weights_sha256[:12]}..., trained {trained[:12]}...)",
                                     f"pass the training weights with --weights {enc.spec.name}=FILE")
            self._built = built
        return self._built


def ensure_embeddings(run: Run, sample: str, model: Model, encoders: Encoders, retiled: bool, overwrite: bool,
                      progress: Progress = SILENT) -> Path:
    """The sample's features under the checkpoint's encoder key, computed unless cached and matching the tiles."""
    path = run.embeddings(model.key, sample)
    if path.exists() and not retiled:
        tiles = TileSet.read(run.tiles(sample))
        with h5py.File(path, "r") as h5:
            shape = h5["embeddings"].shape
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in h5["barcodes"][()]]
        if barcodes == tiles.barcodes and shape[-1] == model.net.image_dim:
            return path
        if not overwrite:
            raise HingeError(f"{path} does not match {sample}'s tiles or the model ({shape[0]} spots x {shape[-1]} dims; "
                             f"tiles {len(tiles.barcodes)} spots, model {model.net.image_dim} dims)",
                             "pass --overwrite to embed the sample again")
    embed_sample(run, sample, encoders.get(), model.embed_config(encoders.device), progress)
    return path


# ----------------------------------------------------------------------------- output


@dataclass
class SpotSheet:
    """Per-spot metadata of a tiled sample (small: no pixels, no features)."""

    barcodes: list[str]
    coords: np.ndarray  # (N, 2) level-0 px
    tissue_frac: np.ndarray
    attrs: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> SpotSheet:
        with h5py.File(path, "r") as h5:
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in h5["barcode"][()]]
            return cls(barcodes, h5["coords"][()].astype(np.float64), h5["tissue_frac"][()].astype(np.float32), dict(h5.attrs))


def hires_image(slide_path: Path, mpp: float) -> tuple[np.ndarray, float]:
    """The whole slide downsampled to about HIRES_MAX_SIDE px, and its scale factor from level-0 px."""
    if not Path(slide_path).exists():
        raise HingeError(f"the slide {slide_path} is gone; the output needs its image", "restore the slide at that path")
    with open_slide(slide_path, mpp) as slide:
        width, height = slide.dimensions
        image = slide.thumbnail(max(1.0, max(width, height) / HIRES_MAX_SIDE))
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8), image.shape[1] / width


def _dense(h5: h5py.Group, name: str, shape: tuple[int, ...]) -> h5py.Dataset:
    """An empty float32 array in AnnData's on-disk encoding, chunked by spots, to be filled batch by batch."""
    chunks = (max(1, min(shape[0], CHUNK_ROWS)), *shape[1:]) if shape[0] else None
    ds = h5.create_dataset(name, shape=shape, dtype=np.float32, chunks=chunks)
    ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return ds


def write_skeleton(path: Path, sample: str, spots: SpotSheet, genes: list[str], image: np.ndarray, scalef: float,
                   spot_diameter: float, provenance: dict[str, Any]) -> None:
    """Everything but the predictions, written by anndata itself so the encoding is its own."""
    adata = ad.AnnData(
        obs=pd.DataFrame({"in_tissue": spots.tissue_frac}, index=pd.Index(spots.barcodes, dtype=str)),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
        obsm={"spatial": spots.coords},
        uns={
            "spatial": {sample: {
                "images": {"hires": image},
                "scalefactors": {"tissue_hires_scalef": float(scalef), "spot_diameter_fullres": float(spot_diameter)},
            }},
            "hinge": provenance,
        },
    )
    adata.write_h5ad(path)


def _provenance(model: Model, opts: GenerateOptions, steps: int, spots: SpotSheet, encoders_sha: list[str]) -> dict[str, Any]:
    a = spots.attrs
    return {
        "version": __version__, "checkpoint": str(model.path.resolve()), "checkpoint_sha256": model.meta["sha256"],
        "encoders": list(model.meta["encoder"]), "encoder_key": model.key, "encoder_weights_sha256": encoders_sha,
        "n_genes": model.net.n_genes, "transform": model.meta["transform"], "steps": steps, "samples": opts.n_samples,
        "seed": opts.seed, "fill": model.net.diffusion.fill, "slide": str(a.get("slide", "")), "mpp": float(a["mpp_source"]),
        "tile_mode": str(a.get("mode", "")), "target_mpp": float(a["mpp_target"]), "patch_px": int(a["patch_px"]),
    }


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def predict_sample(run: Run, sample: str, model: Model, out: Path, opts: GenerateOptions, progress: Progress = SILENT) -> dict:
    """Run the reverse process over one embedded sample and write `out`; returns the manifest record."""
    started = time.time()
    spots = SpotSheet.read(run.tiles(sample))
    emb_path = run.embeddings(model.key, sample)
    genes = model.genes
    plot_cols = [genes.index(g) for g in opts.plot]
    n, g, s = len(spots.barcodes), len(genes), opts.n_samples
    steps = opts.steps or model.net.diffusion.steps
    mpp = float(spots.attrs["mpp_source"])
    image, scalef = hires_image(Path(str(spots.attrs["slide"])), mpp)
    with h5py.File(emb_path, "r") as src:
        weights_sha = [w or "none" for w in json.loads(src.attrs.get("weights_sha256", "[]"))]
    provenance = _provenance(model, opts, steps, spots, weights_sha)
    spot_diameter = float(spots.attrs["spot_um"]) / mpp
    maps = np.zeros((2, n, len(plot_cols)), np.float32)
    norm = model.norm
    with output_lock(out):
        remove_stale_temporaries(out)
        run.record_stage(sample, "generate", "running", params={**provenance, "output": str(out.resolve())})
        with atomic_path(out) as tmp:
            write_skeleton(tmp, sample, spots, genes, image, scalef, spot_diameter, provenance)
            with h5py.File(tmp, "r+") as h5, h5py.File(emb_path, "r") as src:
                mean_ds, std_ds = _dense(h5, "X", (n, g)), _dense(h5["layers"], "std", (n, g))
                draws_ds = _dense(h5["obsm"], "samples", (n, s, g)) if opts.keep_samples else None
                features = src["embeddings"]
                with progress.task(f"{sample}: sampling", n) as advance:
                    for start in range(0, n, opts.batch_size):
                        stop = min(n, start + opts.batch_size)
                        x = torch.from_numpy(norm(prediction_view(features[start:stop]))).to(model.device)
                        with _autocast(model.device):
                            out_b = model.net.generate(x, n_samples=s, steps=steps, seed=opts.seed,
                                                       spot_index=torch.arange(start, stop), keep_samples=opts.keep_samples)
                        mean, std = out_b.mean.float().cpu().numpy(), out_b.std.float().cpu().numpy()
                        mean_ds[start:stop], std_ds[start:stop] = mean, std
                        maps[:, start:stop] = mean[:, plot_cols], std[:, plot_cols]
                        if draws_ds is not None:
                            draws_ds[start:stop] = out_b.samples.float().cpu().numpy()
                        advance(stop - start)
        plots = [str(p) for p in _plots(out, sample, opts.plot, maps, image, spots.coords * scalef, spot_diameter * scalef,
                                        expression_unit(**provenance["transform"]))]
        record = {"output": str(out.resolve()), "n_spots": n, "n_genes": g, "seconds": round(time.time() - started, 2),
                  "checkpoint_sha256": model.meta["sha256"], "plots": plots}
        run.record_stage(sample, "generate", "ok", **record)
    log.info("%s: %d spots x %d genes -> %s in %.1fs", sample, n, g, out, record["seconds"])
    return record


def _plots(out: Path, sample: str, genes: Sequence[str], maps: np.ndarray, image: np.ndarray, xy: np.ndarray,
           diameter: float, unit: str) -> list[Path]:
    """One PNG per gene beside the output: H&E, predicted mean and spread over samples, each with its colour bar."""
    paths = []
    for k, gene in enumerate(genes):
        panels = [MapPanel("predicted mean", maps[0, :, k], unit), MapPanel("std over samples", maps[1, :, k], unit)]
        paths.append(spot_maps(out.with_name(f"{out.stem}_{gene}.png"), xy, diameter, panels, f"{sample}: {gene}", image,
                               image_panel=True))
    return paths


# ----------------------------------------------------------------------------- stage


def output_paths(run: Run, samples: Sequence[str], out: Path | None) -> dict[str, Path]:
    """One .h5ad per sample: `out` itself for a single sample named *.h5ad, else `<out>/<sample>.h5ad`."""
    if out is None:
        return {s: run.prediction(s) for s in samples}
    out = Path(out)
    if out.suffix == ".h5ad":
        if len(samples) > 1:
            raise HingeError(f"--out {out} is one file but {len(samples)} samples are asked for",
                             "give a folder as --out; each sample is written to <folder>/<sample>.h5ad")
        return {samples[0]: out}
    if out.exists() and not out.is_dir():
        raise HingeError(f"--out {out} is an existing file that is not .h5ad", "give a .h5ad path, or a folder")
    return {s: out / f"{s}.h5ad" for s in samples}


def _check_mpp(run: Run, sample: str, model: Model) -> None:
    with h5py.File(run.tiles(sample), "r") as h5:
        mpp = float(h5.attrs["mpp_source"])
    trained = float(model.extra["tile"]["mpp_source"])
    if abs(mpp / trained - 1) > MPP_TOLERANCE:
        log.warning("%s: the slide has %.3g µm/px, the training slides %.3g µm/px; patches are resampled to %.3g µm/px "
                    "but a different scanner or magnification may still shift the predictions",
                    sample, mpp, trained, model.extra["tile"]["target_mpp"])


def generate(run: Run, targets: Sequence[Target], opts: GenerateOptions, out: Path | None = None, shard: Shard = Shard(),
             progress: Progress = SILENT) -> GenerateSummary:
    """Predict this shard's share of `targets`: tile and embed new slides as the checkpoint was trained, then sample."""
    if opts.n_samples < 1:
        raise HingeError(f"--samples {opts.n_samples} must be at least 1", "give e.g. --samples 8")
    if opts.batch_size < 1:
        raise HingeError(f"--batch-size {opts.batch_size} must be at least 1", "give e.g. --batch-size 64")
    ids = [t.sample_id for t in targets]
    if not ids or len(set(ids)) != len(ids):
        raise HingeError("no samples, or a sample id given twice", "give each slide or --sample-id once")
    by_id = {t.sample_id: t for t in targets}
    paths = output_paths(run, sorted(ids), out)
    mine = shard.select(ids)
    summary = GenerateSummary()
    todo = []
    for sample in mine:
        if paths[sample].exists() and not opts.overwrite:
            if len(ids) == 1:
                raise HingeError(f"{paths[sample]} exists", "pass --overwrite to replace it, or choose another --out")
            summary.skipped[sample] = str(paths[sample])
        else:
            todo.append(sample)
    if not todo:
        return summary
    checkpoint = Path(opts.checkpoint) if opts.checkpoint is not None else run.checkpoint("best")
    if not checkpoint.exists():
        raise HingeError(f"no trained model at {checkpoint}", "run `hinge train` first, or pass --checkpoint PATH")
    model = load_model(checkpoint, opts.device)
    unknown = [gene for gene in opts.plot if gene not in model.genes]
    if unknown:
        raise HingeError(f"--plot genes not in the model's panel: {', '.join(unknown)}",
                         f"choose among the {len(model.genes)} panel genes, e.g. {', '.join(model.genes[:5])}")
    model.net.schedule.grid(opts.steps)  # an impossible --steps fails now, not after tiling
    encoders = Encoders(model, opts.weights, opts.device)
    if any(not run.embeddings(model.key, s).exists() for s in todo):
        encoders.check_available()  # before any tiling: a missing download is the likeliest failure
    tile_cfg = model.tile_config()
    with progress.task("samples", len(todo)) as advance:
        for sample in todo:
            try:
                retiled = ensure_tiles(run, by_id[sample], tile_cfg, opts.overwrite, progress)
                _check_mpp(run, sample, model)
                ensure_embeddings(run, sample, model, encoders, retiled, opts.overwrite, progress)
                predict_sample(run, sample, model, paths[sample], opts, progress)
            except Exception as exc:
                if not isinstance(exc, OutputLocked):
                    run.record_stage(sample, "generate", "failed", error=str(exc))
                raise
            summary.done[sample] = str(paths[sample])
            advance(1)
    return summary
