"""Headless Chromium for the page tests (Debian's chromium and chromium-driver, which .ci/run installs).

Where no browser is installed the tests skip with a message, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def _missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must have a browser (.ci/run installs Debian's chromium and chromium-driver)")
    pytest.skip(f"{why}: apt-get install chromium chromium-driver to run the page tests")


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, its console kept."""
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _missing("no chromium or chromedriver on PATH")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ModuleNotFoundError:
        _missing("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, page: Path, timeout: float = 20.0) -> float:
    """Load `page` and wait until its script says it is ready (or failed); the seconds that took."""
    started = time.perf_counter()
    driver.get(Path(page).resolve().as_uri())
    while time.perf_counter() - started < timeout:
        state = driver.execute_script("return window.hinge ? [window.hinge.ready === true, window.hinge.failed || null] : [false, null]")
        if state[1]:
            raise AssertionError(f"the page failed: {state[1]}")
        if state[0]:
            return time.perf_counter() - started
        time.sleep(0.02)
    raise AssertionError(f"the page was not ready within {timeout} s; console: {console_errors(driver)}")


def console_errors(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
