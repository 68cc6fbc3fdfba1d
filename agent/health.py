"""The agent's health at a glance: drop folders, observers, servers, keys, disks.

A :class:`Health` snapshot is what the status page's overview shows and what the
metrics export as gauges. :class:`ServerChecker` asks each server, in a background
thread and at most every ``interval`` seconds, whether it answers and accepts the
key, so that a page view or a scrape never waits on the network.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("vip_agent.health")


@dataclass
class DropHealth:
    path: str
    server: str
    output: str
    observer: str  # native | polling | not watched
    free_bytes: int | None
    disk_low: bool
    last_rescan: float | None
    max_running: int = 1


@dataclass
class ServerHealth:
    url: str
    reachable: bool | None  # None: not checked yet
    key: str  # accepted | refused | missing | unknown
    paused: str | None
    checked: float | None
    message: str = ""


@dataclass
class Health:
    version: str
    started: float
    state: str
    state_free: int | None
    drops: list[DropHealth] = field(default_factory=list)
    servers: list[ServerHealth] = field(default_factory=list)
    now: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def free_bytes(path: str | Path) -> int | None:
    """Free space of the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


@dataclass
class _Check:
    reachable: bool | None = None
    key: str = "unknown"
    message: str = ""
    checked: float | None = None  # wall time, shown on the page
    #: ``time.monotonic()`` of the check: its age decides the next one (a wall-clock jump
    #: back must not stop the checks for hours, nor one forward start them in a loop)
    checked_mono: float | None = None


def _done(reachable: bool | None, key: str, message: str) -> _Check:
    return _Check(reachable, key, message, time.time(), time.monotonic())


class ServerChecker:
    """Cached answers to "does the server answer, and accept the key?"."""

    def __init__(self, probe: Callable[[str], None], *, interval: float = 60.0) -> None:
        #: ``probe(server)`` raises AuthError (key refused or missing) or another error (unreachable)
        self.probe = probe
        self.interval = interval
        self._lock = threading.Lock()
        self._results: dict[str, _Check] = {}
        self._busy: set[str] = set()

    def get(self, server: str) -> _Check:
        """The latest answer; starts a background check when it is older than ``interval``."""
        with self._lock:
            result = self._results.setdefault(server, _Check())
            due = (
                result.checked_mono is None
                or time.monotonic() - result.checked_mono >= self.interval
            )
            if due and server not in self._busy:
                self._busy.add(server)
                threading.Thread(
                    target=self._check, args=(server,), name=f"vip-agent check {server}", daemon=True
                ).start()
            return _Check(**asdict(result))

    def record(self, server: str, *, reachable: bool | None, key: str, message: str = "") -> None:
        """What another part learned (the start-up key check)."""
        with self._lock:
            self._results[server] = _done(reachable, key, message)

    def _check(self, server: str) -> None:
        from agent.errors import CredentialError

        try:
            self.probe(server)
            result = _done(True, "accepted", "")
        except CredentialError as err:  # AuthError is one
            missing = type(err).__name__ == "MissingKey"
            result = _done(not missing, "missing" if missing else "refused", err.message)
        except Exception as err:
            result = _done(False, "unknown", f"{type(err).__name__}: {err}"[:300])
        with self._lock:
            self._results[server] = result
            self._busy.discard(server)
