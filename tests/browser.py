"""Debian's Chromium, headless, driven by Selenium through Debian's chromedriver (no browser
download: Selenium is given both paths)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--window-size=1400,1000",
)


def _program(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        f"{names[0]} not found: install Debian's chromium and chromium-driver (./dev test does)"
    )


@contextlib.contextmanager
def chromium(workdir: Path, performance_log: bool = False) -> Iterator[webdriver.Chrome]:
    """``performance_log``: the browser's network events, read with ``driver.get_log("performance")``."""
    options = webdriver.ChromeOptions()
    if performance_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    options.binary_location = _program("chromium", "chromium-browser")
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={workdir / 'chromium-profile'}")
    service = Service(executable_path=_program("chromedriver"), log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
