"""Typed configuration: a preset (configs/*.yaml), then the run's hinge.yaml, then flags.

Each section is a dataclass so that a typo in a YAML file or a wrong type is an
error at load time, not a silent default hours into a training run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from hinge_cli.errors import HingeError, setting

PRESETS = ("tiny", "small", "default")


@dataclass(frozen=True)
class Rule:
    """A constraint on one numeric config value, checked wherever a config is made (flags, YAML, API)."""

    text: str
    holds: Callable[[Any], bool]


POSITIVE = Rule("must be a finite number above 0", lambda v: math.isfinite(v) and v > 0)
NON_NEGATIVE = Rule("must be a finite number, 0 or more", lambda v: math.isfinite(v) and v >= 0)
AT_LEAST_1 = Rule("must be at least 1", lambda v: v >= 1)
FRACTION = Rule("must lie between 0 and 1", lambda v: 0 <= v <= 1)
OPEN_FRACTION = Rule("must lie strictly between 0 and 1", lambda v: 0 < v < 1)
FINITE = Rule("must be a finite number", math.isfinite)


def checked(default: Any, rule: Rule) -> Any:
    """A config field whose values must satisfy `rule` (None, where allowed, always passes)."""
    return field(default=default, metadata={"rule": rule})


class Checked:
    """Checks each field's rule when a section is made, so a bad value fails before any work starts."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for fld in dataclasses.fields(self):  # type: ignore[arg-type]
            rule, value = fld.metadata.get("rule"), getattr(self, fld.name)
            if rule is not None and value is not None and not rule.holds(value):
                raise HingeError(f"{self.section}.{fld.name} = {value!r} {rule.text}",
                                 f"give a valid --{fld.name.replace('_', '-')} (or {fld.name} under {self.section}: in the "
                                 f"YAML config); the default is {fld.default}")


@dataclass
class TissueConfig(Checked):
    """Tissue detection on a low-resolution thumbnail (saturation + Otsu + morphology)."""

    section: ClassVar[str] = "tile.tissue"
    thumb_mpp: float = checked(8.0, POSITIVE)  # µm/px of the thumbnail the mask is computed on
    threshold: float | None = checked(None, FRACTION)  # saturation cut-off in [0, 1]; None = Otsu
    min_saturation: float = checked(0.05, FRACTION)  # Otsu is clipped to [min, max]: blank slides stay blank,
    max_saturation: float = checked(0.15, FRACTION)  # and pale stained tissue is never cut away as glass
    close_um: float = checked(50.0, NON_NEGATIVE)  # morphological closing radius: joins nearby fragments
    open_um: float = checked(16.0, NON_NEGATIVE)  # opening radius: removes dust and specks
    min_area_um2: float = checked(40000.0, NON_NEGATIVE)  # drop tissue islands smaller than this
    fill_holes: bool = True


@dataclass
class TileConfig(Checked):
    section: ClassVar[str] = "tile"
    target_mpp: float = checked(0.5, POSITIVE)
    patch_px: int = checked(224, AT_LEAST_1)
    grid: str = "hex"  # hex | square lattice for slides without spots
    spot_um: float = checked(55.0, POSITIVE)
    pitch_um: float = checked(100.0, POSITIVE)
    min_tissue: float = checked(0.5, FRACTION)  # grid spots keep this fraction of their disc on tissue
    images: bool = True
    workers: int = checked(2, AT_LEAST_1)
    tissue: TissueConfig = field(default_factory=TissueConfig)


@dataclass
class ModelConfig(Checked):
    section: ClassVar[str] = "model"
    d_model: int = checked(1536, AT_LEAST_1)
    n_layers: int = checked(40, AT_LEAST_1)
    n_heads: int = checked(48, AT_LEAST_1)
    ffn_dim: int = checked(1536, AT_LEAST_1)  # CellFM's gated linear unit keeps the model width
    n_bins: int = checked(256, AT_LEAST_1)  # soft bins of the value encoder (CellFM: 256)
    cond_dim: int = checked(256, AT_LEAST_1)  # width of the condition vector feeding SoftAdaLN
    dropout: float = checked(0.0, FRACTION)
    trainable: str = "frozen"  # frozen | lora | full: what of the backbone trains
    lora_rank: int = checked(8, AT_LEAST_1)
    lora_alpha: float = checked(16.0, POSITIVE)  # LoRA update scale = lora_alpha / lora_rank
    softnorm_logit_init: float = checked(-12.0, FINITE)  # SoftNorm eta = sigmoid(this) ~ 0 at init
    gate_logit_init: float = checked(12.0, FINITE)  # SoftAdaLN gate = sigmoid(this) ~ 1 at init
    direct_path: bool = True  # an image->expression head beside SoftAdaLN; false: the paper's model
    direct_init: str = "ridge"  # ridge: the head's linear term starts at the closed-form ridge fit | zero

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direct_init not in ("ridge", "zero"):
            raise HingeError(f"model.direct_init {self.direct_init} is not ridge or zero", "set model.direct_init: ridge (or zero)")


