"""Training tables: each spot's image features joined to its measured expression.

Rows are matched by barcode, never by position, so a re-ordered or filtered file
cannot silently pair a spot with another spot's expression.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hinge_cli.data.expression import Expression, Transform, read_expression
from hinge_cli.data.features import SlideShift
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.embeddings import Embeddings, read_embeddings
from hinge_cli.run.directory import Run

log = logging.getLogger(__name__)


@dataclass
class SpotTable:
    """Spots of several samples in one table (row i of every field is the same spot)."""

    sample: np.ndarray  # (N,) sample id per spot
    barcodes: list[str]
    coords: np.ndarray  # (N, 2) level-0 px
    features: np.ndarray  # (N, D) or (N, V, D)
    targets: np.ndarray  # (N, G) in model space
    depth: np.ndarray  # (N,) total counts over all genes of the spot

    def __len__(self) -> int:
        return len(self.barcodes)

    def subset(self, rows: np.ndarray) -> SpotTable:
        return SpotTable(self.sample[rows], [self.barcodes[i] for i in rows], self.coords[rows], self.features[rows],
                         self.targets[rows], self.depth[rows])


def training_samples(run: Run, holdout: Sequence[str] = ()) -> list[str]:
    """The run's samples with registered expression, minus the held-out ones."""
    manifest = run.manifest()["samples"]
    unknown = sorted(set(holdout) - set(manifest))
    if unknown:
        raise HingeError(f"{setting('holdout')} names samples not in the run: {', '.join(unknown)}", f"samples: {', '.join(sorted(manifest))}")
    chosen = [s for s, info in sorted(manifest.items()) if "expression" in info and s not in holdout]
    if not chosen:
        raise HingeError("the run has no samples with measured expression (besides held-out ones)", f"tile slides with {setting('spots')} st.h5ad first")
    return chosen


def load_expression(run: Run, samples: Sequence[str]) -> dict[str, Expression]:
    registered = {s: run.sample(s)["expression"] for s in samples}
    return {s: read_expression(Path(info["path"]), info.get("layer")) for s, info in registered.items()}


def _join(sample: str, emb: Embeddings, expr: Expression, dropped: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into (embeddings, expression) of the spots both have."""
    index = {b: i for i, b in enumerate(expr.barcodes)}
    missing = [b for b in emb.barcodes if b not in index]
    unembedded = len(expr.barcodes) - (len(emb.barcodes) - len(missing))
    if missing or unembedded > dropped:
        raise HingeError(
            f"{sample}: barcodes of the embeddings and the expression file disagree "
            f"({len(missing)} embedded spots have no expression, {unembedded} measured spots have no embedding, "
            f"{dropped} were dropped off the slide by tile)",
            f"re-run `{command('tile')} {setting('overwrite')}` and `{command('embed')} {setting('overwrite')}` for this sample with its own .h5ad",
        )
    rows = np.arange(len(emb.barcodes))
    return rows, np.array([index[b] for b in emb.barcodes], dtype=np.int64)


def assemble(
    run: Run,
    encoder_key: str,
    samples: Sequence[str],
    genes: list[str],
    transform: Transform,
    fill_missing: bool = False,
    expression: dict[str, Expression] | None = None,
    per_slide: bool = False,
) -> SpotTable:
    """Join embeddings and expression of `samples`; spots with no counts on the panel are dropped. With `per_slide`,
    each sample's features are standardised by all its embedded spots first (`SlideShift`), as generation does."""
    expression = expression or load_expression(run, samples)
    parts = []
    for sample in samples:
        emb = read_embeddings(run.embeddings(encoder_key, sample))
        if per_slide:
            emb = replace(emb, features=SlideShift.fit(emb.features, sample)(emb.features))
        expr = expression[sample]
        dropped = int(run.stage(sample, "tile").get("dropped_outside", 0))
        erows, xrows = _join(sample, emb, expr, dropped)
        try:
            counts = expr.columns(genes, fill_missing)[xrows]
        except HingeError as exc:
            raise HingeError(f"{sample}: {exc.problem}", exc.fix) from None
        keep = counts.sum(axis=1) > 0
        if (~keep).any():
            log.warning("%s: dropped %d spots with no counts on the panel", sample, int((~keep).sum()))
        totals = expr.totals[xrows][keep]
        parts.append(SpotTable(
            np.full(int(keep.sum()), sample, dtype=object),
            [emb.barcodes[i] for i in erows[keep]],
            emb.coords[erows[keep]],
            emb.features[erows[keep]],
            transform.apply(counts[keep], totals),
            totals,
        ))
    dims = {p.features.shape[1:] for p in parts}
    if len(dims) > 1:
        raise HingeError(f"samples have embeddings of different shapes {sorted(dims)}", f"re-embed every sample with the same {setting('encoder')} and {setting('views')}")
    return SpotTable(
        np.concatenate([p.sample for p in parts]),
        [b for p in parts for b in p.barcodes],
        np.concatenate([p.coords for p in parts]),
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.targets for p in parts]),
        np.concatenate([p.depth for p in parts]),
    )
