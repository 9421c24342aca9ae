"""The ridge baseline's file, `checkpoints/ridge.safetensors`: arrays in safetensors, the rest as JSON in its header.

One file, so the arrays and what they mean cannot be separated; written atomically by
`hinge train` beside the checkpoint it was fitted with, read by `hinge generate --model ridge`.
The per-gene residual std (the predictive Gaussian's scale) is optional: files written before
it existed load without it, and predict a mean only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from hinge_cli.core.files import atomic_path
from hinge_cli.data.features import FeatureNorm, views
from hinge_cli.errors import HingeError

FORMAT = "hinge-ridge/1"
METADATA_KEY = "hinge_ridge"


@dataclass(frozen=True)
class PenaltySearch:
    """How the penalty was chosen: the grid, each value's mean inner-CV score, and the folds it was scored on."""

    penalties: list[float]
    scores: list[float]  # mean per-gene depth-partial Pearson over the inner folds; NaN where nothing scored
    folds: str  # "samples" (leave one sample out) or "spots" (seeded random folds)
    n_folds: int


@dataclass(frozen=True)
class RidgeModel:
    """Closed-form ridge from standardised image features to the model-space targets of `genes`."""

    weights: np.ndarray  # (D, G)
    intercept: np.ndarray  # (G,)
    norm: FeatureNorm  # the standardisation the weights expect: the HINGE checkpoint's own
    penalty: float  # λ of (ZᵀZ + λ n I) W = Zᵀ(Y − Ȳ)
    search: PenaltySearch
    genes: list[str]
    encoder_key: str
    samples: list[str] = field(default_factory=list)  # the training samples the spots came from
    n_spots: int = 0
    residual_std: np.ndarray | None = None  # (G,) the predictive Gaussian's scale; None in files from before it
    residual_source: str | None = None  # which residuals it was estimated from

    @property
    def score(self) -> float:
        """The inner-CV score of the chosen penalty."""
        return self.search.scores[self.search.penalties.index(self.penalty)]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, D) or (N, V, D) features -> (N, G) predictions; with `norm.per_slide`, features already standardised by
        their slide (`SlideShift`), as `generate` passes them."""
        return design(features, self.norm) @ self.weights + self.intercept


def design(features: np.ndarray, norm: FeatureNorm) -> np.ndarray:
    """The ridge's inputs: features standardised as the HINGE model sees them, averaged over stored views."""
    return norm(views(features)).mean(1).astype(np.float64)


def write_ridge_model(path: Path, model: RidgeModel) -> None:
    """Arrays and metadata in one safetensors file, renamed into place only once complete."""
    meta = {"format": FORMAT, "penalty": model.penalty, "search": asdict(model.search), "genes": model.genes,
            "encoder_key": model.encoder_key, "samples": model.samples, "n_spots": model.n_spots,
            "residual_source": model.residual_source, "per_slide": model.norm.per_slide}
    arrays = {"weights": model.weights, "intercept": model.intercept, "feature_mean": model.norm.mean,
              "feature_std": model.norm.std}
    if model.residual_std is not None:
        arrays["residual_std"] = model.residual_std
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                  metadata={METADATA_KEY: json.dumps(meta, allow_nan=True)})


def read_ridge_model(path: Path) -> RidgeModel:
    """The ridge baseline at `path`; a missing or foreign file is a user error that says to train again."""
    path = Path(path)
    retrain = "run `hinge train` again: it fits the ridge baseline beside the checkpoint"
    if not path.is_file():
        raise HingeError(f"no ridge baseline at {path}", retrain)
    try:
        with safe_open(str(path), framework="np") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
    except SafetensorError as exc:
        raise HingeError(f"{path} is not a readable safetensors file ({exc})", retrain) from None
    meta = json.loads(header) if header else {}
    if meta.get("format") != FORMAT:
        raise HingeError(f"{path} is not a ridge baseline of this version ({meta.get('format', 'no format')})", retrain)
    return RidgeModel(arrays["weights"], arrays["intercept"], FeatureNorm(arrays["feature_mean"], arrays["feature_std"], bool(meta.get("per_slide", False))),
                      float(meta["penalty"]), PenaltySearch(**meta["search"]), list(meta["genes"]), str(meta["encoder_key"]),
                      list(meta["samples"]), int(meta["n_spots"]), arrays.get("residual_std"), meta.get("residual_source"))
