"""`tools/device_check.sh --device cpu`: the prepared GPU check runs end to end on the CPU at its tiny size, so it is
known to work before a device's scarce minutes are spent on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_device_check_runs_on_the_cpu(tmp_path: Path) -> None:
    work, report = tmp_path / "work", tmp_path / "gpu.md"
    done = subprocess.run([str(ROOT / "tools" / "device_check.sh"), "--device", "cpu", "--work", str(work), "--report", str(report)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    assert "Checks: all passed." in text
    for figure in ("default encoder", "training at tiny", "coupled sampler", "reverse sampler", "ViT-L/16 (UNI architecture)"):
        assert figure in text
    again = subprocess.run([str(ROOT / "tools" / "device_check.sh"), "--device", "cpu", "--work", str(tmp_path)],
                           env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert again.returncode != 0 and "was not made by this script" in again.stderr  # never empties a folder of the user's


def test_the_device_check_names_what_is_missing(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    done = subprocess.run([str(ROOT / "tools" / "device_check.sh"), "--device", "cpu"], env={**os.environ, "PYTHON": str(bare / "bin" / "python")},
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "lacks torch typer rich anndata" in done.stderr and "make device-wheels" in done.stderr
