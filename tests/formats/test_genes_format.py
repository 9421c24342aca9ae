"""The one gene-list format: what it skips, what it refuses, and that a written list reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from hinge_cli.errors import HingeError
from hinge_cli.formats.genes import read_gene_list, write_gene_list


def test_comments_and_blank_lines_are_skipped_and_order_kept(tmp_path: Path) -> None:
    path = tmp_path / "genes.txt"
    path.write_text("# marker genes\nERBB2\n\n  CD3E  \n   # indented comment\nACTB\n")
    assert read_gene_list(path) == ["ERBB2", "CD3E", "ACTB"]


def test_a_repeated_gene_is_an_error_that_names_it(tmp_path: Path) -> None:
    path = tmp_path / "genes.txt"
    path.write_text("ERBB2\nCD3E\nERBB2\nACTB\nCD3E\nCD3E\n")
    with pytest.raises(HingeError, match=r"repeats 2 gene\(s\): ERBB2, CD3E; list each gene once") as err:
        read_gene_list(path)
    assert "ACTB" not in str(err.value)


def test_missing_empty_and_unreadable_lists_are_errors(tmp_path: Path) -> None:
    with pytest.raises(HingeError, match="does not exist; give a text file"):
        read_gene_list(tmp_path / "absent.txt")
    (tmp_path / "comments.txt").write_text("# nothing yet\n\n")
    with pytest.raises(HingeError, match="lists no genes"):
        read_gene_list(tmp_path / "comments.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00G\n")
    with pytest.raises(HingeError, match="could not be read"):
        read_gene_list(tmp_path / "binary.txt")


def test_a_written_list_reads_back_and_unreadable_symbols_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "out" / "panel.txt"
    genes = ["ERBB2", "HLA-DRA", "MT-CO1"]
    write_gene_list(path, genes)
    assert read_gene_list(path) == genes
    assert [p.name for p in path.parent.iterdir()] == ["panel.txt"]  # no temporary left beside it
    for bad in (["ERBB2", "ERBB2"], ["#ERBB2"], [" CD3E"], [""], []):
        with pytest.raises(HingeError):
            write_gene_list(tmp_path / "bad.txt", bad)
    assert not (tmp_path / "bad.txt").exists()
