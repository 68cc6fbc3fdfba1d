"""Shared pytest fixtures.

``vip_server``: a fresh, started :class:`agent.localvip.LocalVip` on 127.0.0.1
(random port, tmp storage root) per test. Use ``vip_server.url`` (portal base
URL; REST lives under ``/rest/``) and ``vip_server.api_key``; tweak
``vip_server.faults`` to inject faults. ``vip_api``: a small requests helper
bound to it (see :class:`VipApi`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.localvip import LocalVip


@pytest.fixture
def vip_server(tmp_path: Path) -> Iterator[LocalVip]:
    """A started LocalVip with its storage root in a fresh tmp folder."""
    server = LocalVip(tmp_path / "localvip-root")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class VipApi:
    """Thin ``requests`` helper bound to a LocalVip (real HTTP, keep-alive)."""

    def __init__(self, server: LocalVip, key: str | None = None) -> None:
        self.server = server
        self.base = server.url + "/rest"
        self.http = requests.Session()
        self.http.headers["apikey"] = key if key is not None else server.api_key

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.http.request(method, self.base + path, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def put(self, path: str, **kw: Any) -> requests.Response:
        return self.request("PUT", path, **kw)

    def upload(self, vip_path: str, data: bytes) -> None:
        r = self.put("/path" + vip_path, data=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text

    def launch(self, pipeline: str, inputs: dict[str, Any], name: str = "run", **extra: Any) -> dict[str, Any]:
        body = {"name": name, "pipelineIdentifier": pipeline, "inputValues": inputs, **extra}
        r = self.request("POST", "/executions", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(self, exec_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Poll until the execution leaves Running (deadline, no fixed sleeps)."""
        deadline = time.monotonic() + timeout
        while True:
            info = dict(self.get(f"/executions/{exec_id}").json())
            if info["status"] not in ("Running", "Unknown") or time.monotonic() > deadline:
                return info
            time.sleep(0.05)


@pytest.fixture
def vip_api(vip_server: LocalVip) -> VipApi:
    """A :class:`VipApi` on the ``vip_server`` fixture, with its API key."""
    return VipApi(vip_server)


# Tests never touch the developer's real keyring: keyrings.alt (a test extra) would
# otherwise become the default backend. Credential tests set real backends explicitly.
os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
