"""One vocabulary across subcommands, help that shows defaults and plain switches, and parse errors as one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from hinge_cli.cli.app import app

runner = CliRunner()
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}

# The only options whose help or type may differ between commands that share their name, and why.
DIFFERENT = {
    ("generate", "--samples"): "hidden, deprecated spelling of --n-samples; tile's --samples is the sample sheet",
    ("eval", "--run"): "eval also works outside a run: without $HINGE_RUN it writes ./hinge-eval",
    ("eval", "--out"): "a folder of reports, where generate's --out is a .h5ad or a folder",
    ("generate", "--out"): "a .h5ad or a folder of them, where eval's --out is a folder of reports",
    ("view", "--out"): "the one page it writes",
    ("view", "--truth"): "the one truth of the one prediction it shows, where eval pairs a --truth with each --pred",
}
DEFAULT_NOTE = re.compile(r"\s*\(default: .*\)\.?$")


def options() -> list[tuple[str, object, object]]:
    """(command name, click context, option) for every option of every subcommand, help included."""
    group = get_command(app)
    found = []
    for name, command in group.commands.items():
        ctx = command.make_context(name, [], resilient_parsing=True)
        found += [(name, ctx, param) for param in command.get_params(ctx) if param.param_type_name == "option"]
    return found


def test_options_sharing_a_name_share_help_and_type() -> None:
    seen: dict[str, tuple[str, str, str]] = {}
    clashes = []
    for command, ctx, param in options():
        name = max(param.opts, key=len)
        if (command, name) in DIFFERENT:
            continue
        meaning = (DEFAULT_NOTE.sub("", param.help or ""), param.display_type(ctx), str(param.is_flag))
        first = seen.setdefault(name, (command, *meaning))
        if first[1:] != meaning:
            clashes.append(f"{name}: {first[0]} says {first[1:]}, {command} says {meaning}")
    assert not clashes, "\n".join(clashes)
    assert len(seen) > 40  # the walk really saw the commands' options


def test_every_option_has_help_and_no_default_hides_in_brackets() -> None:
    for command, _, param in options():
        if param.hidden:
            continue
        assert param.help, f"{command} {param.opts} has no help"
        assert not re.search(r"\[[a-z$][^\]']*\]", param.help), f"{command} {param.opts}: Rich would swallow a [..] in its help"
        if param.default not in (None, False) and not param.is_flag:
            assert "(default: " in param.help, f"{command} {param.opts} does not show its default"


@pytest.mark.parametrize("command", ["tile", "embed", "pretrain-warmup", "train", "generate", "eval"])
def test_help_shows_switches_without_a_type_and_hides_aliases(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    assert "--log-format" in result.output and "--verbose" in result.output
    if command == "generate":
        text = " ".join(result.output.split())
        assert "--n-samples" in text and "(default: 8; must be at least 1)" in text and "--genes-to-plot" in text and "--keep-going" in text
        assert not re.search(r"--samples\b|--plot\b|--slide\b", text)


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], result.output
    assert "╭" not in result.output and "Traceback" not in result.output and "Possible options" not in result.output
    return lines[0]


def test_unknown_flag_names_it_a_close_one_and_the_valid_ones() -> None:
    line = one_line_error(["tile", "--spot", "x.h5ad"])
    assert "no such option --spot" in line and "did you mean --spots?" in line and "--target-mpp" in line


def test_bad_and_missing_values_name_the_flag() -> None:
    assert "generate --n-samples" in one_line_error(["generate", "--n-samples", "many"])
    line = one_line_error(["eval", "--pred"])
    assert "--pred needs a value" in line and "--truth" in line
    assert "hinge eval: --pred is required" in one_line_error(["eval"])
    assert "--log-format" in one_line_error(["--log-format", "fancy", "train"])


def test_paths_are_checked_for_file_or_folder_before_the_command_runs(tmp_path: Path) -> None:
    folder = tmp_path / "a folder"
    folder.mkdir()
    assert "tile --spots" in one_line_error(["tile", "--spots", str(folder)])
    assert "tile --samples" in one_line_error(["tile", "--samples", str(folder)])
    assert "--visium" in one_line_error(["tile", "--visium", str(tmp_path / "missing")])
    assert "eval --pred" in one_line_error(["eval", "--pred", str(folder), "--truth", str(folder)])
    (tmp_path / "file.txt").write_text("x")
    assert "--run" in one_line_error(["train", "--run", str(tmp_path / "file.txt")])
    line = one_line_error(["pretrain-warmup", "--run", str(tmp_path / "run"), "--corpus", str(folder)])
    assert "--corpus" in line and "is a folder" in line


def test_old_spellings_still_work_with_a_warning(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--samples", "2", "--plot", "G1", "--sample-id", "x", "--run", str(tmp_path)])
    assert result.exit_code == 2  # no trained model: but both old flags were understood
    assert "--samples is deprecated; use --n-samples" in result.output and "--plot is deprecated" in result.output
    assert "no trained model" in result.output


def test_a_numeric_setting_shows_its_range_in_help_and_refuses_a_value_outside_it(tmp_path: Path) -> None:
    ranged = {(command, max(param.opts, key=len)): param.help for command, _, param in options()}
    assert ranged["pretrain-warmup", "--seed"].endswith("(default: 0; must be a finite number, 0 or more).")
    assert "(default: 50; must be at least 1)" in ranged["train", "--epochs"]
    result = runner.invoke(app, ["pretrain-warmup", "--seed", "-1", "--run", str(tmp_path / "run")])
    assert result.exit_code == 2 and "train.seed = -1 must be a finite number, 0 or more" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5"])
@pytest.mark.parametrize("args", [["tile", "slide.tif", "--mpp"], ["generate", "slide.tif", "--mpp"], ["embed", "--patch-size-level0"]])
def test_a_slide_fact_outside_its_range_is_refused_at_parse_time(tmp_path: Path, args: list[str], value: str) -> None:
    line = one_line_error([*args, value, "--run", str(tmp_path / "run")])
    assert f"{args[-1]} " in line and "must be a finite number above 0" in line
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize(("shard", "says"), [("0/0", "has no shards (N = 0)"), ("3/2", "I must be between 0 and 1"),
                                             ("-1/2", "I must be between 0 and 1"), ("a/b", "is not of the form I/N")])
def test_a_shard_outside_its_range_is_one_line(tmp_path: Path, shard: str, says: str) -> None:
    assert says in one_line_error(["embed", "--shard", shard, "--run", str(tmp_path / "run")])


ELSEWHERE = {"--array": "sbatch's, in the SLURM hint", "--flag": "a placeholder in a docstring", "--size": "hinge_cli.synthetic.slides's own script",
             "--version": "the group's option, not a command's"}


def test_every_flag_a_message_names_exists() -> None:
    """An error or a hint that names a flag names one a command has (issue 36: --threshold, --d-model ... did not)."""
    import ast

    flags = {o for _, _, param in options() for o in (*param.opts, *getattr(param, "secondary_opts", ())) if o.startswith("--")}
    named = {}
    for path in (Path(__file__).resolve().parents[2] / "hinge_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    named.setdefault(flag, f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setting" and isinstance(node.args[0], ast.Constant):
                named.setdefault(f"--{node.args[0].value}", f"{path.name}:{node.lineno}")  # an error names a setting so
    assert len(named) > 40 and "--overwrite" in named  # the scan sees the messages and the settings errors name
    assert {flag: where for flag, where in named.items() if flag not in flags and flag not in ELSEWHERE} == {}
