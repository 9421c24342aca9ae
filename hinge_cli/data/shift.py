"""How far a new slide is from the slides a model was trained on: the shift report `generate` writes.

Every user's slide comes from a new patient, a new stain batch, a new scanner. The card keeps, for each
training slide, what the model saw of it: its features' mean and spread over its spots (before any
standardisation), the mean colour of its tissue under the spots, its focus (`slide.stats.sharpness`), its
µm/px and its size. A new slide is compared with the range those span. The feature score is the root mean
square, over features, of how far the slide's mean lies outside the training slides' range, in units of how
much a feature varies (within a slide and between the training slides, together): 0 means inside what
training saw, 1 that a typical feature sits one such spread beyond it. The weight-free encoder's features
standardise away much of a blur, so focus has a check of its own. The limits were set before the shift
benchmark (docs/benchmarks/her2st-shift.md) and are what it measures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hinge_cli.data.features import SlideShift

log = logging.getLogger(__name__)

FEATURE_LIMIT = 1.0  # feature score above which a slide is called outside the training range
COLOUR_LIMIT = 12.0  # RGB levels (of 255) outside the training slides' range of tissue colour
MPP_LIMIT = 0.10  # relative distance of µm/px from the training slides' range
SHARPNESS_LIMIT = 0.25  # distance of the focus measure outside the training slides' range, over their median
EXTREME_Z = 8.0  # a standardised feature value this many training stds out: nothing in training looked like it
EXTREME_SHARE = 0.01  # of a slide's standardised values beyond EXTREME_Z, above which generate warns
TOP = 5
WINDOW = 2  # half-width, in image px, of the patch of the low-resolution image averaged at each spot


@dataclass(frozen=True)
class SlideStats:
    """What a model saw of one slide."""

    feature_mean: list[float]
    feature_std: list[float]
    colour: list[float]  # mean RGB of the tissue under the spots (0-255), from the low-resolution slide image
    mpp: float
    n_spots: int
    area_mm2: float  # the spots' footprint: their number times the area each stands for (pitch²)
    sharpness: float | None = None  # the tissue's focus (`slide.stats.sharpness`); cards from before it lack it

    @classmethod
    def of(cls, features: SlideShift, image: np.ndarray, image_xy: np.ndarray, mpp: float, pitch_um: float,
           sharpness: float | None = None) -> SlideStats:
        """From a slide's feature moments and its image at the spots (`image_xy`: spot centres in that image's px)."""
        return cls(features.mean.tolist(), features.std.tolist(), spot_colour(image, image_xy).tolist(), float(mpp),
                   int(features.n_spots), float(features.n_spots * (pitch_um / 1000) ** 2), sharpness)


@dataclass(frozen=True)
class ShiftReference:
    """The training slides' statistics, kept in the model card."""

    slides: dict[str, SlideStats] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShiftReference:
        return cls({name: SlideStats(**s) for name, s in data["slides"].items()})


