"""The model card, `checkpoints/<name>.json` beside the weights: what the weights are and how they were made.

Every stage that reads a checkpoint reads this one dataclass, so a field has one name and one
type (the tiling a model needs, the feature normalisation, the split that validates it).
Version 2 is the typed layout below; version 1 (`hinge-model/1`) kept the stage's facts in an
untyped `extra` dict, and `read_card` converts it so that older checkpoints still load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hinge_cli import __version__
from hinge_cli.config import DiffusionConfig, HingeConfig, ModelConfig, config_from_dict
from hinge_cli.core.files import reading, write_text_atomic
from hinge_cli.data.expression import Transform
from hinge_cli.data.features import FeatureNorm
from hinge_cli.data.shift import ShiftReference
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.embeddings import EmbeddingAttrs
from hinge_cli.formats.tiles import TileAttrs

FORMAT = "hinge-model/2"
LEGACY_FORMAT = "hinge-model/1"


@dataclass
class Architecture:
    """What rebuilding the network needs besides its weights; the last three only for HINGE models."""

    model: ModelConfig
    backbone: ModelConfig
    vocab_size: int  # backbone gene ids: 0 (padding) and 1..len(vocab)
    diffusion: DiffusionConfig | None = None
    gene_ids: list[int] | None = None  # the panel's backbone ids
    image_dim: int | None = None


@dataclass
class TileSettings:
    """How the training samples were tiled; generation tiles new slides the same way."""

    target_mpp: float
    patch_px: int
    mpp_source: float  # µm/px of the training slides, to warn about far-off new slides
    spot_um: float
    pitch_um: float
    grid: str

    @classmethod
    def of(cls, tiles: TileAttrs) -> TileSettings:
        return cls(tiles.mpp_target, tiles.patch_px, tiles.mpp_source, tiles.spot_um, tiles.pitch_um, tiles.grid)


@dataclass
class EmbedSettings:
    """How the training samples were embedded; generation embeds new slides the same way."""

    views: int = 1
    views_kept: bool = False  # the views were stored (training augmentations), not averaged
    weights_sha256: list[str | None] = field(default_factory=list)  # per encoder; None: no learned weights

    @classmethod
    def of(cls, embeddings: EmbeddingAttrs) -> EmbedSettings:
        return cls(embeddings.views, embeddings.views_kept, list(embeddings.weights_sha256))

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> EmbedSettings:
        """From a version-1 card's copy of the embeddings attributes, which hold the hashes as a JSON string."""
        hashes = attrs.get("weights_sha256", "[]")
        return cls(int(attrs.get("views", 1)), bool(attrs.get("views_kept", False)),
                   json.loads(hashes) if isinstance(hashes, str) else list(hashes))


@dataclass
class ValidationSplit:
    """Which spots validate: whole samples, or a seeded random fraction of spots."""

    val_samples: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class SpreadCalibration:
    """The per-gene factor on the predictive spread fitted after training, and what it was fitted on."""

    scale: list[float]  # one per panel gene: draws are widened around their spot's mean by it
    samples: list[str]  # the validation samples ([]: random spots of the training samples)
    n_spots: int
    n_samples: int  # the generate settings it was fitted with
    steps: int
    temperature: float
    point: str
    within_1std_raw: float  # coverage of point ± std on those spots, before and after
    within_1std: float
    sampler: str = "reverse"  # the sampler whose spread it scales (cards from before the coupled sampler: reverse)
    observation: str = "plain"  # poisson: fitted with each validation spot's count noise beside the spread (normalised units)


@dataclass
class GeneCorrelation:
    """The correlation of the training spots' residuals (each over its predicted std) that couples a draw's genes."""

    correlation: list[list[float]]  # genes x genes, in panel order, shrunk toward the identity
    samples: list[str]  # the samples whose spots it was measured on
    n_spots: int
    shrinkage: float
    # the joint Gaussian of [truth, one-shot mean] (2G) that predicts genes from given ones (empty: not measured)
    joint_mean: list[float] = field(default_factory=list)
    joint_std: list[float] = field(default_factory=list)
    joint_correlation: list[list[float]] = field(default_factory=list)
    joint_shrinkage: float | None = None  # chosen by cross-validation over the training samples
    joint_deflation: float = 1.0  # truth-prediction correlations scaled by it (`model.joint.optimism_factor`)
    observation: str = "plain"  # poisson: the residuals' count noise taken out of the correlation (normalised units)


@dataclass
class BackboneSource:
    """Where the backbone came from."""

    kind: str  # random | cellfm | corpus | file
    spec: str = ""  # the --backbone value, or the imported CellFM checkpoint
    corpus: list[str] = field(default_factory=list)  # expression files a corpus pre-training read
    skipped: list[str] = field(default_factory=list)  # CellFM tensors the import did not use
    missing: list[str] = field(default_factory=list)  # parameters CellFM lacks, kept at their initial values


