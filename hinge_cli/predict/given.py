"""Genes measured on the slide's spots, given to `hinge generate --given` (panel completion).

The measured file's spots are matched to the slide's as `eval` matches them (barcodes, else
coordinates within half a spot); its genes in the model's panel are put through the model's
target transform, so the reverse process holds them exactly as it would a gene it revealed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hinge_cli.core.files import sha256_file
from hinge_cli.data.expression import Transform, read_expression
from hinge_cli.errors import HingeError, setting
from hinge_cli.eval.align import match_spots
from hinge_cli.formats.genes import read_gene_list
from hinge_cli.formats.tiles import Tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GivenSource:
    """What the user asked to give: the measured .h5ad, an optional gene list restricting it, and its counts layer."""

    path: Path
    genes: Path | None = None
    layer: str | None = None

    def check_request(self, model: str, n_samples: int) -> None:
        """Refuse what completion cannot do: a model that cannot condition on genes, or one file for several slides."""
        if model not in ("hinge", "ridge"):
            raise HingeError(f"{setting('model')} {model} cannot condition on {setting('given')} genes", f"predict with {setting('model')} hinge (or ridge, the genes-only baseline)")
        if n_samples > 1:
            raise HingeError(f"{setting('given')} {self.path} holds one slide's measurements but {n_samples} samples are asked for",
                             f"generate one slide at a time with {setting('given')}")


@dataclass(frozen=True)
class GivenGenes:
    """The given genes on one slide's spots, in the model's panel order and space."""

    source: GivenSource
    genes: list[str]  # panel genes given (on every matched spot)
    mask: np.ndarray  # (spots, panel genes) bool
    values: np.ndarray  # (spots, panel genes) float32, model space; 0 where not given
    alignment: dict[str, Any]
    depth: np.ndarray  # (spots,) the measured spot's total counts; 0 where none is matched

    @property
    def per_gene(self) -> np.ndarray:
        """(panel genes,) bool: var['given'] of the output."""
        return self.mask.any(0)

    @property
    def per_spot(self) -> np.ndarray:
        """(spots,) int: obs['n_given'] of the output."""
        return self.mask.sum(1).astype(np.int64)

    def rows(self, start: int, stop: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The mask and values of spots start:stop, for the sampler."""
        return (torch.from_numpy(self.mask[start:stop]).to(device),
                torch.from_numpy(self.values[start:stop]).to(device))

    def provenance(self) -> dict[str, Any]:
        return {"given": str(self.source.path.resolve()), "given_sha256": sha256_file(self.source.path),
                "given_layer": self.source.layer or "default", "n_genes_given": len(self.genes),
                "given_spots_matched": int(self.alignment["n_matched"]), "given_matched_by": self.alignment["matched_by"]}


def read_given(source: GivenSource, spots: Tiles, panel: list[str], transform: Transform) -> GivenGenes:
    """The measured genes of `source` in `panel`, on `spots` (tiles' rows), transformed like the training targets."""
    measured = read_expression(source.path, source.layer)
    chosen = measured.genes
    if source.genes is not None:
        listed = read_gene_list(source.genes)
        absent = [g for g in listed if g not in set(measured.genes)]
        if absent:
            log.warning("%d genes of --given-genes are not in %s and are not given: %s", len(absent), source.path, ", ".join(absent))
        chosen = [g for g in listed if g in set(measured.genes)]
    in_panel = set(panel)
    outside = [g for g in chosen if g not in in_panel]
    genes = [g for g in panel if g in set(chosen)]
    if not genes:
        raise HingeError(f"no gene of {source.path}{' restricted to ' + str(source.genes) if source.genes else ''} is in the "
                         f"model's {len(panel)}-gene panel", f"give measured genes of the panel, e.g. {', '.join(panel[:5])} "
                         "(same symbols as the training data)")
    if outside:
        log.warning("%d given genes are not in the model's panel and are ignored: %s", len(outside), ", ".join(outside))
    diameter = spots.attrs.spot_um / spots.attrs.mpp_source
    rows, measured_rows, alignment = match_spots(spots.barcodes, spots.coords.astype(np.float64),
                                                 diameter if np.isfinite(diameter) else None, measured,
                                                 f"the slide's spots ({spots.path})", source.path)
    if not len(rows):
        raise HingeError(f"no spot of {source.path} matches a spot of the slide (by {alignment['matched_by']})",
                         "give the measurements of this slide, with its barcodes or obsm['spatial'] in the slide's level-0 pixels")
    unmatched = len(spots.barcodes) - len(rows)
    if unmatched:
        log.warning("%d of %d spots have no measurement in %s: they are predicted from the image alone (obs['n_given'] 0)",
                    unmatched, len(spots.barcodes), source.path)
    columns = [panel.index(g) for g in genes]
    mask = np.zeros((len(spots.barcodes), len(panel)), bool)
    values = np.zeros(mask.shape, np.float32)
    mask[np.ix_(rows, columns)] = True
    values[np.ix_(rows, columns)] = transform.apply(measured.columns(genes)[measured_rows], measured.totals[measured_rows])
    depth = np.zeros(len(spots.barcodes))
    depth[rows] = measured.totals[measured_rows]
    log.info("%d panel genes given on %d spots (matched by %s)", len(genes), len(rows), alignment["matched_by"])
    return GivenGenes(source, genes, mask, values, alignment, depth)
