"""Helpers for the status-page tests and benchmarks/screenshot.py: a service with its page
on a free loopback port (in this process, fast polls), and a real headless Chromium."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
import yaml

from agent.config import HttpSettings, Limits, NotifyRule, config_from_args
from agent.daemon import WatchService

CHROMIUM = os.environ.get("VIP_AGENT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VIP_AGENT_CHROMEDRIVER", "/usr/bin/chromedriver")
TEMPLATE = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}


def require_tool(path: str, package: str) -> None:
    """Skip without ``path``; in CI (``CI=true``) fail instead: .ci/run installs ``package``."""
    import pytest

    if Path(path).exists() or shutil.which(path):
        return
    message = f"{path} is missing (Debian package {package}; .ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def chromium(profile: Path, width: int = 1360, height: int = 1000) -> Any:
    """A headless Chromium driven by chromedriver, with a fresh profile and no network chatter."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        f"--user-data-dir={profile}", f"--window-size={width},{height}",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


@contextmanager
def headless_chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium with its profile in ``tmp_path`` (the test skipped without one,
    see :func:`require_tool`); quit at the end. Tests wrap it in their ``browser`` fixture
    (pytest is imported lazily here: benchmarks/screenshot.py uses this module)."""
    require_tool(CHROMIUM, "chromium")
    require_tool(CHROMEDRIVER, "chromium-driver")
    driver = chromium(tmp_path / "profile")
    try:
        yield driver
    finally:
        driver.quit()


def make_drop(root: Path, template: dict[str, Any] | None = None) -> Path:
    drop = root / "drop"
    drop.mkdir(parents=True)
    (drop / "job.yaml").write_text(yaml.safe_dump(template or TEMPLATE), encoding="utf-8")
    return drop


def page_service(
    root: Path, server_url: str, drop: Path, *, read_token: bool = False,
    notify: tuple[NotifyRule, ...] = (), **drop_fields: Any,
) -> WatchService:  # fmt: skip
    """A WatchService on ``drop`` with its status page on 127.0.0.1 (free port), fast polls."""
    config = config_from_args(
        drop, server=server_url, output=root / "out", state=root / "state", settle=0.3,
    )  # fmt: skip
    d = replace(config.drops[0], limits=Limits(2, 2, 1), poll_interval=0.1, notify=notify, **drop_fields)
    config = replace(config, drops=(d,), http=HttpSettings("127.0.0.1", 0, read_token=read_token, refresh=0.25))
    return WatchService(
        config,
        debounce=0.05,
        runner_options={"poll_min": 0.1, "poll_max": 0.3},
        scheduler_options={"poll_journal": 0.2, "auth_retry": (0.2, 1.0)},
        client_options={"retries": 1, "backoff": 0.1},
        grace=1.0,
        health_interval=0.2,
    )


class Page:
    """HTTP access to a running status page (URL and token from the state folder)."""

    def __init__(self, state: Path) -> None:
        self.url = (state / "http-url").read_text().strip()
        self.token = (state / "http-token").read_text().strip()
        self.http = requests.Session()

    def get(self, path: str, **headers: str) -> requests.Response:
        return self.http.get(self.url.rstrip("/") + path, headers=headers, timeout=10)

    def post(self, path: str, token: str | None = None, **headers: str) -> requests.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.post(self.url.rstrip("/") + path, headers=headers, timeout=10)
