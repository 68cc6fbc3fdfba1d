"""One policy for every wait, one budget per server.

Every wait of the agent (a request's retry, a launch refused for capacity, a delete being polled,
an execution's status, a refused key being re-checked, a webhook being re-sent) takes its numbers
from one named :class:`WaitPolicy` in :data:`POLICIES`, the only place those numbers live (they
are documented in docs/vip-rest.md).

Everything that paces one server is one :class:`ServerBudget`, shared by every dataset and every
command of this process (:func:`budget_for`):

- a token bucket on requests per second (``max_rate``, with a small burst);
- a number of concurrent transfer slots (``max_transfers``), lowered for a while when the server
  answers transfer timeouts and raised back one slot at a time once it stops;
- the launch backoff: a launch refused for capacity (2001) or by a busy engine (2003, 8000
  "no resources") holds every launch on that server for a growing wait, reset by a launch that
  is accepted;
- a bandwidth hook: every block a transfer moves is reported to :meth:`ServerBudget.consume`,
  which blocks when a limiter is set.

A request made while its thread holds a transfer slot does not take a request token: the slot is
what paces transfers (at most ``max_transfers`` in flight, each as slow as the server makes it),
so a lab's 2,000 small files are bounded by the server's own speed and not by an API-call rate
meant for polls and listings.

This module depends on the standard library only; every clock is monotonic.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MAX_RATE",
    "DEFAULT_MAX_TRANSFERS",
    "POLICIES",
    "TRANSFER_RECOVERY",
    "Bandwidth",
    "ServerBudget",
    "WaitPolicy",
    "budget_for",
    "budgets",
    "configure_transfers",
    "policy",
]

#: requests per second per server (polls, listings, launches, folder checks)
DEFAULT_MAX_RATE = 5.0
#: requests that may go at once after a quiet spell
DEFAULT_BURST = 10
#: concurrent transfers per server; the production platform serves about 20 for everybody
DEFAULT_MAX_TRANSFERS = 8
#: seconds without a transfer timeout before one transfer slot is given back
TRANSFER_RECOVERY = 60.0

_random = random.Random()


@dataclass(frozen=True)
class WaitPolicy:
    """Exponential backoff with jitter: ``base`` doubling per attempt up to ``cap``.

    ``jitter`` spreads each delay by +- that share at random, so processes that failed together
    do not come back together (0 = exact). ``deadline`` is how long callers keep trying, in
    seconds from their first attempt (None = never give up).
    """

    base: float
    cap: float
    jitter: float = 0.5
    deadline: float | None = None

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``attempt`` (0 = the first retry): about ``base``,
        doubling, at most ``cap`` before jitter."""
        exact = min(self.cap, self.base * 2.0 ** max(0, min(attempt, 60)))
        if self.jitter <= 0 or exact <= 0:
            return exact
        spread = (rng or _random).uniform(-self.jitter, self.jitter)
        return max(0.0, exact * (1.0 + spread))

    def expired(self, started: float, now: float) -> bool:
        """True once ``deadline`` seconds have passed between ``started`` and ``now``
        (monotonic seconds)."""
        return self.deadline is not None and now - started >= self.deadline


#: the named policies (see docs/vip-rest.md, "Waits"); the only place these numbers live
POLICIES: dict[str, WaitPolicy] = {
    # the client re-sending an idempotent request after a network error or a 5xx; the client
    # scales ``base`` by its ``backoff`` and stops at its own per-call deadline
    "retry": WaitPolicy(base=1.0, cap=60.0, jitter=0.5),
    # the runner between steps while the server is unreachable or failing (run gives up after
    # the deadline; watch waits as long as it takes)
    "outage": WaitPolicy(base=5.0, cap=300.0, jitter=0.2, deadline=4 * 3600.0),
    # launches on a server that answered 2000/2001 (its running-executions cap)
    "capacity": WaitPolicy(base=15.0, cap=300.0, jitter=0.2),
    # launches refused "try later" by the engine (2003, 8000 "no resources"/"Workflow is null")
    "engine": WaitPolicy(base=60.0, cap=900.0, jitter=0.2),
    # polling a remote delete (VIP deletes in the background)
    "delete": WaitPolicy(base=0.25, cap=2.0, jitter=0.0, deadline=600.0),
    # execution status polls (the drop folder's ``poll`` overrides base/cap)
    "status": WaitPolicy(base=2.0, cap=120.0, jitter=0.1),
    # the scheduler re-checking a key the server refused
    "auth_probe": WaitPolicy(base=30.0, cap=600.0, jitter=0.1),
    # the scheduler retrying a dataset after an unexpected error (a bug)
    "unexpected": WaitPolicy(base=5.0, cap=300.0, jitter=0.1),
    # re-sending a failed alert webhook
    "webhook": WaitPolicy(base=1.0, cap=60.0, jitter=0.25, deadline=120.0),
}