def spot_colour(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Mean RGB over small windows of `image` centred on each spot, averaged over spots."""
    h, w = image.shape[:2]
    cols = np.clip(np.rint(xy[:, 0]).astype(int), WINDOW, w - WINDOW - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(int), WINDOW, h - WINDOW - 1)
    offsets = np.arange(-WINDOW, WINDOW + 1)
    patch = image[rows[:, None, None] + offsets[None, :, None], cols[:, None, None] + offsets[None, None, :], :3]
    return patch.reshape(-1, 3).astype(np.float64).mean(0)


def _outside(value: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, np.maximum(value - hi, lo - value))


def shift_report(reference: ShiftReference, slide: SlideStats) -> dict[str, Any]:
    """The slide against the training range: scores, the most-shifted features, colour, µm/px, size, and a verdict."""
    train = list(reference.slides.values())
    means = np.array([s.feature_mean for s in train])
    within = np.mean([s.feature_std for s in train], axis=0)
    between = means.std(0, ddof=1) if len(train) > 1 else np.zeros_like(within)
    scale = np.maximum(np.sqrt(within**2 + between**2), 1e-6 * np.maximum(np.abs(means).max(0), 1.0))
    distance = _outside(np.asarray(slide.feature_mean), means.min(0), means.max(0)) / scale
    score = float(np.sqrt(np.mean(distance**2)))
    top = np.argsort(-distance, kind="stable")[:TOP]
    colours = np.array([s.colour for s in train])
    colour_off = _outside(np.asarray(slide.colour), colours.min(0), colours.max(0))
    mpps = np.array([s.mpp for s in train])
    mpp_off = float(_outside(np.array(slide.mpp), mpps.min(), mpps.max()) / mpps.min())
    sharp = _sharpness(train, slide)
    reasons = [] if sharp is None or sharp["off"] <= SHARPNESS_LIMIT else [
        f"its tissue is {100 * sharp['off']:.0f}% {sharp['side']} than the training slides' (focus {sharp['value']:.3g} against "
        f"{sharp['range'][0]:.3g}-{sharp['range'][1]:.3g}: {'a blurred or more compressed scan' if sharp['side'] == 'blurrier' else 'a sharper scanner'})"]
    if score > FEATURE_LIMIT:
        reasons.append(f"its features lie outside the training slides' range (score {score:.2f}, above {FEATURE_LIMIT:g})")
    if colour_off.max() > COLOUR_LIMIT:
        reasons.append(f"its tissue colour is {colour_off.max():.0f} RGB levels outside the training slides' (stain or scanner)")
    if mpp_off > MPP_LIMIT:
        reasons.append(f"its µm/px ({slide.mpp:.3g}) is {100 * mpp_off:.0f}% outside the training slides' ({mpps.min():.3g}-{mpps.max():.3g})")
    return {
        "score": round(score, 4), "outside": bool(reasons), "why": "; ".join(reasons),
        "features_outside": int((distance > 0).sum()), "n_features": int(distance.size),
        "most_shifted": {f"feature {int(j)}": round(float(distance[j]), 3) for j in top if distance[j] > 0},
        "colour": [round(c, 1) for c in slide.colour], "training_colour": [[round(c, 1) for c in colours.min(0)], [round(c, 1) for c in colours.max(0)]],
        "mpp": slide.mpp, "training_mpp": [float(mpps.min()), float(mpps.max())],
        "n_spots": slide.n_spots, "area_mm2": round(slide.area_mm2, 3), "training_slides": len(train),
        **({} if sharp is None else {"sharpness": round(sharp["value"], 4), "training_sharpness": [round(v, 4) for v in sharp["range"]]}),
    }


def _sharpness(train: list[SlideStats], slide: SlideStats) -> dict[str, Any] | None:
    """The slide's focus against the training slides' range (None where a card or the slide has no focus measure)."""
    values = [s.sharpness for s in train]
    if slide.sharpness is None or any(v is None for v in values) or not np.isfinite([slide.sharpness, *values]).all():
        return None
    lo, hi = min(values), max(values)
    off = float(_outside(np.array(slide.sharpness), lo, hi) / np.median(values))
    return {"value": slide.sharpness, "range": [lo, hi], "off": off, "side": "blurrier" if slide.sharpness < lo else "sharper"}


def warn_if_outside(sample: str, report: dict[str, Any]) -> None:
    """One warning line when the slide is outside what training saw: what differs, and what it means."""
    if report["outside"]:
        log.warning("%s is outside what the model was trained on: %s. Expect the level and the spread to hold less well "
                    "than on the training slides (uns['hinge']['shift'] has the details)", sample, report["why"])


@dataclass
class ExtremeFeatures:
    """Counts, batch by batch, the standardised feature values the model is given that lie beyond EXTREME_Z training
    stds: a slide whose features the model cannot have learned anything about (the shift report says how it differs)."""

    extreme: int = 0
    total: int = 0

    def add(self, standardised: np.ndarray) -> None:
        self.extreme += int(np.count_nonzero(~(np.abs(standardised) <= EXTREME_Z)))
        self.total += int(standardised.size)

    @property
    def share(self) -> float:
        return self.extreme / self.total if self.total else 0.0

    def warn(self, sample: str) -> None:
        """One warning line when more than EXTREME_SHARE of the values were extreme; the prediction stands."""
        if self.share > EXTREME_SHARE:
            log.warning("%s: %.1f%% of the standardised image features given to the model lie beyond ±%g training stds, so "
                        "the slide is far outside what the model learned from; the prediction is written, but do not trust "
                        "it without a check (uns['hinge']['shift'] says how the slide differs)", sample, 100 * self.share, EXTREME_Z)
