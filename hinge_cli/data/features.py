"""Image features as the model sees them: one standardisation, fitted on training spots only,
optionally after each slide is standardised by its own spots.

Training, validation and generation all go through `FeatureNorm` and `views`, so a
checkpoint's recorded statistics are applied identically wherever features enter.
Slide standardisation (`SlideShift`) uses every embedded spot of a slide and no expression,
so a new slide is shifted exactly as a training slide was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.embeddings import EmbeddingReader, open_embeddings

log = logging.getLogger(__name__)

FEW_SLIDE_SPOTS = 30  # below this, a slide's mean and std are noisy enough to warn about
CHUNK_SPOTS = 1024  # slide moments are accumulated in chunks of this many spots, the same from memory or from file


@dataclass
class FeatureNorm:
    """Per-dimension standardisation of image features, fitted on training spots only.

    With `per_slide`, the features it is fitted on and applied to have first been standardised
    slide by slide (`SlideShift`); old model cards, which lack the flag, did not."""

    mean: np.ndarray
    std: np.ndarray
    per_slide: bool = False

    @classmethod
    def fit(cls, features: np.ndarray, per_slide: bool = False) -> FeatureNorm:
        flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
        return cls(flat.mean(0).astype(np.float32), np.maximum(flat.std(0), 1e-6).astype(np.float32), per_slide)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float] | bool]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "per_slide": self.per_slide}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureNorm:
        return cls(np.asarray(data["mean"], np.float32), np.asarray(data["std"], np.float32), bool(data.get("per_slide", False)))


@dataclass(frozen=True)
class SlideShift:
    """One slide's feature mean and std over all its embedded spots and views.

    Stain, scanner and section thickness move every patch of a slide the same way; an encoder's
    features carry that shift, and a model fitted across slides reads it as expression (on HER2ST
    it shifts whole held-out sections). Standardising each slide by its own spots removes it."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64
    n_spots: int

    @classmethod
    def fit(cls, features: np.ndarray, what: str = "the slide") -> SlideShift:
        return cls._accumulate(_chunks(lambda i, j: features[i:j], len(features)), what)

    @classmethod
    def read(cls, source: Path | EmbeddingReader, what: str = "the slide") -> SlideShift:
        """The shift of the slide whose embeddings are at `source` (a path, or a file already open), read a chunk of
        spots at a time."""
        if isinstance(source, EmbeddingReader):
            return cls._accumulate(_chunks(source.rows, source.shape[0]), what)
        with open_embeddings(source) as src:
            return cls.read(src, what)

    @classmethod
    def _accumulate(cls, chunks: Iterable[np.ndarray], what: str) -> SlideShift:
        """Mean and variance merged chunk by chunk (Chan et al.), stable however far the mean is from zero."""
        n_spots, count, mean, m2 = 0, 0, 0.0, 0.0
        for chunk in chunks:
            flat = views(np.asarray(chunk)).reshape(-1, chunk.shape[-1]).astype(np.float64)
            n_spots += len(chunk)
            c_mean = flat.mean(0)
            total = count + len(flat)
            delta = c_mean - mean
            mean = mean + delta * len(flat) / total
            m2 = m2 + ((flat - c_mean) ** 2).sum(0) + delta ** 2 * count * len(flat) / total
            count = total
        if n_spots < 2:
            raise HingeError(f"{what} has {n_spots} embedded spot(s); standardising features by slide needs at least 2",
                             f"predict whole slides, or train with {setting('feature-norm')} training, which standardises by the training spots alone")
        if n_spots < FEW_SLIDE_SPOTS:
            log.warning("%s has only %d embedded spots: its feature mean and std, which standardise it, are noisy "
                        "(models trained with --feature-norm training do without them)", what, n_spots)
        return cls(mean, np.maximum(np.sqrt(m2 / count), 1e-6), n_spots)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)


def _chunks(rows: Callable[[int, int], np.ndarray], n: int) -> Iterator[np.ndarray]:
    """Rows [0, n) in chunks of CHUNK_SPOTS, so moments from memory and from file add up in the same order."""
    return (rows(i, min(n, i + CHUNK_SPOTS)) for i in range(0, n, CHUNK_SPOTS))


def views(features: np.ndarray) -> np.ndarray:
    """(N, D) or (N, V, D) -> (N, V, D): stored views are training augmentations."""
    return features[:, None, :] if features.ndim == 2 else features


def prediction_view(features: np.ndarray) -> np.ndarray:
    """The (N, D) features a prediction uses: the original orientation (view 0), as in validation."""
    return views(features)[:, 0]