def policy(name: str) -> WaitPolicy:
    """The named policy; a wrong name is a bug (KeyError naming the known ones)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"no wait policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


class Bandwidth(Protocol):
    """What :meth:`ServerBudget.set_bandwidth` accepts."""

    def consume(self, direction: str, nbytes: int) -> None: ...


class ServerBudget:
    """Everything that paces one server, shared by every dataset and command of this process.

    ``clock`` and ``sleep`` are injectable so the bucket can be tested on a controlled clock.
    """

    def __init__(
        self,
        server: str,
        *,
        max_rate: float = DEFAULT_MAX_RATE,
        burst: int = DEFAULT_BURST,
        max_transfers: int = DEFAULT_MAX_TRANSFERS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._slots = threading.Condition(self._lock)
        self._local = threading.local()
        self._max_rate = _positive_rate(max_rate)
        self._burst = max(1, int(burst))
        self._tokens = float(self._burst)
        self._filled = clock()
        self._max_transfers = max(1, int(max_transfers))
        self._limit = self._max_transfers  # lowered after transfer timeouts
        self._in_use = 0
        self._last_cut: float | None = None
        self._launch_at = 0.0
        self._launch_refusals = 0
        self._launch_policy = "capacity"  # the policy of the backoff running now
        self._bandwidth: Bandwidth | None = None
        self._counts = {
            "requests_total": 0.0,
            "waits_total": 0.0,
            "wait_seconds_total": 0.0,
            "transfers_total": 0.0,
            "transfer_timeouts_total": 0.0,
            "launches_refused_total": 0.0,
            "bytes_uploaded_total": 0.0,
            "bytes_downloaded_total": 0.0,
        }

    def __repr__(self) -> str:
        return f"ServerBudget({self.server!r})"

    # -- requests ------------------------------------------------------------------
    def acquire(self, deadline: float | None = None) -> None:
        """Take one request token, waiting for it when the bucket is empty.

        Tokens are reserved in order (the bucket may go negative), so waiting callers are
        served first come, first served without holding the lock while they wait. With
        ``deadline`` (a :func:`time.monotonic` time) the wait never goes past it: the request
        then goes anyway and the caller's own deadline decides. A thread holding a transfer
        slot takes no token (the slot paces it).
        """
        with self._lock:
            self._counts["requests_total"] += 1
            if getattr(self._local, "slots", 0) or self._max_rate is None:
                return
            now = self._clock()
            self._refill(now)
            self._tokens -= 1.0
            wait = -self._tokens / self._max_rate if self._tokens < 0 else 0.0
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            if wait > 0:
                self._counts["waits_total"] += 1
                self._counts["wait_seconds_total"] += wait
        if wait > 0:
            self._sleep(wait)

    def _refill(self, now: float) -> None:
        if self._max_rate is not None:
            self._tokens = min(
                float(self._burst), self._tokens + (now - self._filled) * self._max_rate
            )
        self._filled = now

    # -- transfers -----------------------------------------------------------------
    @contextmanager
    def transfer(self) -> Iterator[None]:
        """Hold one of the server's transfer slots for the duration of the block.

        Re-entrant: a thread already holding a slot of this server (a caller that wraps a
        whole file in a slot, then the client's own slot per attempt) takes no second one,
        so nesting never waits on itself.
        """
        if getattr(self._local, "slots", 0):
            self._local.slots += 1
            try:
                yield
            finally:
                self._local.slots -= 1
            return
        with self._slots:
            while self._in_use >= self._limit:
                self._slots.wait()
            self._in_use += 1
            self._counts["transfers_total"] += 1
        self._local.slots = getattr(self._local, "slots", 0) + 1
        try:
            yield
        finally:
            self._local.slots -= 1
            with self._slots:
                self._in_use -= 1
                self._recover(self._clock())
                self._slots.notify_all()

    def transfer_timed_out(self) -> int:
        """The server answered a transfer timeout (400 8000 on a transfer): halve the
        concurrent transfers for a while (at least one); returns the new limit."""
        with self._slots:
            self._counts["transfer_timeouts_total"] += 1
            self._limit = max(1, self._limit // 2)
            self._last_cut = self._clock()
            return self._limit

    def _recover(self, now: float) -> None:
        """One slot back per quiet :data:`TRANSFER_RECOVERY` seconds (lock held)."""
        if self._limit < self._max_transfers and (
            self._last_cut is None or now - self._last_cut >= TRANSFER_RECOVERY
        ):
            self._limit += 1
            self._last_cut = now

    def consume(self, direction: str, nbytes: int) -> None:
        """``nbytes`` moved in ``direction`` ("upload"/"download"); blocks while a bandwidth
        limiter says so."""
        key = "bytes_uploaded_total" if direction == "upload" else "bytes_downloaded_total"
        with self._lock:
            self._counts[key] += nbytes
            limiter = self._bandwidth
        if limiter is not None:
            limiter.consume(direction, nbytes)

    def set_bandwidth(self, limiter: Bandwidth | None) -> None:
        """Install (or remove, with None) a limiter with ``.consume(direction, nbytes)``."""
        with self._lock:
            self._bandwidth = limiter

    # -- launches ------------------------------------------------------------------
    def launch_refused(self, code: int | None = None) -> float:
        """A launch was refused for capacity (2000/2001) or by a busy engine (other codes):
        the seconds before launches on this server may be tried again.

        Refusals of launches tried while a wait was already running do not lengthen it (two
        datasets refused together back off once).
        """
        name = "capacity" if code in (None, 2000, 2001) else "engine"
        with self._lock:
            now = self._clock()
            self._counts["launches_refused_total"] += 1
            if now >= self._launch_at:
                self._launch_at = now + policy(name).delay(self._launch_refusals)
                self._launch_refusals += 1
                self._launch_policy = name
            return max(0.0, self._launch_at - now)

    def launch_accepted(self) -> None:
        """A launch went through: the next refusal starts the backoff from the beginning."""
        with self._lock:
            self._launch_refusals = 0
            self._launch_at = 0.0

    def slot_freed(self) -> None:
        """One of this process's executions on the server ended: a backoff for the
        account's cap (2000/2001) ends now (a slot is free); one for a busy engine (2003,
        8000 "no resources") does not, since the engine is the platform's, not ours."""
        with self._lock:
            if self._launch_policy == "capacity":
                self._launch_refusals = 0
                self._launch_at = 0.0

    def launch_wait(self) -> float:
        """Seconds until a launch may be tried on this server (0.0 = now)."""
        with self._lock:
            return max(0.0, self._launch_at - self._clock())

    # -- settings and reading --------------------------------------------------------
    def configure(
        self, *, max_rate: float | None = None, max_transfers: int | None = None
    ) -> None:
        """Change the ceilings (None leaves one as it is; ``max_rate`` 0 means no ceiling)."""
        with self._slots:
            if max_rate is not None:
                self._refill(self._clock())
                self._max_rate = _positive_rate(max_rate)
            if max_transfers is not None:
                self._max_transfers = max(1, int(max_transfers))
                self._limit = min(self._limit, self._max_transfers) if self._last_cut else (
                    self._max_transfers
                )
                self._slots.notify_all()

    def snapshot(self) -> dict[str, float]:
        """The budget's state and counters (for ``/metrics``)."""
        with self._lock:
            now = self._clock()
            self._refill(now)
            return {
                "max_rate": self._max_rate or 0.0,
                "burst": float(self._burst),
                "tokens": max(0.0, self._tokens),
                "transfers_in_use": float(self._in_use),
                "transfers_max": float(self._max_transfers),
                "transfers_limit": float(self._limit),
                "launch_wait": max(0.0, self._launch_at - now),
                **self._counts,
            }


