"""Image features as the model sees them: one standardisation, fitted on training spots only.

Training, validation and generation all go through `FeatureNorm` and `views`, so a
checkpoint's recorded statistics are applied identically wherever features enter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureNorm:
    """Per-dimension standardisation of image features, fitted on training spots only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureNorm:
        flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
        return cls(flat.mean(0).astype(np.float32), np.maximum(flat.std(0), 1e-6).astype(np.float32))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> FeatureNorm:
        return cls(np.asarray(data["mean"], np.float32), np.asarray(data["std"], np.float32))


def views(features: np.ndarray) -> np.ndarray:
    """(N, D) or (N, V, D) -> (N, V, D): stored views are training augmentations."""
    return features[:, None, :] if features.ndim == 2 else features


def prediction_view(features: np.ndarray) -> np.ndarray:
    """The (N, D) features a prediction uses: the original orientation (view 0), as in validation."""
    return views(features)[:, 0]
