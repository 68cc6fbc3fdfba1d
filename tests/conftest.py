"""Shared pytest fixtures.

``vip_server``: a fresh, started :class:`agent.localvip.LocalVip` on 127.0.0.1
(random port, tmp storage root) per test. Use ``vip_server.url`` (portal base
URL; REST lives under ``/rest/``) and ``vip_server.api_key``; tweak
``vip_server.faults`` to inject faults.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
