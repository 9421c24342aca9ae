"""Choosing the gene panel, on training samples only (a held-out slide never votes)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from hinge_cli.data.expression import Expression, Transform
from hinge_cli.errors import HingeError, setting

METHODS = ("hvg", "hmhvg")
UNINFORMATIVE = re.compile(r"^(MT-|RPS|RPL)", re.IGNORECASE)


def shared_genes(samples: Sequence[Expression]) -> list[str]:
    """Genes measured in every sample, in the first sample's order."""
    common = set(samples[0].genes).intersection(*(s.genes for s in samples[1:]))
    return [g for g in samples[0].genes if g in common]


def gene_moments(samples: Sequence[Expression], genes: list[str], transform: Transform) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each gene in model space, pooled over every spot; sparse throughout."""
    total = np.zeros(len(genes))
    total_sq = np.zeros(len(genes))
    n = 0
    for sample in samples:
        index = {g: i for i, g in enumerate(sample.genes)}
        values = transform.apply_sparse(sample.counts[:, [index[g] for g in genes]].tocsr(), sample.totals)
        total += np.asarray(values.sum(axis=0)).ravel()
        total_sq += np.asarray(values.multiply(values).sum(axis=0)).ravel()
        n += values.shape[0]
    mean = total / n
    return mean, np.maximum(total_sq / n - mean**2, 0.0)


def select_panel(samples: Sequence[Expression], n_genes: int, method: str, transform: Transform) -> list[str]:
    """`hvg`: the n most variable genes. `hmhvg`: genes both highly expressed and highly
    variable (top-k by mean intersected with top-k by variance, k grown until n remain),
    without mitochondrial and ribosomal genes; ordered by variance."""
    if method not in METHODS:
        raise HingeError(f"unknown panel selection '{method}'", f"use one of {', '.join(METHODS)}")
    if not samples:
        raise HingeError("no training samples with measured expression", f"tile slides with {setting('spots')} first")
    genes = shared_genes(samples)
    if method == "hmhvg":
        genes = [g for g in genes if not UNINFORMATIVE.match(g)]
    if not genes and len(samples) > 1:
        raise HingeError("the training samples share no gene names ("
                         + "; ".join(f"a sample has {', '.join(s.genes[:3])}" for s in samples[:2]) + ")",
                         "name genes the same way in every sample (e.g. all symbols, or all Ensembl ids)")
    if len(genes) < n_genes:
        raise HingeError(f"only {len(genes)} genes are shared by the training samples, fewer than {setting('n-genes')} {n_genes}", "ask for fewer genes")
    mean, var = gene_moments(samples, genes, transform)
    by_var = np.argsort(-var, kind="stable")
    if method == "hvg":
        chosen = by_var[:n_genes]
    else:
        by_mean = np.argsort(-mean, kind="stable")
        k = n_genes
        while True:
            both = np.intersect1d(by_mean[:k], by_var[:k])
            if len(both) >= n_genes or k >= len(genes):
                break
            k = min(len(genes), int(k * 1.1) + 1)
        chosen = both[np.argsort(-var[both], kind="stable")][:n_genes]
    return [genes[i] for i in chosen]
