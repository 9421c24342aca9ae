"""The README and docs/ hold: every `hinge` command they show names real flags, every link lands, the README stays short."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_README_LINES = 300

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`]+)`")
# `hinge` (or .venv/bin/hinge, or torchrun's `$(which hinge)`) starting a command, then its arguments
COMMAND = re.compile(r"(?:^\s*(?:\$\s+)?(?:[\w./-]*/)?hinge|\$\(which hinge\))[ \t]+(\S.*)$")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def commands(text: str) -> list[str]:
    """The argument strings of every `hinge` command the text shows: code-block lines and inline code.

    In a code block a command goes on over lines that end with `\\` or that start indented with `[` or `--` (a
    synopsis); a comment (` # ...`) ends it. A `$ hinge ...` line answered by `error:` is a transcript of a
    mistake, and is left out.
    """
    found = []
    for block in FENCE.findall(text):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            match = COMMAND.search(lines[i])
            mistake = lines[i].lstrip().startswith("$ ") and i + 1 < len(lines) and lines[i + 1].startswith("error:")
            if not match or mistake:
                i += 1
                continue
            parts = [match[1]]
            while i + 1 < len(lines) and (parts[-1].rstrip().endswith("\\")
                                          or re.match(r"\s+(\[|--)", lines[i + 1])):
                i += 1
                parts.append(lines[i])
            found.append(" ".join(re.sub(r"(^|\s)#.*", "", part) for part in parts))
            i += 1
    prose = FENCE.sub("", text)
    for span in SPAN.findall(prose):
        match = COMMAND.search(" ".join(span.split()))
        if match:
            found.append(match[1])
    return found


@cache
def help_text(*command: str) -> str:
    """`hinge [COMMAND] --help`, wide enough that no option name is cut."""
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240", "NO_COLOR": "1"})
    return result.output if result.exit_code == 0 else ""


@cache
def options(*command: str) -> frozenset[str]:
    """The long options `hinge [COMMAND] --help` lists: the leading dash-words of its option rows (`*`: required)."""
    names = set()
    for line in help_text(*command).splitlines():
        words = line.strip(" │|*").split()
        while words and words[0].startswith("-"):
            names.update(FLAG.findall(words.pop(0)))
    return frozenset(names)


def problems(arguments: str) -> list[str]:
    """What is wrong with one `hinge ...` command: an unknown subcommand, or flags its help does not list."""
    words = arguments.split()
    subcommand = () if words[0].startswith("-") else (words[0],)
    if subcommand and not help_text(*subcommand):
        return [f"`hinge {arguments}`: no subcommand {words[0]!r}"]
    unknown = sorted(set(FLAG.findall(arguments)) - options(*subcommand) - options())
    return [f"`hinge {arguments}`: no option {', '.join(unknown)}"] if unknown else []


def test_commands_are_found() -> None:
    """The extraction itself: the README's quick start shows every stage, and a synopsis's continuation lines count."""
    text = README.read_text()
    shown = {arguments.split()[0] for arguments in commands(text)}
    assert {"tile", "embed", "pretrain-warmup", "train", "generate", "eval", "view"} <= shown
    synopsis = "```\nhinge generate x.svs --out a.h5ad   # a comment --not-a-flag\n           [--seed 0] [--view]\n```\n"
    assert [set(FLAG.findall(arguments)) for arguments in commands(synopsis)] == [{"--out", "--seed", "--view"}]
    assert commands("```\n$ hinge tile --spot st.h5ad\nerror: hinge tile: no such option --spot\n```\n") == []


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_command_names_a_real_subcommand_and_flags(page: Path) -> None:
    assert options(), "`hinge --help` printed no options"
    found = [problem for arguments in commands(page.read_text()) for problem in problems(arguments)]
    assert not found, f"{page_name(page)}:\n" + "\n".join(found)


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_relative_link_lands_on_a_file(page: Path) -> None:
    prose = SPAN.sub("", FENCE.sub("", page.read_text()))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            broken.append(target)
    assert not broken, f"{page_name(page)} links to missing files: {broken}"


def test_the_readme_is_at_most_300_lines() -> None:
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail into docs/ (at most {MAX_README_LINES})"
