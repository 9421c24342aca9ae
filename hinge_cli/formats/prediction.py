"""The prediction file, an AnnData `.h5ad` scanpy reads: the point prediction in X, the predictive
spread in layers['std'] and its 5% and 95% quantiles in layers['q05'] and layers['q95'], and the
draws themselves (spots, draws, genes) in obsm['samples'] when kept. A prediction given measured
genes (`generate --given`) marks them in var['given'] (bool) and counts them per spot in obs['n_given'].

A ridge baseline's file is `<name>.ridge.h5ad` beside HINGE's `<name>.h5ad`; files written before
ridge had a predictive distribution have no spread layers.

anndata writes everything but the predictions (obs `in_tissue` 0/1 as in Visium, obs `tissue_fraction`,
obsm `spatial`, the images and scale
factors in uns['spatial'] (`SpatialFrame`), provenance in uns['hinge']); the predictions are then streamed into float32
datasets in anndata's own dense encoding, chunked by spots, so no slide's predictions sit in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from hinge_cli.formats.hdf5 import open_for_writing

CHUNK_ROWS = 256
IN_TISSUE_FRACTION = 0.5  # a spot is in tissue (Visium's in_tissue == 1) when at least half its disc is


@dataclass(frozen=True)
class PredictionSpots:
    """What the output keeps of each spot besides its predictions."""

    barcodes: list[str]
    coords: np.ndarray  # (N, 2) level-0 px
    tissue_fraction: np.ndarray  # (N,) fraction of the spot's disc on detected tissue
    n_given: np.ndarray | None = None  # (N,) genes given per spot, with `generate --given`
    in_tissue: np.ndarray | None = None  # (N,) 0/1 where another tool called it (Space Ranger's bins); else from the fraction


@dataclass(frozen=True)
class SpatialFrame:
    """uns['spatial'][sample] as Visium writes it: the images (hires, and lowres where there is one) and the scale
    factors, in Space Ranger's keys, that take obsm['spatial']'s pixels to theirs (tissue_hires_scalef) and give a
    spot's or bin's side in them (spot_diameter_fullres)."""

    images: dict[str, np.ndarray]
    scalefactors: dict[str, float]

    @classmethod
    def of_slide(cls, image: np.ndarray, scalef: float, spot_diameter: float) -> SpatialFrame:
        """A slide's frame: its downsampled picture, and the spot size in its level-0 pixels."""
        return cls({"hires": image}, {"tissue_hires_scalef": float(scalef), "spot_diameter_fullres": float(spot_diameter)})

    @property
    def hires(self) -> np.ndarray:
        return self.images["hires"]

    @property
    def hires_scale(self) -> float:
        return self.scalefactors["tissue_hires_scalef"]

    @property
    def spot_diameter(self) -> float:
        return self.scalefactors["spot_diameter_fullres"]


def _dense(h5: h5py.Group, name: str, shape: tuple[int, ...]) -> h5py.Dataset:
    """An empty float32 array in AnnData's on-disk encoding, chunked by spots, to be filled batch by batch."""
    chunks = (max(1, min(shape[0], CHUNK_ROWS)), *shape[1:]) if shape[0] else None
    ds = h5.create_dataset(name, shape=shape, dtype=np.float32, chunks=chunks)
    ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return ds


def write_skeleton(path: Path, sample: str, spots: PredictionSpots, genes: Sequence[str], frame: SpatialFrame,
                   provenance: dict[str, Any], given: np.ndarray | None = None) -> None:
    """Everything but the predictions, written by anndata itself so the encoding is its own; `given` (G,) bool."""
    in_tissue = spots.tissue_fraction >= IN_TISSUE_FRACTION if spots.in_tissue is None else spots.in_tissue
    obs = {"in_tissue": np.asarray(in_tissue).astype(np.int64), "tissue_fraction": spots.tissue_fraction}
    if spots.n_given is not None:
        obs["n_given"] = np.asarray(spots.n_given, dtype=np.int64)
    adata = ad.AnnData(
        obs=pd.DataFrame(obs, index=pd.Index(spots.barcodes, dtype=str)),
        var=pd.DataFrame({} if given is None else {"given": np.asarray(given, dtype=bool)}, index=pd.Index(list(genes), dtype=str)),
        obsm={"spatial": spots.coords},
        uns={
            "spatial": {sample: {"images": dict(frame.images), "scalefactors": {k: float(v) for k, v in frame.scalefactors.items()}}},
            "hinge": provenance,
        },
    )
    adata.write_h5ad(path)


SPREAD_LAYERS = ("std", "q05", "q95")


@dataclass(frozen=True)
class PredictedBatch:
    """One batch of spots' predictions: the point prediction, and the spread layers and draws where the model has them."""

    mean: np.ndarray  # (B, G)
    std: np.ndarray | None = None  # (B, G) spread of the predictive distribution
    q05: np.ndarray | None = None
    q95: np.ndarray | None = None
    draws: np.ndarray | None = None  # (B, S, G)

    def censored(self, floor: float) -> PredictedBatch:
        """A Gaussian's layers censored at the model space's floor: draws and quantiles below it are moved to it, where
        they read as what they are, no expression (its mean and std stay the model's own)."""
        def clip(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else np.maximum(values, np.float32(floor))

        return replace(self, q05=clip(self.q05), q95=clip(self.q95), draws=clip(self.draws))


class PredictionWriter:
    """The prediction datasets of an open output, filled a batch of spots at a time."""

    def __init__(self, h5: h5py.File, n_spots: int, n_genes: int, n_draws: int | None, with_spread: bool = True):
        self._mean = _dense(h5, "X", (n_spots, n_genes))
        self._spread = {name: _dense(h5["layers"], name, (n_spots, n_genes)) for name in SPREAD_LAYERS} if with_spread else {}
        self._draws = _dense(h5["obsm"], "samples", (n_spots, n_draws, n_genes)) if n_draws else None

    def write(self, start: int, stop: int, batch: PredictedBatch) -> None:
        """Spots start:stop; the spread layers unless the file has none, the draws only when it keeps them."""
        self._mean[start:stop] = batch.mean
        for name, dataset in self._spread.items():
            dataset[start:stop] = getattr(batch, name)
        if self._draws is not None:
            self._draws[start:stop] = batch.draws


@contextmanager
def write_prediction(path: Path, sample: str, spots: PredictionSpots, genes: Sequence[str], frame: SpatialFrame,
                     provenance: dict[str, Any],
                     keep_draws: int | None = None, with_spread: bool = True,
                     given: np.ndarray | None = None) -> Iterator[PredictionWriter]:
    """Write the skeleton, then hand out the writer for the predictions (and `keep_draws` draws per spot if given)."""
    write_skeleton(path, sample, spots, genes, frame, provenance, given)
    with open_for_writing(path, "r+") as h5:
        yield PredictionWriter(h5, len(spots.barcodes), len(genes), keep_draws, with_spread)


def ridge_prediction_path(prediction: Path) -> Path:
    """Where the ridge baseline's prediction of the same sample goes: `<name>.ridge.h5ad` beside `<name>.h5ad`."""
    prediction = Path(prediction)
    return prediction.with_name(f"{prediction.stem}.ridge.h5ad")
