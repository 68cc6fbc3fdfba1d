"""The local server's plumbing: request bodies streamed to temp files, request statistics,
the platform-wide transfer cap, landing and sending files."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agent.localvip.codes import (
    generic,
)
from agent.localvip.storage import Storage

log = logging.getLogger("agent.localvip")

CHUNK = 1 << 20
MAX_JSON_BODY = 64 << 20
MAX_LIST_LIMIT = 500
LOCK_AFTER_FAILURES = 5
DROP_STATUSES = [500, 502]


class Dropped(Exception):
    """The connection was dropped on purpose (fault injection)."""


class BodyReader:
    """Reads a request body framed by Content-Length or chunked encoding."""

    def __init__(self, rfile: Any, headers: Any) -> None:
        self.rfile = rfile
        te = (headers.get("Transfer-Encoding") or "").lower()
        self.chunked = "chunked" in te
        length = headers.get("Content-Length")
        try:
            self.remaining = 0 if self.chunked else max(0, int(length or 0))
        except ValueError:
            raise generic(400) from None
        self.chunk_left = 0
        self.done = not self.chunked and self.remaining == 0

    def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes; b"" at the end of the body."""
        if self.done:
            return b""
        if not self.chunked:
            data = self.rfile.read(min(n, self.remaining))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            self.remaining -= len(data)
            self.done = self.remaining == 0
            return data
        if self.chunk_left == 0:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise generic(400) from None
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = self.rfile.readline(8192)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                self.done = True
                return b""
            self.chunk_left = size
        data = self.rfile.read(min(n, self.chunk_left))
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        self.chunk_left -= len(data)
        if self.chunk_left == 0:
            self.rfile.readline(8)  # CRLF after the chunk
        return data

    def read_all(self, limit: int = MAX_JSON_BODY) -> bytes:
        parts, total = [], 0
        while chunk := self.read():
            total += len(chunk)
            if total > limit:
                raise generic(400)
            parts.append(chunk)
        return b"".join(parts)

    def drain(self) -> int:
        total = 0
        while chunk := self.read():
            total += len(chunk)
        return total


class RequestStats:
    """What the server was asked, for tests and benchmarks (bounded: counts, not a log).

    ``counts`` maps a request kind (``upload``, ``mkdir``, ``properties``, ``list``,
    ``exists``, ``content``, ``delete``, ``GET /executions``...) to how many were received,
    and injected events (``launch refused``, ``late landing``, ``transfer wait timeout``,
    ``staged``, ``latency``, ``results delayed``)
    to how many happened; ``peak_in_flight`` is the most requests handled at the same time;
    ``total`` every request, ``per_second`` requests by start second (the last hour),
    ``timeline`` the counts by second and kind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.total = 0
        self.per_second: Counter[int] = Counter()
        #: (second, kind) -> count, so a benchmark can attribute events to a time window
        self.timeline: Counter[tuple[int, str]] = Counter()

    def enter(self) -> None:
        second = int(time.time())
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.total += 1
            self.per_second[second] += 1
            if len(self.per_second) > 3600:
                del self.per_second[min(self.per_second)]

    def snapshot(self) -> dict[str, Any]:
        """Everything above as JSON-ready data (``--stats FILE`` writes it at exit)."""
        with self._lock:
            return {
                "total": self.total, "counts": dict(self.counts),
                "peak_in_flight": self.peak_in_flight,
                "peak_requests_per_second": max(self.per_second.values(), default=0),
                "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
                "timeline": [[sec, kind, n] for (sec, kind), n in sorted(self.timeline.items())],
            }

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def count(self, kind: str) -> None:
        second = int(time.time())
        with self._lock:
            self.counts[kind] += 1
            self.timeline[(second, kind)] += 1
            if len(self.timeline) > 100_000:
                del self.timeline[min(self.timeline)]

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.peak_in_flight = self.in_flight
            self.total = 0
            self.per_second.clear()
            self.timeline.clear()


class TransferGate:
    """The platform-wide pool of storage transfers (GRIDA's upload and download pools).

    ``limit`` is read at each acquire (0 = no cap), so a test may change the fault while
    the server runs. ``peak`` is the most transfers staged at once, ``timeouts`` how many
    transfers waited longer than allowed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.active = 0
        self.peak = 0
        self.timeouts = 0

    def acquire(self, limit: int, wait: float | None) -> bool:
        """Take a slot within ``wait`` seconds (None: however long it takes)."""
        deadline = None if wait is None else time.monotonic() + wait
        with self._cond:
            while limit > 0 and self.active >= limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.timeouts += 1
                    return False
                self._cond.wait(left)
            self.active += 1
            self.peak = max(self.peak, self.active)
            return True

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()


def land_quietly(storage: Storage, tmp: Path, target: Path, vip_path: str, *,
                  make_parents: bool = False) -> None:
    try:
        storage.land(tmp, target, vip_path, make_parents=make_parents)
        log.info("localvip: %s landed late", vip_path)
    except Exception as err:
        log.info("localvip: late landing of %s failed: %s", vip_path, err)
        if tmp.exists():
            tmp.unlink()


def copy_to_socket(f: Any, sock: socket.socket, wfile: Any, count: int) -> None:
    """Send ``count`` bytes of ``f``: zero-copy sendfile, else 1 MiB chunks."""
    offset = 0
    try:
        fd = f.fileno()
        while offset < count:
            sent = os.sendfile(sock.fileno(), fd, offset, min(count - offset, 1 << 30))
            if sent == 0:
                raise ConnectionError("peer closed during download")
            offset += sent
        return
    except (AttributeError, OSError) as err:
        if isinstance(err, (BrokenPipeError, ConnectionError)):
            raise
    f.seek(offset)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while offset < count:
        n = f.readinto(view[: min(CHUNK, count - offset)])
        if not n:
            break
        wfile.write(view[:n])
        offset += n