@dataclass
class DiffusionConfig(Checked):
    section: ClassVar[str] = "diffusion"
    steps: int = checked(50, AT_LEAST_1)
    fill: str = "noise"  # noise | zero: what hidden values are replaced with
    noise_std: float = checked(1.0, NON_NEGATIVE)
    alpha: float | None = checked(None, POSITIVE)  # schedule exponent; None = automatic (one gene visible at t = T-1)
    loss: str = "hidden"  # hidden: score every hidden gene | revealed: only those revealed at t (the official code)
    all_hidden_share: float = checked(0.25, FRACTION)  # share of training rows drawn at t = T (every gene hidden)
    likelihood: str = "gaussian"  # gaussian: a mean and a log-variance per gene (the spread sampled at reveal) | mse: mean only
    pretrain_mask_min: float = checked(0.0, FRACTION)  # backbone pre-training hides U(min, max) of each sequence
    pretrain_mask_max: float = checked(1.0, FRACTION)  # (at least one gene): up to all of it, where generation starts
    pretrain_expressed_fraction: float = checked(0.75, FRACTION)  # share of a pre-training sequence drawn from expressed genes


@dataclass
class TrainConfig(Checked):
    section: ClassVar[str] = "train"
    epochs: int = checked(50, AT_LEAST_1)
    batch_size: int = checked(32, AT_LEAST_1)
    lr: float = checked(1e-4, POSITIVE)
    weight_decay: float = checked(0.01, NON_NEGATIVE)
    grad_clip: float = checked(1.0, NON_NEGATIVE)
    patience: int = checked(10, AT_LEAST_1)
    seed: int = checked(0, NON_NEGATIVE)
    device: str = "auto"
    schedule: str = "cosine"  # cosine (after a linear warm-up) | constant learning rate
    refit: bool = True  # after validation chose the epochs, fit again on every training spot (validation's too)


FEATURE_NORMS = ("slide", "training")


@dataclass
class WarmupConfig(Checked):
    """`pretrain-warmup`: which samples and genes, which backbone, which split, and the warm-start curriculum."""

    section: ClassVar[str] = "warmup"
    backbone: str = "random"  # random | cellfm:CKPT | FILE.safetensors (an earlier pre-training or model)
    vocab: str | None = None  # CellFM gene list (CSV, symbol first), for cellfm:CKPT
    corpus: list[str] = field(default_factory=list)  # expression-only .h5ad files to pre-train the backbone on
    corpus_layer: str | None = None  # the corpus files' layer with raw counts; None: X, else layers['counts']
    holdout: list[str] = field(default_factory=list)  # sample ids kept out of training
    genes: str | None = None  # gene panel file, one symbol per line; None = choose n_genes by `select`
    n_genes: int = checked(200, AT_LEAST_1)
    select: str = "hvg"  # hvg | hmhvg
    normalize: str = "total"  # total: ln(counts per 10k of the spot + 1), as scanpy's normalize_total + log1p; none: log2(counts + 1)
    fill_missing: str = "none"  # none: a panel gene missing from a sample is an error; zero: treat it as 0
    feature_norm: str = "slide"  # slide: standardise each slide's features by its own spots first | training: not
    val_fraction: float = checked(0.1, OPEN_FRACTION)  # fraction of spots that validate (when val_samples is empty)
    val_samples: list[str] = field(default_factory=list)  # whole samples that validate instead
    epochs: int = checked(5, NON_NEGATIVE)  # warm-start curriculum epochs (0: none, the warm-up is the wrapped backbone)
    mask_ratio: float = checked(0.2, FRACTION)  # the curriculum's cap on the hidden fraction of the panel

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fill_missing not in ("none", "zero"):
            raise HingeError(f"{setting('fill-missing')} {self.fill_missing} is not none or zero", f"use {setting('fill-missing')} zero to fill absent genes with 0")
        if self.feature_norm not in FEATURE_NORMS:
            raise HingeError(f"{setting('feature-norm')} {self.feature_norm} is not one of {', '.join(FEATURE_NORMS)}",
                             f"use {setting('feature-norm')} slide (the default) or training")


