"""Shared fixtures: synthetic slides are made once per session, in a temporary folder."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hinge_cli.synthetic.slides import SyntheticSample, make_synthetic_sample

torch.set_num_threads(1)  # tiny models: a second OpenMP thread costs more in synchronisation than it saves

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def _logging_after_the_cli() -> Iterator[None]:
    """A command run in the test runner points hinge's log at the runner's stream, closed once it returns: hand logging
    back to pytest after each test, so the next one's log is captured instead of written to a closed file."""
    yield
    logger = logging.getLogger("hinge_cli")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSample:
    """A 1024 px (512 µm) synthetic slide at 0.5 µm/px with ~20 spots and 100 genes."""
    return make_synthetic_sample(tmp_path_factory.mktemp("synth"), "s0", size_px=1024, mpp=0.5, seed=3)


@pytest.fixture(scope="session")
def synth_fine(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSample:
    """A 0.25 µm/px slide, so 0.5 µm/px patches come from pyramid level 1."""
    return make_synthetic_sample(tmp_path_factory.mktemp("fine"), "f0", size_px=1536, mpp=0.25, seed=5, pitch_um=60, spot_um=40)


@pytest.fixture(scope="session")
def her2st() -> Path:
    path = (SHARED / "her2st").resolve()
    if not (path / "counts").is_dir():
        pytest.skip("shared HER2ST data not present")
    return path
