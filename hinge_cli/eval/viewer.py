"""`hinge view`: a prediction over its tissue in one self-contained HTML file, as Loupe or web_summary.html show one.

Everything is inline (the H&E as JPEG, the values, the plain JavaScript that draws them), so the file opens
from a cluster's scp or an e-mail with no server and no network. Each layer's values are quantised per gene to
uint8 over the gene's own range (255 marks a missing value), stored gene by gene as differences from the spot
before, gzipped and base64-coded; the page unpacks them with the browser's own DecompressionStream
(benchmarks/viewer_speed.py: 3.2 MB for 5,000 spots x 300 genes x 5 layers).
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from hinge_cli.core.files import write_text_atomic
from hinge_cli.data.expression import Expression, expression_unit, read_truth
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.eval.align import Prediction, match_spots, median_spacing, read_prediction
from hinge_cli.model.checkpoint import read_checkpoint_card, sidecar_path

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 2000
MISSING = 255  # the code of a missing value; 0..254 span the gene's range
JPEG_QUALITY = 85


@dataclass
class ViewLayer:
    key: str
    label: str
    values: np.ndarray  # (N, G) float, NaN where missing
    diverging: bool = False  # centred on 0 (the error)


@dataclass
class View:
    """What the page shows: spots in image pixels, genes, layers, the tissue and the side panel's facts."""

    title: str
    units: str
    barcodes: list[str]
    xy: np.ndarray  # (N, 2) spot centres in image px
    radius: float  # spot radius in image px
    genes: list[str]
    layers: list[ViewLayer]
    image: np.ndarray | None  # RGB uint8, the long side at most MAX_IMAGE_SIDE
    image_note: str = ""
    facts: dict[str, dict[str, str]] = field(default_factory=dict)  # side-panel sections: title -> {name: value}


def _image(pred: Prediction, provenance: dict[str, Any]) -> tuple[np.ndarray | None, float, str]:
    """The tissue picture and its scale (image px per level-0 px): the file's own, else read from its slide."""
    if pred.image is not None:
        return pred.image, pred.image_scale, ""
    slide = provenance.get("slide")
    if slide and Path(str(slide)).exists():
        from hinge_cli.slide.reader import hires_image

        image, scale = hires_image(Path(str(slide)), provenance.get("mpp"))
        return image, scale, ""
    where = f"and its slide {slide} is not there any more (moved since generate?)" if slide else "and records no slide"
    return None, 1.0, f"No tissue image: the prediction holds none {where}. Spots are drawn on a blank background."


def _downsample(image: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    side = max(image.shape[:2])
    if side <= MAX_IMAGE_SIDE:
        return image, scale
    from PIL import Image

    factor = MAX_IMAGE_SIDE / side
    size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS)), scale * factor


def _truth_layers(pred: Prediction, truth: Expression, truth_path: Path, facts: dict[str, str]) -> list[ViewLayer]:
    """The measured values in the prediction's units on the prediction's spots (matched by barcode, else position), and the error."""
    rows_p, rows_t, alignment = match_spots(pred.barcodes, pred.coords, pred.spot_diameter, truth, f"prediction {pred.path}", truth_path)
    shared = [g for g in pred.genes if g in set(truth.genes)]
    values = np.full(pred.values.shape, np.nan)
    if shared and len(rows_p):
        column = {g: j for j, g in enumerate(pred.genes)}
        measured = pred.transform.apply(truth.columns(shared)[rows_t], truth.totals[rows_t])
        values[np.ix_(rows_p, [column[g] for g in shared])] = measured
    facts.update({"truth": str(truth_path), "spots matched": f"{len(rows_p)} of {len(pred.barcodes)} (by {alignment['matched_by']})",
                  "prediction spots without truth": str(len(pred.barcodes) - len(rows_p)),
                  "truth spots not in the prediction": str(len(truth.barcodes) - len(rows_p)),
                  "genes measured": f"{len(shared)} of {len(pred.genes)}"})
    return [ViewLayer("truth", "measured", values), ViewLayer("error", "error (truth − prediction)", values - pred.values, diverging=True)]


def build_view(pred_path: Path, truth_path: Path | None = None, truth_layer: str | None = None) -> View:
    """Read a prediction (and its truth) into what the page shows."""
    pred = read_prediction(pred_path)
    return view_of(pred, None if truth_path is None else read_truth(truth_path, truth_layer), truth_path)


def view_of(pred: Prediction, truth: Expression | None = None, truth_path: Path | None = None) -> View:
    """What the page shows of a read prediction (and its truth); a prediction without spot centres is an error."""
    if pred.coords is None:
        raise HingeError(f"{pred.path} has no spot coordinates (obsm['spatial'])", f"view a file written by `{command('generate')}`")
    provenance = pred.provenance
    image, scale, note = _image(pred, provenance)
    if image is not None:
        image, scale = _downsample(image, scale)
    units = expression_unit(**pred.transform.to_dict())
    layers = [ViewLayer("prediction", "prediction (X)", pred.values)]
    layers += [ViewLayer(name, label, values) for name, label, values in (
        ("std", "std over draws", pred.std), ("q05", "5% quantile", pred.q05), ("q95", "95% quantile", pred.q95),
        ("draw", "one draw", None if pred.draws is None else pred.draws[:, 0])) if values is not None]
    truth_facts: dict[str, str] = {}
    if truth is not None:
        layers += _truth_layers(pred, truth, Path(truth_path or "truth"), truth_facts)
    diameter = pred.spot_diameter or (median_spacing(pred.coords) / 2 if len(pred.coords) > 1 else 1.0)
    facts = {"model": _model_facts(provenance, units, len(pred.genes)),
             "tissue": {"spots": str(len(pred.barcodes)), "µm/px of the slide": str(provenance.get("mpp", "n/a")),
                        "spot diameter": f"{diameter:.1f} level-0 px", "tile mode": str(provenance.get("tile_mode", "n/a"))}}
    if "shift" in provenance:
        facts["shift from the training slides"] = {str(k): str(v) for k, v in dict(provenance["shift"]).items()}
    if truth_facts:
        facts["truth"] = truth_facts
    return View(f"{pred.sample}: {pred.model}", units, pred.barcodes, pred.coords * scale, diameter * scale / 2, pred.genes, layers,
                image, note, facts)