POINTS = ("one-shot", "samples")
SAMPLERS = ("coupled", "reverse")


@dataclass
class GenerateConfig(Checked):
    """`generate`: how predictions and their draws are made."""

    section: ClassVar[str] = "generate"
    sampler: str = "coupled"  # coupled: one pass, genes drawn jointly (given genes conditioned on) | reverse: reveal steps
    n_samples: int = checked(8, AT_LEAST_1)  # samples per spot: layers['std'], q05 and q95 describe them
    steps: int | None = checked(None, AT_LEAST_1)  # reverse-process steps; None = 5 (or the trained T if fewer)
    temperature: float = checked(1.0, NON_NEGATIVE)  # scales the spread of the draws; 0: every draw is the mean
    point: str = "one-shot"  # X: one-shot (the mean from every gene hidden) | samples (the mean over samples)
    calibrated: bool = True  # widen the spread by the per-gene scale `hinge train` fitted on the validation spots
    seed: int = checked(0, NON_NEGATIVE)  # the same seed gives the same predictions
    batch_size: int = checked(64, AT_LEAST_1)  # spots per batch of the reverse process
    device: str = "auto"  # auto | cpu | cuda (bf16 autocast on CUDA)
    keep_samples: bool = True  # also store every sample in obsm['samples'] (N, S, G): eval's CRPS and energy score
    view: bool = False  # also write <sample>.html beside each prediction: the page `hinge view` writes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise HingeError(f"generate.sampler {self.sampler} is not one of {', '.join(SAMPLERS)}",
                             f"pass {setting('sampler')} coupled (the default) or {setting('sampler')} reverse")
        if self.point not in POINTS:
            raise HingeError(f"generate.point {self.point} is not one of {', '.join(POINTS)}",
                             f"pass {setting('point')} one-shot (the default) or {setting('point')} samples")


@dataclass
class PretrainConfig(Checked):
    """Backbone pre-training on expression-only corpora (`pretrain-warmup --corpus`)."""

    epochs: int = checked(10, AT_LEAST_1)
    batch_size: int = checked(64, AT_LEAST_1)
    lr: float = checked(1e-3, POSITIVE)
    seq_len: int = checked(512, AT_LEAST_1)  # genes per pre-training sequence (a random subset, expressed genes favoured)
    max_vocab: int = checked(5000, AT_LEAST_1)  # the corpus vocabulary keeps this many most variable genes (plus the panel)
    section: ClassVar[str] = "pretrain"


@dataclass
class EmbedConfig(Checked):
    section: ClassVar[str] = "embed"
    encoder: str = "default"  # registry name(s), comma-separated; features are concatenated in that order
    batch_size: int = checked(64, AT_LEAST_1)
    views: int = checked(1, AT_LEAST_1)  # 1, or 8 dihedral views (test-time augmentation)
    average_views: bool = False  # with views=8: store the mean (N, D) instead of every view (N, V, D)
    device: str = "auto"  # auto | cpu | cuda
    workers: int = checked(2, AT_LEAST_1)  # background patch readers


