"""Platforms the runner drives, behind one port (:mod:`agent.backend.port`).

``open_backend(server, key, **options)`` is the one place a VIP client is built (the
service's client provider, ``login``'s key check, ``run``, ``pipelines``, ``demo``).
Backends: :mod:`agent.backend.vip` (VIP's REST API), :mod:`agent.backend.memory`
(in memory, for tests and benchmarks). A new platform is a new module implementing the
port plus a run of ``tests/test_backend_conformance.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.backend.port import (
    LOST_LABEL,
    Backend,
    Engine,
    ExecStatus,
    ExecutionInfo,
    RemoteFile,
    RunState,
    SessionLayout,
    Storage,
)

if TYPE_CHECKING:
    from agent.backend.vip import VipBackend

# The VIP backend (and with it requests/urllib3) is imported when a backend is opened, not
# when the port is: read-only commands such as `vip-agent status` never load the HTTP stack.

__all__ = [
    "LOST_LABEL",
    "Backend",
    "Engine",
    "ExecStatus",
    "ExecutionInfo",
    "RemoteFile",
    "RunState",
    "SessionLayout",
    "Storage",
    "as_backend",
    "open_backend",
]


def open_backend(server: str, key: str, **options: Any) -> VipBackend:
    """The backend for ``server`` with API key ``key``; ``options`` go to
    :class:`agent.vip.VipClient` (``timeout``, ``retries``, ``backoff``...)."""
    from agent.backend.vip import VipBackend
    from agent.vip.client import VipClient

    return VipBackend(VipClient(server, key, **options))


def as_backend(platform: object) -> Backend:
    """``platform`` as a :class:`Backend`: a bare ``VipClient`` (what tests and older callers
    hand the runner) is wrapped in a :class:`VipBackend`; anything else must be a backend."""
    if isinstance(platform, Backend):
        return platform
    from agent.backend.vip import VipBackend
    from agent.vip.client import VipClient

    if isinstance(platform, VipClient):
        return VipBackend(platform)
    if not isinstance(platform, Backend):
        raise TypeError(f"{platform!r} is neither a backend nor a VipClient")
    return platform
