"""A sample to tile, however it came in: a slide, its spot file and its µm/px."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class SampleSpec(NamedTuple):
    """One sample to tile: its slide, spot file and µm/px, however it came in."""

    sample_id: str
    slide: Path
    spots: Path | None = None
    mpp: float | None = None
    layer: str | None = None  # the spot file's layer with raw counts; None: X, or scanpy's layers['counts']


def visium_sample_id(outs: Path) -> str:
    """Space Ranger writes `<sample>/outs/`: the sample's name is the folder above `outs`."""
    outs = Path(outs).resolve()
    return outs.parent.name if outs.name == "outs" else outs.name