@dataclass
class TrainingRecord:
    """The loop that wrote these weights: its history and best epoch, and the spots it trained on."""

    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: int = 0
    best_epoch: int = 0
    best_val: float | None = None
    n_train_spots: int = 0
    n_val_spots: int = 0


@dataclass
class ModelCard:
    """A checkpoint's sidecar. `save_checkpoint` fills in kind, architecture, weights, sha256 and version."""

    stage: str  # pretrain | warmup | train | cellfm-import
    kind: str = ""  # hinge | backbone
    architecture: Architecture | None = None
    genes: list[str] | None = None  # the panel a HINGE model predicts
    panel_sha256: str | None = None  # `formats.genes.panel_sha256` of `genes`, written with the weights (older cards: none)
    vocab: list[str] | None = None  # the backbone's gene symbols: entry i has id i + 1
    transform: Transform | None = None  # counts -> the model's expression space
    encoders: list[str] = field(default_factory=list)  # patch encoders, features concatenated in this order
    encoder_key: str | None = None  # their folder under embeddings/
    feature_norm: FeatureNorm | None = None  # fitted on the training spots
    tiling: TileSettings | None = None
    embedding: EmbedSettings | None = None
    samples: list[str] = field(default_factory=list)  # the training samples
    holdout: list[str] = field(default_factory=list)
    split: ValidationSplit | None = None
    fill_missing: bool = False  # a panel gene absent from a sample counted as 0
    warmup_mask_ratio: float | None = None  # the warm-up curriculum's cap on the hidden fraction
    backbone: BackboneSource | None = None
    config: HingeConfig | None = None  # the run config the stage ran with
    training: TrainingRecord = field(default_factory=TrainingRecord)
    calibration: SpreadCalibration | None = None  # `hinge train` fits it on the validation spots
    refit: TrainingRecord | None = None  # the refit on every training spot that made these weights, if any
    coupling: GeneCorrelation | None = None  # `hinge train` measures it on the spots these weights trained on
    shift: ShiftReference | None = None  # the training slides' statistics, which generate's shift report compares a slide with
    weights: str = ""  # the weights file's name, beside this card
    sha256: str = ""  # of the weights file
    hinge_version: str = __version__
    format: str = FORMAT

    @property
    def per_slide(self) -> bool:
        """Whether each slide's features are standardised by its own spots before `feature_norm`."""
        return self.feature_norm is not None and self.feature_norm.per_slide


def card_to_dict(card: ModelCard) -> dict[str, Any]:
    data = dataclasses.asdict(dataclasses.replace(card, feature_norm=None))
    data["feature_norm"] = card.feature_norm.to_dict() if card.feature_norm is not None else None
    return data


