"""Bandwidth limits per server (like rclone's ``--bwlimit``): rates, a daily schedule, a limiter.

agent.yaml, in ``defaults`` or per drop folder::

    bandwidth:
      upload: 20MB/s
      download: 50MB/s
      schedule:
        - {at: '08:00-19:00', upload: 5MB/s}     # working hours (local time)
        - {at: '19:00-08:00', download: off}     # wraps midnight

A rate is ``20MB/s`` (1 MB = 1,000,000 bytes), ``5MiB/s`` (1 MiB = 1,048,576 bytes),
``500kB/s``, ``160Mbit/s``, a bare number of bytes per second, or ``off`` (no limit).
A schedule window overrides the base rate of the directions it names while the local
time is inside it; the first window listed that contains the time wins.

The limit is per server, shared by every dataset and every connection of the process:
transfers report the bytes they move to :meth:`agent.pacer.ServerBudget.consume`, which
calls :meth:`Limiter.consume` here, which blocks long enough to keep each direction
under its current rate. When several drop folders of one server give limits, the
smallest applies at each moment (as for ``max_running``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

DIRECTIONS = ("upload", "download")
#: the bucket holds at most this many seconds of the rate: a transfer starting after a
#: quiet spell may go this far ahead of the limit, never more
BURST_SECONDS = 0.1
#: a wait is cut into slices this long, so that a stop or a schedule change is seen soon
WAIT_SLICE = 0.25

_RATE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?)?\s*(b|bit|bits|byte|bytes)?\s*(/\s*s|ps)?\s*$",
    re.IGNORECASE,
)
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_OFF = ("off", "none", "unlimited", "no")
RATE_HELP = "a rate such as 20MB/s, 5MiB/s, 500kB/s, 160Mbit/s, or off"


class RateError(ValueError):
    """A rate or window that cannot be read; the message says what is expected."""


def parse_rate(value: Any) -> float | None:
    """Bytes per second from ``20MB/s``, ``5MiB/s``, ``160Mbit/s``, a number; None for ``off``.

    Raises :class:`RateError` with a message a user understands.
    """
    if value is None or value is False:
        return None
    if isinstance(value, bool):
        raise RateError(f"expected {RATE_HELP}, not {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise RateError(f"must be more than 0 bytes per second (or off), not {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise RateError(f"expected {RATE_HELP}, not {value!r}")
    text = value.strip()
    if text.lower() in _OFF:
        return None
    m = _RATE.match(text)
    if m is None:
        raise RateError(f"expected {RATE_HELP}, not {value!r}")
    number, prefix, binary, unit, _per_second = m.groups()
    if unit == "b" and prefix:
        # "Mb/s" is megabits to a network engineer and megabytes to many users: ask
        raise RateError(
            f"{value!r} is ambiguous: write {number}{prefix.upper()}B/s (bytes) or "
            f"{number}{prefix.upper()}bit/s (bits)"
        )
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    rate = float(number) * (1024 if binary else 1000) ** power
    if unit and unit.lower().startswith("bit"):
        rate /= 8
    if rate <= 0:
        raise RateError(f"must be more than 0 (or off), not {value!r}")
    return rate


def format_rate(rate: float | None) -> str:
    """``20 MB/s``; ``off`` for no limit."""
    if rate is None:
        return "off"
    value = float(rate)
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if value < 1000 or unit == "GB/s":
            return f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} GB/s"  # pragma: no cover - the loop returns


@dataclass(frozen=True)
class Window:
    """``at: 'HH:MM-HH:MM'`` (local time; ``start > end`` wraps midnight) and its rates.

    A direction absent from the window (``...`` in ``rates``) keeps the base rate.
    """

    start: int  # minutes after midnight
    end: int
    rates: tuple[tuple[str, float | None], ...]  # (direction, rate) for the directions given
    text: str = ""

    def contains(self, minute: int) -> bool:
        if self.start == self.end:
            return True  # '00:00-00:00': the whole day
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def rate(self, direction: str) -> tuple[bool, float | None]:
        """(whether this window sets ``direction``, its rate)."""
        for d, r in self.rates:
            if d == direction:
                return True, r
        return False, None


def parse_window(text: Any) -> tuple[int, int]:
    """``'08:00-19:00'`` as minutes after midnight (start, end)."""
    m = _WINDOW.match(text) if isinstance(text, str) else None
    if m is None:
        raise RateError(f"expected a time window such as '08:00-19:00' (local time), not {text!r}")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59 or (h1 == 24 and m1) or (h2 == 24 and m2):
        raise RateError(f"{text!r} is not a time of day (00:00 to 24:00)")
    return (h1 * 60 + m1) % 1440, (h2 * 60 + m2) % 1440


@dataclass(frozen=True)
class BandwidthConfig:
    """One ``bandwidth:`` setting: base rates per direction (None: no limit) and a schedule."""

    upload: float | None = None
    download: float | None = None
    schedule: tuple[Window, ...] = ()

    def rate(self, direction: str, minute: int) -> float | None:
        """The limit of ``direction`` at ``minute`` after local midnight (None: none)."""
        for w in self.schedule:
            if w.contains(minute):
                given, rate = w.rate(direction)
                if given:
                    return rate
                break  # the first window containing the time decides; others are not mixed in
        return self.upload if direction == "upload" else self.download

    @property
    def limited(self) -> bool:
        """Whether anything is ever limited (a config of only ``off`` is no limit at all)."""
        if self.upload is not None or self.download is not None:
            return True
        return any(r is not None for w in self.schedule for _, r in w.rates)

    def describe(self) -> str:
        """``upload 20 MB/s, download off; 08:00-19:00 upload 5 MB/s``."""
        text = f"upload {format_rate(self.upload)}, download {format_rate(self.download)}"
        for w in self.schedule:
            parts = ", ".join(f"{d} {format_rate(r)}" for d, r in w.rates)
            text += f"; {w.text} {parts}"
        return text


def parse_bandwidth(value: Any, error: Callable[[str, str], ConfigError]) -> BandwidthConfig | None:
    """The ``bandwidth:`` setting of agent.yaml, or None when absent.

    ``error(key, problem)`` builds the :class:`ConfigError` naming the file and the key
    (``key`` is relative to the mapping holding ``bandwidth``, e.g. ``bandwidth.upload``).
    A bare rate (``bandwidth: 10MB/s``) limits both directions.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        try:
            rate = parse_rate(value)
        except RateError as err:
            raise error("bandwidth", f"{err} (or a mapping: upload, download, schedule)") from None
        return BandwidthConfig(rate, rate)
    unknown = [str(k) for k in value if k not in ("upload", "download", "schedule")]
    if unknown:
        raise error(f"bandwidth.{unknown[0]}", "unknown setting; known: upload, download, schedule")
    rates: dict[str, float | None] = {}
    for direction in DIRECTIONS:
        try:
            rates[direction] = parse_rate(value.get(direction))
        except RateError as err:
            raise error(f"bandwidth.{direction}", str(err)) from None
    raw = value.get("schedule") or []
    if not isinstance(raw, list):
        raise error("bandwidth.schedule", "must be a list of {at: '08:00-19:00', upload: RATE, download: RATE}")
    windows = []
    for i, item in enumerate(raw):
        where = f"bandwidth.schedule[{i}]"
        if not isinstance(item, Mapping):
            raise error(where, "must be a mapping such as {at: '08:00-19:00', upload: 5MB/s}")
        extra = [str(k) for k in item if k not in ("at", "upload", "download")]
        if extra:
            raise error(f"{where}.{extra[0]}", "unknown setting; known: at, upload, download")
        if "at" not in item:
            raise error(f"{where}.at", "is required: the local-time window, e.g. '08:00-19:00'")
        try:
            start, end = parse_window(item["at"])
        except RateError as err:
            raise error(f"{where}.at", str(err)) from None
        given: list[tuple[str, float | None]] = []
        for direction in DIRECTIONS:
            if direction in item:
                try:
                    given.append((direction, parse_rate(item[direction])))
                except RateError as err:
                    raise error(f"{where}.{direction}", str(err)) from None
        if not given:
            raise error(where, "names no rate: give upload:, download: or both")
        windows.append(Window(start, end, tuple(given), str(item["at"]).strip()))
    return BandwidthConfig(rates["upload"], rates["download"], tuple(windows))


