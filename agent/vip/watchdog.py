"""Deadlines of HTTP exchanges: one :class:`_Guard` per exchange, one watchdog thread for all.

Every request has an overall deadline; a transfer instead has a minimum-progress rule (at
least ``min_bytes`` every ``window`` seconds). On expiry the watchdog shuts the connection's
socket down, which wakes a blocked read or write with an error. The connection classes of
:mod:`agent.vip.connections` (and :class:`agent.vip.smallput.SmallPut`) attach their socket to
the guard of the request being sent by their thread (:data:`_CURRENT`).
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from typing import Any


class _Guard:
    """Deadline of one HTTP exchange, watched by :data:`_WATCHDOG`.

    ``deadline``: seconds for the whole exchange. ``window``/``min_bytes``: the exchange must
    move at least ``min_bytes`` (reported through :meth:`progress`) in every ``window``
    seconds. On expiry the connection's socket is shut down, which wakes a blocked read or
    write with an error; ``expired`` then says why.
    """

    def __init__(
        self, *, deadline: float | None = None, window: float | None = None, min_bytes: int = 0
    ) -> None:
        now = time.monotonic()
        self.deadline = deadline
        self.window = window
        self.min_bytes = min_bytes
        self._hard = now + deadline if deadline else None
        self._window_end = now + window if window else None
        self._moved = 0
        self._conn: Any = None
        self._lock = threading.Lock()
        self.closed = False
        #: why the exchange was cut ("deadline" or "stalled"), None while it is fine
        self.expired: str | None = None
        first = self._next()
        if first is not None:
            _WATCHDOG.add(self, first)

    def _next(self) -> float | None:
        times = [t for t in (self._hard, self._window_end) if t is not None]
        return min(times) if times else None

    def attach(self, conn: Any) -> None:
        with self._lock:
            self._conn = conn
        if self.expired:
            self._shut()

    def progress(self, count: int) -> None:
        with self._lock:
            self._moved += count

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _WATCHDOG.closed_one()

    def _shut(self) -> bool:
        with self._lock:
            sock = getattr(self._conn, "sock", None)
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def check(self, now: float) -> float | None:
        """Called by the watchdog when due: the next time to check, or None when done."""
        if self.closed:
            return None
        if self.expired is None:
            if self._hard is not None and now >= self._hard:
                self.expired = "deadline"
            elif self._window_end is not None and now >= self._window_end:
                with self._lock:
                    moved, self._moved = self._moved, 0
                if moved < self.min_bytes:
                    self.expired = "stalled"
                else:
                    self._window_end = now + (self.window or 0)
        if self.expired is not None:
            # a socket still being opened is shut as soon as it exists
            return None if self._shut() else now + 0.2
        return self._next()


class _Watchdog:
    """One daemon thread that enforces every :class:`_Guard`'s deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = 0  # guards closed but still in the heap

    def closed_one(self) -> None:
        """A guard ended before its time: drop the dead ones once they are most of the heap
        (a transfer's guard is due minutes later; thousands of small uploads would keep
        thousands of them alive)."""
        with self._cond:
            self._closed += 1
            if self._closed > 256 and self._closed * 2 > len(self._heap):
                self._heap = [item for item in self._heap if not item[2].closed]
                heapq.heapify(self._heap)
                self._closed = 0

    def add(self, guard: _Guard, when: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="vip-client-deadlines", daemon=True
                )
                self._thread.start()
            # the thread sleeps until the earliest time: wake it only when that changed
            # (not once per request: thousands of small uploads would keep waking it)
            if self._heap[0][2] is guard:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, guard = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                if guard.closed:
                    self._closed = max(0, self._closed - 1)
                    continue
            following = guard.check(now)
            if following is not None:
                self.add(guard, following)


_WATCHDOG = _Watchdog()
#: the guard of the request being sent by this thread (read by the connection classes)
_CURRENT = threading.local()


def _attach_current(conn: Any) -> None:
    guard = getattr(_CURRENT, "guard", None)
    if guard is not None:
        guard.attach(conn)
