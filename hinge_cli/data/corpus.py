"""Expression-only corpora (scRNA-seq or ST spots) for pre-training the gene backbone."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from hinge_cli.data.expression import Transform, read_expression
from hinge_cli.errors import HingeError, setting


@dataclass
class Corpus:
    """Profiles x vocabulary in model space; gene id of column j is j + 1 (0 is padding)."""

    vocab: list[str]
    values: sparse.csr_matrix

    def __len__(self) -> int:
        return self.values.shape[0]

    def dense(self, rows: np.ndarray) -> np.ndarray:
        return self.values[rows].toarray()


def load_corpus(paths: Sequence[Path], transform: Transform, max_vocab: int, always: Sequence[str] = (),
                layer: str | None = None) -> Corpus:
    """Read every file; the vocabulary is the union of their genes, cut to the `max_vocab` most
    variable (a gene absent from a file counts as zero there), and always keeps `always`."""
    if not paths:
        raise HingeError("no corpus files given", f"pass {setting('corpus')} a.h5ad b.h5ad ...")
    parts = []
    for path in paths:
        expr = read_expression(Path(path), layer)
        parts.append((expr.genes, transform.apply_sparse(expr.counts, expr.totals).astype(np.float32)))
    union = sorted({g for genes, _ in parts for g in genes})
    column = {g: j for j, g in enumerate(union)}
    stacked = sparse.vstack([
        sparse.csr_matrix((v.data, np.array([column[genes[c]] for c in v.indices], dtype=np.int64), v.indptr),
                          shape=(v.shape[0], len(union)))
        for genes, v in parts
    ]).tocsr()
    stacked.sort_indices()
    n = stacked.shape[0]
    mean = np.asarray(stacked.sum(axis=0)).ravel() / n
    var = np.asarray(stacked.multiply(stacked).sum(axis=0)).ravel() / n - mean**2
    keep = set(np.argsort(-var, kind="stable")[:max_vocab].tolist()) | {column[g] for g in always if g in column}
    kept = sorted(keep)
    vocab = [union[j] for j in kept] + sorted(set(always) - set(column))
    values = stacked[:, kept]
    values = sparse.hstack([values, sparse.csr_matrix((n, len(vocab) - len(kept)), dtype=np.float32)]).tocsr()
    return Corpus(vocab, values)


def corpus_files(values: Sequence[str | Path]) -> list[Path]:
    """Corpus files from paths, quoted globs, or .txt lists of files (one per line)."""
    files: list[Path] = []
    for value in map(str, values):
        if value.endswith(".txt") and Path(value).is_file():
            files += [Path(line.strip()) for line in Path(value).read_text().splitlines() if line.strip()]
        elif any(ch in value for ch in "*?["):
            matches = sorted(glob.glob(value))
            if not matches:
                raise HingeError(f"--corpus pattern {value} matches no file", "check the pattern (quote it so the shell leaves it alone)")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(value))
    for path in files:  # up front: not after the panel is chosen and the backbone built
        if not path.is_file():
            raise HingeError(f"--corpus {path} is {'a folder' if path.is_dir() else 'not a file that exists'}",
                             "give .h5ad files, a quoted glob such as 'corpus/*.h5ad', or a .txt list of files")
    return files