def _make(cls: type, data: dict[str, Any], where: Path, **typed: Any) -> Any:
    """`cls` from a JSON object; unknown keys mean a newer hinge wrote it."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise HingeError(f"model card {where} has unknown {cls.__name__} keys {unknown}",
                         "upgrade hinge to the version that wrote it")
    return cls(**{**data, **typed})


def _optional(cls: type, data: dict[str, Any] | None, where: Path) -> Any:
    return None if data is None else _make(cls, data, where)


# Architecture keys older cards lack, with the values that rebuild the model they describe (before the direct
# image path and the all-hidden loss existed).
OLDER_MODEL = {"direct_path": False}
OLDER_DIFFUSION = {"loss": "revealed", "all_hidden_share": 0.0, "likelihood": "mse"}


def card_from_dict(data: dict[str, Any], where: Path) -> ModelCard:
    arch = data["architecture"]
    diffusion = arch.get("diffusion")
    architecture = _make(Architecture, arch, where, model=_make(ModelConfig, {**OLDER_MODEL, **arch["model"]}, where),
                         backbone=_make(ModelConfig, {**OLDER_MODEL, **arch["backbone"]}, where),
                         diffusion=_optional(DiffusionConfig, None if diffusion is None else {**OLDER_DIFFUSION, **diffusion}, where))
    norm = data.get("feature_norm")
    return _make(
        ModelCard, data, where, architecture=architecture,
        transform=_optional(Transform, data.get("transform"), where),
        feature_norm=FeatureNorm.from_dict(norm) if norm is not None else None,
        tiling=_optional(TileSettings, data.get("tiling"), where),
        embedding=_optional(EmbedSettings, data.get("embedding"), where),
        split=_optional(ValidationSplit, data.get("split"), where),
        backbone=_optional(BackboneSource, data.get("backbone"), where),
        config=config_from_dict(data["config"]) if data.get("config") is not None else None,
        training=_make(TrainingRecord, data.get("training", {}), where),
        calibration=_optional(SpreadCalibration, data.get("calibration"), where),
        coupling=_optional(GeneCorrelation, data.get("coupling"), where),
        refit=_optional(TrainingRecord, data.get("refit"), where),
        shift=ShiftReference.from_dict(data["shift"]) if data.get("shift") is not None else None,
    )


def card_from_legacy(meta: dict[str, Any], where: Path) -> ModelCard:
    """A version-1 sidecar (the stage's facts in `extra`) as a card."""
    extra = meta.get("extra") or {}
    arch = {"model": meta["model"], "backbone": meta["backbone_model"], "vocab_size": meta["vocab_size"],
            **{k: meta[k] for k in ("diffusion", "gene_ids", "image_dim") if k in meta}}
    if "source" in extra:  # a CellFM import
        stage, backbone = "cellfm-import", {"kind": "cellfm", "spec": extra["source"], "skipped": extra.get("skipped", []),
                                            "missing": extra.get("missing", [])}
    else:
        stage = extra.get("stage", "")
        source = extra.get("backbone_source", "corpus" if "corpus" in extra else None)
        backbone = None if source is None else {"kind": source, "spec": extra.get("backbone", ""),
                                                "corpus": extra.get("corpus", [])}
    training = {"history": extra.get("history", []), "epochs": extra.get("epoch", len(extra.get("history", []))),
                "best_epoch": extra.get("best_epoch", 0), "best_val": extra.get("best_val"),
                "n_train_spots": extra.get("n_train_spots", 0), "n_val_spots": extra.get("n_val_spots", 0)}
    transform = meta.get("transform")
    return card_from_dict({
        "stage": stage, "kind": meta["kind"], "architecture": arch, "genes": meta.get("genes"), "vocab": meta.get("vocab"),
        "transform": transform if isinstance(transform, dict) else None, "encoders": meta.get("encoder") or [],
        "encoder_key": extra.get("encoder_key"), "feature_norm": extra.get("feature_norm"), "tiling": extra.get("tile"),
        "embedding": dataclasses.asdict(EmbedSettings.from_attrs(extra["embed"])) if "embed" in extra else None,
        "samples": extra.get("samples", []), "holdout": extra.get("holdout", []), "split": extra.get("split"),
        "fill_missing": bool(extra.get("fill_missing", False)), "warmup_mask_ratio": extra.get("warmup_mask_ratio"),
        "backbone": backbone, "config": extra.get("config"), "training": training, "weights": meta.get("weights", ""),
        "sha256": meta["sha256"], "hinge_version": meta.get("hinge_version", ""),
    }, where)


def write_card(path: Path, card: ModelCard) -> None:
    write_text_atomic(Path(path), json.dumps(card_to_dict(card), indent=1))


# What writes each of a run's checkpoints again, by name: the fix for a damaged one.
REWRITTEN_BY = {
    "pretrain": f"re-run `{command('pretrain-warmup')} {setting('overwrite')}` (it pre-trains again)",
    "warmup": f"re-run `{command('pretrain-warmup')} {setting('overwrite')}`",
    "last": f"training cannot resume from it: pass `{command('train')} {setting('overwrite')}` to train again from the warm-up",
    "selected": f"re-run `{command('train')} {setting('overwrite')}`",
    "best": f"re-run `{command('train')} {setting('overwrite')}`",
}


def rewrite_fix(path: Path | str) -> str:
    """What to do about a damaged checkpoint file (weights, card or resume state) at `path`."""
    return REWRITTEN_BY.get(Path(path).name.split(".")[0], "re-create the checkpoint") + ", or restore the file from a copy"


def read_card(path: Path) -> ModelCard:
    """The card at `path`, of this version or converted from version 1."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"checkpoint sidecar {path} does not exist", "keep the .json next to the weights")
    with reading(path, rewrite_fix(path)):
        data = json.loads(path.read_text())
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise HingeError(f"{path} is not a {FORMAT} model card (format {fmt!r})", rewrite_fix(path))
    if not data.get("sha256"):
        raise HingeError(f"checkpoint sidecar {path} records no sha256 of its weights, so they cannot be verified",
                         "use the sidecar written with the weights (or re-create the checkpoint)")
    try:
        return card_from_legacy(data, path) if fmt == LEGACY_FORMAT else card_from_dict(data, path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise HingeError(f"checkpoint sidecar {path} is incomplete or malformed ({exc.__class__.__name__}: {exc})",
                         "use the sidecar written with the weights (or re-create the checkpoint)") from None