def parse_bwlimit(text: str) -> BandwidthConfig:
    """``--bwlimit RATE`` (both directions) or ``UP:DOWN`` (as rclone); raises RateError."""
    up, sep, down = text.partition(":")
    if sep:
        return BandwidthConfig(parse_rate(up), parse_rate(down))
    rate = parse_rate(text)
    return BandwidthConfig(rate, rate)


def _local_minute() -> int:
    now = time.localtime()
    return now.tm_hour * 60 + now.tm_min


class Limiter:
    """A token bucket per direction whose rate follows the schedule; shared by threads.

    :meth:`consume` is called with the bytes just moved (or about to be); it takes them
    from the bucket, possibly into debt, and sleeps until the debt is paid: the bytes of
    every caller together stay under the rate, whatever the chunk sizes. ``configs`` are
    the settings of every drop folder on this server: the smallest rate applies.
    ``clock`` (monotonic seconds), ``minute`` (local minute of the day) and ``sleep`` are
    injectable for tests; ``stop`` ends every wait at once (the agent is stopping).
    """

    def __init__(
        self,
        configs: Sequence[BandwidthConfig] | BandwidthConfig,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        minute: Callable[[], int] = _local_minute,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.configs = (configs,) if isinstance(configs, BandwidthConfig) else tuple(configs)
        self.stop = stop or threading.Event()
        self._clock = clock
        self._minute = minute
        self._sleep = sleep or (lambda s: self.stop.wait(s))
        self._lock = threading.Lock()
        self._tokens = dict.fromkeys(DIRECTIONS, 0.0)
        self._filled = dict.fromkeys(DIRECTIONS, clock())
        #: seconds callers spent waiting, per direction (for /metrics)
        self.waited = dict.fromkeys(DIRECTIONS, 0.0)

    def rate(self, direction: str) -> float | None:
        """The limit in force now for ``direction`` (bytes/s), None when unlimited."""
        minute = self._minute()
        rates = [r for c in self.configs if (r := c.rate(direction, minute)) is not None]
        return min(rates) if rates else None

    def current(self) -> dict[str, float | None]:
        """The limit of each direction now (for ``status``, the page, ``/metrics``)."""
        return {d: self.rate(d) for d in DIRECTIONS}

    def consume(self, direction: str, nbytes: int) -> None:
        """Account ``nbytes`` moved in ``direction``; block while over the current rate."""
        if nbytes <= 0 or self.stop.is_set():
            return
        rate = self.rate(direction)
        with self._lock:
            now = self._clock()
            if rate is None:
                self._tokens[direction] = 0.0
                self._filled[direction] = now
                return
            tokens = self._tokens[direction] + (now - self._filled[direction]) * rate
            tokens = min(tokens, rate * BURST_SECONDS) - nbytes
            self._tokens[direction] = tokens
            self._filled[direction] = now
        if tokens >= 0:
            return
        # pay the debt: others arriving meanwhile see it and queue behind
        wait = -tokens / rate
        started = self._clock()
        while not self.stop.is_set():
            left = wait - (self._clock() - started)
            if left <= 1e-6:  # a float remainder is not worth a sleep (nor an endless loop)
                break
            self._sleep(min(left, WAIT_SLICE))
        with self._lock:
            self.waited[direction] += self._clock() - started


def install(drops: Sequence[Any], stop: threading.Event | None = None) -> dict[str, Limiter | None]:
    """Give every server of ``drops`` (drop-folder settings with ``server`` and ``bandwidth``)
    the limiter its drop folders ask for (None: no limit), through its
    :class:`agent.pacer.ServerBudget`; returns them by server. Called at start and on SIGHUP."""
    from agent.pacer import budget_for

    by_server: dict[str, list[BandwidthConfig]] = {}
    for d in drops:
        configs = by_server.setdefault(d.server, [])
        if d.bandwidth is not None and d.bandwidth.limited:
            configs.append(d.bandwidth)
    out: dict[str, Limiter | None] = {}
    for server, configs in sorted(by_server.items()):
        limiter = Limiter(configs, stop=stop) if configs else None
        budget_for(server).set_bandwidth(limiter)
        out[server] = limiter
    with _INSTALLED_LOCK:
        for server in set(_INSTALLED) - set(out):  # a server no drop folder uses any more
            budget_for(server).set_bandwidth(None)
        _INSTALLED.clear()
        _INSTALLED.update(out)
    return out


_INSTALLED: dict[str, Limiter | None] = {}
_INSTALLED_LOCK = threading.Lock()


def current_limits() -> dict[str, dict[str, float | None]]:
    """Server -> {upload, download} limit in force now (bytes/s; None: none), of what
    :func:`install` set up in this process (for the page and ``/metrics``)."""
    with _INSTALLED_LOCK:
        installed = dict(_INSTALLED)
    return {
        server: limiter.current() if limiter is not None else dict.fromkeys(DIRECTIONS)
        for server, limiter in installed.items()
    }


def describe_servers(drops: Sequence[Any]) -> list[str]:
    """One line per server whose drop folders set a limit: what applies now (``status``)."""
    by_server: dict[str, list[BandwidthConfig]] = {}
    for d in drops:
        if d.bandwidth is not None and d.bandwidth.limited:
            by_server.setdefault(d.server, []).append(d.bandwidth)
    lines = []
    for server, configs in sorted(by_server.items()):
        now = Limiter(configs).current()
        lines.append(f"bandwidth limit on {server} now: upload {format_rate(now['upload'])}, "
                     f"download {format_rate(now['download'])}")  # fmt: skip
    return lines
