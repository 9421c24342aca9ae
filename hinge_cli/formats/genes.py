"""Gene lists: plain text, one symbol per line, as people write them by hand.

Blank lines and lines starting with '#' are skipped so a list can be annotated.
A repeated symbol is an error rather than silently dropped: it usually means a
list was pasted together wrongly, and a panel or an evaluation must not count a
gene twice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from hinge_cli.core.files import write_text_atomic
from hinge_cli.errors import HingeError

COMMENT = "#"
SHOWN = 10  # symbols named in an error message


def read_gene_list(path: Path) -> list[str]:
    """The symbols of a gene-list file, in file order; a missing, empty or repetitive list is a HingeError."""
    path = Path(path)
    if not path.is_file():
        raise HingeError(f"gene list {path} does not exist", "give a text file with one gene symbol per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise HingeError(f"gene list {path} could not be read ({exc})", "give a UTF-8 text file with one gene symbol per line") from None
    genes = [line.strip() for line in lines if line.strip() and not line.strip().startswith(COMMENT)]
    _check(genes, f"gene list {path}")
    return genes


def panel_sha256(genes: Sequence[str]) -> str:
    """A panel's fingerprint: the sha256 of its genes one a line, in order (the order is the model's)."""
    return hashlib.sha256("".join(f"{g}\n" for g in genes).encode()).hexdigest()


def write_gene_list(path: Path, genes: Sequence[str]) -> None:
    """Write `genes` so that `read_gene_list` gives them back unchanged (atomically: no half-written list)."""
    genes = [str(g) for g in genes]
    unreadable = [g for g in genes if g != g.strip() or not g or g.startswith(COMMENT) or "\n" in g or "\r" in g]
    if unreadable:
        raise HingeError(f"cannot write gene list {path}: {_names([repr(g) for g in unreadable])} would not read back as written",
                         "gene symbols must be non-empty, without surrounding spaces, line breaks or a leading '#'")
    _check(genes, f"gene list {path}")
    write_text_atomic(Path(path), "".join(f"{g}\n" for g in genes))


def _check(genes: list[str], what: str) -> None:
    if not genes:
        raise HingeError(f"{what} lists no genes", "put one gene symbol per line")
    repeated = [g for g, count in Counter(genes).items() if count > 1]
    if repeated:
        raise HingeError(f"{what} repeats {len(repeated)} gene(s): {_names(repeated)}",
                         "list each gene once (delete the repeated lines)")


def _names(genes: list[str]) -> str:
    return ", ".join(genes[:SHOWN]) + (" ..." if len(genes) > SHOWN else "")