def _model_facts(provenance: dict[str, Any], units: str, n_genes: int) -> dict[str, str]:
    facts = {"model": str(provenance.get("model", "hinge")), "units": units, "panel": f"{n_genes} genes",
             "encoder": ", ".join(map(str, provenance.get("encoders", []))) or "n/a"}
    for key in ("sampler", "samples", "seed", "checkpoint", "version"):
        if key in provenance:
            facts[key] = str(provenance[key])
    checkpoint = provenance.get("checkpoint")
    if checkpoint and sidecar_path(str(checkpoint)).is_file():
        try:
            trained_on = read_checkpoint_card(str(checkpoint)).samples
        except HingeError:  # a card this version cannot read: the page goes without the line
            trained_on = []
        if trained_on:
            facts["training data"] = f"{len(trained_on)} sections: {', '.join(trained_on)}"
    return facts


def delta_coded(codes: np.ndarray) -> np.ndarray:
    """Each gene's codes as differences from the spot before (mod 256), as PNG's Sub filter does: smooth maps gzip
    several times smaller. The page undoes it with a running sum when a gene is first shown."""
    return np.diff(codes, axis=-1, prepend=np.zeros((*codes.shape[:-1], 1), np.uint8)).astype(np.uint8)


def quantise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, G) floats -> uint8 codes (G, N) over each gene's finite range, MISSING where not finite, and (lo, hi) per gene."""
    finite = np.isfinite(values)
    lo = np.where(finite.any(0), np.nanmin(np.where(finite, values, np.inf), axis=0), 0.0)
    hi = np.where(finite.any(0), np.nanmax(np.where(finite, values, -np.inf), axis=0), 0.0)
    span = np.where(hi > lo, hi - lo, 1.0)
    codes = np.rint((np.where(finite, values, lo) - lo) / span * (MISSING - 1)).astype(np.uint8)
    codes[~finite] = MISSING
    return np.ascontiguousarray(codes.T), lo, hi


def _colours(name: str) -> list[str]:
    from matplotlib import colormaps

    cmap = colormaps[name]
    return ["#%02x%02x%02x" % tuple(int(255 * c) for c in cmap(i / 255)[:3]) for i in range(256)]


def _payload(view: View) -> tuple[dict[str, Any], str]:
    """The page's metadata (JSON) and its numbers (gzip + base64): x, y as float32, then each layer's codes."""
    parts = [view.xy[:, 0].astype("<f4").tobytes(), view.xy[:, 1].astype("<f4").tobytes()]
    layers = []
    for layer in view.layers:
        codes, lo, hi = quantise(np.asarray(layer.values, dtype=np.float64))
        parts.append(delta_coded(codes).tobytes())
        layers.append({"key": layer.key, "label": layer.label, "diverging": layer.diverging, "lo": lo.tolist(), "hi": hi.tolist()})
    image = None
    if view.image is not None:
        from PIL import Image

        buffer = BytesIO()
        Image.fromarray(view.image).convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        image = {"src": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), "width": view.image.shape[1],
                 "height": view.image.shape[0]}
    meta = {"title": view.title, "units": view.units, "barcodes": view.barcodes, "n": len(view.barcodes), "radius": view.radius,
            "genes": view.genes, "layers": layers, "image": image, "imageNote": view.image_note, "facts": view.facts,
            "colours": {"sequential": _colours("viridis"), "diverging": _colours("RdBu_r")}}
    return meta, base64.b64encode(gzip.compress(b"".join(parts), compresslevel=6, mtime=0)).decode()


def render_html(view: View, report: str = "") -> str:
    """The page: the template with the metadata, the numbers, the script and any `report` HTML (eval's tables) inlined."""
    meta, blob = _payload(view)
    assets = resources.files("hinge_cli.eval") / "assets"
    page = (assets / "viewer.html").read_text()
    script = (assets / "viewer.js").read_text()
    parts = {"TITLE": html.escape(view.title), "REPORT": report, "BLOB": blob, "SCRIPT": script,
             "META": json.dumps(meta, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")}
    return re.sub(r"__(TITLE|REPORT|META|BLOB|SCRIPT)__", lambda m: parts[m.group(1)], page)  # one pass: values are never re-read


def write_view(out: Path, view: View, report: str = "", overwrite: bool = False) -> Path:
    """Write the page atomically; an existing file is kept unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise HingeError(f"{out} exists", f"pass {setting('overwrite')} to replace it, or choose another {setting('out')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, render_html(view, report))
    return out