def _positive_rate(rate: float) -> float | None:
    return float(rate) if rate and rate > 0 else None


_BUDGETS: dict[str, ServerBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def _key(server: str) -> str:
    """The registry key of a server URL: scheme and host in lower case, default scheme https,
    no trailing ``/`` or ``/rest`` (callers pass the normalised URL; this only makes two
    spellings of one server share a budget)."""
    text = server.strip()
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    path = parts.path.rstrip("/")
    if path.endswith("/rest"):
        path = path[: -len("/rest")]
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


def _loopback(key: str) -> bool:
    host = (urlsplit(key).hostname or "").lower()
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def budget_for(server: str) -> ServerBudget:
    """The process-wide budget of ``server`` (created with the defaults on first use).

    A server on a loopback address (the local server of tests, demos and benchmarks) gets no
    request ceiling by default: the ceiling protects a platform shared with other users, and
    fifty datasets against the local server would otherwise wait minutes on it. Its transfer
    slots and launch backoff are the usual ones; :meth:`ServerBudget.configure` sets a ceiling.
    """
    key = _key(server)
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(key)
        if budget is None:
            rate = 0.0 if _loopback(key) else DEFAULT_MAX_RATE
            budget = _BUDGETS[key] = ServerBudget(key, max_rate=rate)
        return budget


def configure_transfers(limits: Mapping[str, int]) -> None:
    """Give each server's budget its concurrent transfers (agent.yaml's
    ``max_transfers_per_server``, by server); called at start and on reload."""
    for server, count in limits.items():
        budget_for(server).configure(max_transfers=count)


def budgets() -> list[ServerBudget]:
    """Every budget made so far in this process (for ``/metrics``), by server."""
    with _BUDGETS_LOCK:
        return [_BUDGETS[key] for key in sorted(_BUDGETS)]
