"""Progress for a log file: plain timestamped lines at a steady cadence, each with done/total, rate and ETA."""

from __future__ import annotations

import re
import time

import pytest

from hinge_cli.cli import terminal
from hinge_cli.cli.terminal import Meter, PlainProgress, clock, setup_output

LINE = re.compile(r"^\d\d:\d\d:\d\d ")


@pytest.fixture()
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HINGE_LOG_FORMAT", "plain")
    setup_output(False, False, fresh=True)
    yield
    setup_output(False, False, "auto", fresh=True)


def test_meter_rate_and_eta() -> None:
    meter = Meter(total=10, started=time.monotonic() - 4.0)
    meter.done = 4
    assert meter.rate() == pytest.approx(1.0, rel=0.05)
    assert meter.eta() == pytest.approx(6.0, rel=0.05)
    assert "4/10 (40%)" in meter.describe() and "ETA 6s" in meter.describe()
    assert Meter(total=None).eta() is None and Meter(total=5).eta() is None
    assert (clock(42), clock(185), clock(7600), clock(None)) == ("42s", "3m05s", "2h06m", "?")


def test_a_loop_reports_every_tenth_with_a_start_line(plain: None, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with terminal.progress("embed") as reporter, reporter.task("samples", 50) as advance:
        for _ in range(50):
            advance(1, status="s0")
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(LINE.match(line) for line in lines)
    assert lines[0].endswith("embed: samples, 50 to do")
    steps = [line for line in lines[1:] if "samples: " in line]
    assert len(steps) == 10 and "50/50 (100%)" in steps[-1] and "5/50 (10%)" in steps[0]
    assert all("/s" in line or "/it" in line for line in steps) and "ETA" in steps[0] and "s0" in steps[0]


def stderr_within(capsys: pytest.CaptureFixture[str], text: str, seconds: float = 20.0) -> str:
    """What the progress thread writes until `text` appears (polled, so a loaded machine only makes it slower)."""
    err, deadline = "", time.monotonic() + seconds
    while text not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capsys.readouterr().err
    return err


def test_fast_nested_loops_stay_quiet_but_a_stalled_one_reports_on_time(plain: None, capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with PlainProgress("train") as reporter, reporter.task("train epochs", 3) as epoch_done:
        with reporter.task("train 1/3", 100) as advance:
            for _ in range(100):
                advance(1)  # nested and fast: no line for each tenth (at most one per PLAIN_MIN_SECONDS)
        epoch_done(1)  # the outermost loop reports every tenth
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[0].endswith("train: train epochs, 3 to do") and "train epochs: 1/3 (33%)" in lines[1]
        assert not any("train 1/3:" in line for line in lines)
        monkeypatch.setattr(terminal, "PLAIN_EVERY_SECONDS", 0.2)
        assert "train epochs: 1/3 (33%)" in stderr_within(capsys, "train epochs: 1/3"), "nothing advances: the tick reports"


def test_a_stage_between_loops_still_says_it_is_alive(plain: None, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(terminal, "PLAIN_EVERY_SECONDS", 0.2)
    with PlainProgress("generate"):  # loading a model, say: no loop is open
        assert "generate: working, " in stderr_within(capsys, "generate: working, ")


def test_quiet_means_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    setup_output(False, True, "plain", fresh=True)
    try:
        with terminal.progress("tile") as reporter, reporter.task("slides", 2) as advance:
            advance(2)
    finally:
        setup_output(False, False, "auto", fresh=True)
    assert capsys.readouterr().err == ""
