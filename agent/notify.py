"""The systemd notify protocol (``sd_notify``) with the standard library.

Each message is one datagram of ``KEY=VALUE`` lines sent to the
``AF_UNIX``/``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
means the Linux abstract namespace). Outside systemd the variable is unset and
every call is a cheap no-op returning False, so callers never need to check.

:class:`Notifier` pings the watchdog from a background thread at half the
interval systemd asks for, but only while a liveness callback says the main
loop is making progress: a hung agent stops pinging and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if not path.startswith("/"):
        return None  # vsock and other transports are not for us
    return path


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to systemd. True when it was sent."""
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0)) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", state.split("=", 1)[0], exc)
        return False
    return True


def _one_line(text: str) -> str:
    # a newline would start a new assignment: never let status text inject one
    return " ".join(text.split())


def ready(status_text: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """Startup finished (``READY=1``), with an optional status line."""
    state = "READY=1" if status_text is None else f"READY=1\nSTATUS={_one_line(status_text)}"
    return notify(state, env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """One line shown by ``systemctl status`` (``STATUS=``)."""
    return notify(f"STATUS={_one_line(text)}", env=env)


def watchdog_ping(*, env: Mapping[str, str] | None = None) -> bool:
    """Tell the watchdog we are alive (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1", env=env)


def stopping(*, env: Mapping[str, str] | None = None) -> bool:
    """Shutdown started (``STOPPING=1``)."""
    return notify("STOPPING=1", env=env)


def reloading(*, env: Mapping[str, str] | None = None) -> bool:
    """Configuration reload started (``RELOADING=1``); send :func:`ready` when done."""
    usec = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC on Linux, as systemd expects
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", env=env)


def extend_timeout(seconds: float, *, env: Mapping[str, str] | None = None) -> bool:
    """Ask for more time to start or stop (``EXTEND_TIMEOUT_USEC=``), e.g. during a long catch-up scan."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", env=env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process, in seconds, or None."""
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process (we are a child)
        except ValueError:
            return None
    return usec / 1_000_000


class Notifier:
    """Service-side notify helper with a watchdog thread.

    ``alive`` is called before each ping; the ping is sent only when it returns
    True. Without ``alive``, the main loop must call :meth:`heartbeat` at least
    once per watchdog interval. Usage::

        notifier = Notifier(alive=loop.is_healthy)
        notifier.start()
        notifier.ready("watching 2 folders")
        ...
        notifier.stop()
    """

    def __init__(
        self,
        alive: Callable[[], bool] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        interval: float | None = None,
    ) -> None:
        self._env: Mapping[str, str] = dict(os.environ if env is None else env)
        self._alive = alive
        #: systemd's watchdog timeout in seconds (None: no watchdog)
        self.interval = interval if interval is not None else watchdog_interval(self._env)
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: pings sent and pings withheld because the loop looked stuck
        self.pings = 0
        self.withheld = 0

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return _address(self._env) is not None

    def heartbeat(self) -> None:
        """The main loop made progress (used when no ``alive`` callback was given)."""
        self._last_beat = time.monotonic()

    def _is_alive(self) -> bool:
        if self._alive is not None:
            try:
                return bool(self._alive())
            except Exception:  # a broken liveness check means we cannot vouch for the loop
                log.exception("watchdog liveness check failed")
                return False
        assert self.interval is not None
        return time.monotonic() - self._last_beat < self.interval

    def _run(self) -> None:
        assert self.interval is not None
        period = self.interval / 2
        while not self._stop.wait(period):
            if self._is_alive():
                if watchdog_ping(env=self._env):
                    self.pings += 1
            else:
                self.withheld += 1
                if self.withheld == 1 or self.withheld % 10 == 0:
                    log.warning("main loop looks stuck: withholding the systemd watchdog ping")

    def start(self) -> None:
        """Start the watchdog thread when systemd asked for a watchdog."""
        if self.interval is None or not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vip-agent-watchdog", daemon=True)
        self._thread.start()

    def ready(self, status_text: str | None = None) -> bool:
        self.heartbeat()
        return ready(status_text, env=self._env)

    def status(self, text: str) -> bool:
        return status(text, env=self._env)

    def reloading(self) -> bool:
        return reloading(env=self._env)

    def stopping(self) -> bool:
        return stopping(env=self._env)

    def stop(self) -> None:
        """Stop the watchdog thread (does not send STOPPING=1)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Notifier:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
