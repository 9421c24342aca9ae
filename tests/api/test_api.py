"""The Python API: the notebook example of docs/python-api.md runs as written, messages use argument names, the import stays light."""

from __future__ import annotations

import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hinge_cli
from hinge_cli import api
from hinge_cli.api import PYTHON
from hinge_cli.errors import HingeError, command, setting

API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def readme_example() -> str:
    """The first python block of docs/python-api.md."""
    section = API_PAGE.read_text().split("# Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


@pytest.mark.slow
def test_the_readme_notebook_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "docs/python-api.md", "exec"), namespace)  # noqa: S102 - the page's own code
    adata, result = namespace["adata"], namespace["result"]
    assert adata.n_obs > 0 and "std" in adata.layers and adata.obsm["spatial"].shape == (adata.n_obs, 2)
    assert result.slides[0].sample == "synth2"
    assert (tmp_path / "runs" / "notebook" / "hinge.yaml").exists()  # the config is recorded, as the CLI does
    printed = capsys.readouterr().out
    assert "AnnData" in printed


def test_errors_name_arguments_not_flags(tmp_path: Path) -> None:
    with pytest.raises(hinge_cli.HingeError) as caught:
        api.train(tmp_path / "empty", warmup=False)
    assert "hinge_cli.api.pretrain_warmup()" in str(caught.value) and "hinge pretrain-warmup" not in str(caught.value)
    named = HingeError(f"{setting('out')} x exists", f"pass {setting('overwrite')}, or run `{command('train')}` with "
                       f"{setting('n-samples', 8)} and {setting('samples')}")
    assert str(named) == "--out x exists; pass --overwrite, or run `hinge train` with --n-samples 8 and --samples"
    assert named.worded(PYTHON) == ("out x exists; pass overwrite=True, or run `hinge_cli.api.train()` with n_samples=8 "
                                    "and sheet")  # tile's --samples CSV is `sheet` in Python


def test_the_command_line_words_the_same_error_in_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    result = CliRunner().invoke(app, ["train", "--run", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "hinge pretrain-warmup" in result.output and "hinge_cli.api" not in result.output


def test_help_renders_the_docstrings() -> None:
    text = pydoc.render_doc(api.generate, renderer=pydoc.plaintext)
    assert "Predict one slide" in text and "sample_id" in text
    for name in ("tile", "embed", "pretrain_warmup", "train", "generate", "evaluate"):
        assert getattr(api, name).__doc__


def test_importing_the_package_does_not_load_torch() -> None:
    code = "import sys, hinge_cli.api; assert 'torch' not in sys.modules and 'anndata' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
