"""The house keeps its floors: every import inside hinge_cli goes down the layers (docs/architecture.md), and no module
imports itself back through others. Read from the source with `ast`, so nothing needs importing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hinge_cli"

# Bottom to top: a package may import its own modules and those of the packages before it, never one after it.
LAYERS = ("errors", "core", "config", "formats", "run", "data", "slide", "encoders", "model", "eval", "predict", "training",
          "synthetic", "stages", "api", "cli", "__main__")
NEVER = {"model": {"run"}}  # the network and its maths: no run directory


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The hinge_cli modules `path` imports; `from pkg import sub` counts as importing `pkg.sub`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hinge_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hinge_cli"):
            for alias in node.names:
                sub = PACKAGE.parent.joinpath(*f"{node.module}.{alias.name}".split("."))
                is_module = sub.with_suffix(".py").exists() or sub.is_dir()
                found.add(f"{node.module}.{alias.name}" if is_module else node.module)
    return found - {"hinge_cli"}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_is_on_a_floor() -> None:
    unplaced = {_layer(m) for m in _graph()} - set(LAYERS) - {"__init__"}
    assert not unplaced, f"put these in LAYERS (and in docs/architecture.md): {sorted(unplaced)}"


def test_imports_only_go_down() -> None:
    upward = []
    for module, imported in _graph().items():
        here = _layer(module)
        if here == "__init__":
            continue
        for target in imported:
            there = _layer(target)
            if there != here and (LAYERS.index(there) > LAYERS.index(here) or there in NEVER.get(here, ())):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt in graph and not state.get(nxt):
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in graph:
        if not state.get(module):
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_an_upward_import(tmp_path: Path) -> None:
    """The rule itself: a formats module importing the model is found (so the tests above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from hinge_cli.model.checkpoint import load_checkpoint\nfrom hinge_cli.core import files\n")
    assert _imports(bad) == {"hinge_cli.model.checkpoint", "hinge_cli.core.files"}
    assert LAYERS.index(_layer("hinge_cli.model.checkpoint")) > LAYERS.index("formats")