@dataclass
class HingeConfig:
    preset: str = "default"  # the preset this config started from (tiny|small|default or a .yaml path)
    tile: TileConfig = field(default_factory=TileConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _preset_text(name: str) -> str:
    if name not in PRESETS:
        raise HingeError(f"unknown config preset '{name}'", f"use one of {', '.join(PRESETS)} or a path to a .yaml file")
    return (resources.files("hinge_cli.configs") / f"{name}.yaml").read_text()


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise HingeError(f"config file {path} does not exist", f"check the path given to {setting('config')}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HingeError(f"config file {path} is not valid YAML ({exc.__class__.__name__}): damaged or mistyped",
                         "fix its syntax, or restore it from a copy (a run's hinge.yaml: or delete it to start from the preset again)") from None
    if not isinstance(data, dict):
        raise HingeError(f"config file {path} must hold a mapping of sections", "see configs/default.yaml for the layout")
    return data


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise HingeError(f"config value {where} = {value!r} should be a list", "write it as [a, b] in the YAML file")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise HingeError(f"config value {where} = {value!r} should be a {hint.__name__}", "fix it in the YAML file or flag")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise HingeError(f"config section '{where}' must be a mapping, not {type(data).__name__}", "fix the YAML file")
    hints = typing.get_type_hints(cls)
    key = lambda k: f"{where}.{k}" if where else k  # noqa: E731
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise HingeError(f"unknown config key '{key(unknown[0])}'", f"valid keys here: {', '.join(sorted(hints))}")
    return cls(**{k: _coerce(v, hints[k], key(k)) for k, v in data.items()})


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`; None values in `over` leave `base` as is."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict):
            if out.get(key) is not None and not isinstance(out[key], dict):  # `train: 5`: not to be replaced by flags in silence
                raise HingeError(f"config section '{key}' must be a mapping, not {type(out[key]).__name__}", "fix the YAML file")
            out[key] = merge(out[key] if isinstance(out.get(key), dict) else {}, value)
        elif value is not None:
            out[key] = value
    return out


LEGACY_KEYS = {("train", "warmup_epochs"): ("warmup", "epochs"), ("train", "warmup_mask_ratio"): ("warmup", "mask_ratio")}


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Move keys that older versions kept elsewhere, so a run's old hinge.yaml still loads."""
    for (old_section, old_key), (section, key) in LEGACY_KEYS.items():
        old = data.get(old_section)
        if isinstance(old, dict) and old_key in old:
            data = {**data, old_section: {k: v for k, v in old.items() if k != old_key}}
            data[section] = {**data.get(section, {}), key: old[old_key]}
    return data


def _preset_data(preset: str) -> dict[str, Any]:
    if preset.endswith((".yaml", ".yml")):
        return _migrate(read_yaml(Path(preset)))
    return yaml.safe_load(_preset_text(preset)) or {}


def _preset_name(preset: str | Path) -> str:
    """A preset's name, or a YAML file's absolute path: later stages may run from another directory."""
    name = str(preset)
    return str(Path(name).expanduser().resolve()) if name.endswith((".yaml", ".yml")) else name


def load_config(
    preset: str | Path | None = None,
    run_yaml: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> HingeConfig:
    """Resolve the configuration: preset < the run's hinge.yaml < flags.

    Without a preset, the run keeps the one it was started with. Naming a different
    preset starts again from it (the run's hinge.yaml belonged to another preset).
    """
    recorded = _migrate(read_yaml(run_yaml)) if run_yaml is not None and Path(run_yaml).exists() else None
    chosen = _preset_name(preset if preset is not None else (recorded or {}).get("preset", "default"))
    gone = preset is None and recorded is not None and chosen.endswith((".yaml", ".yml")) and not Path(chosen).exists()
    # a run is self-contained: its hinge.yaml holds every resolved setting, so the YAML it started from may go
    data = merge(_preset_data("default" if gone else chosen), {"preset": chosen})
    if recorded is not None and _preset_name(recorded.get("preset", "default")) == chosen:
        data = merge(data, recorded)
    data = merge(data, overrides or {})
    return _build(HingeConfig, data, "")


def config_from_dict(data: dict[str, Any]) -> HingeConfig:
    """A config recorded as a mapping (a model card's), checked like a YAML file; older keys migrate."""
    return _build(HingeConfig, _migrate(data), "")


def field_default(section: type, name: str) -> Any:
    """A config field's default as its dataclass declares it: help texts show it, so they cannot drift."""
    (found,) = [f for f in dataclasses.fields(section) if f.name == name]
    return found.default_factory() if found.default is dataclasses.MISSING else found.default


def field_rule(section: type, name: str) -> Rule | None:
    """A config field's rule (its valid range), for the help text beside its default."""
    (found,) = [f for f in dataclasses.fields(section) if f.name == name]
    return found.metadata.get("rule")


def dump_config(cfg: HingeConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
