"""The systemd notify protocol against a real AF_UNIX datagram socket bound here."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import notify
from agent.notify import Notifier

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket playing systemd, and the environment pointing at it."""
    folder = tmp_path
    if len(str(folder / "notify")) > 100:  # sun_path holds 108 bytes
        folder = Path(tempfile.mkdtemp(prefix="n"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return got


def _poll(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def test_ready_status_watchdog_stopping(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    assert notify.ready(env=env) is True
    assert sock.recv(4096) == b"READY=1"
    assert notify.status("watching 2 folders", env=env)
    assert sock.recv(4096) == b"STATUS=watching 2 folders"
    assert notify.watchdog_ping(env=env)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notify.stopping(env=env)
    assert sock.recv(4096) == b"STOPPING=1"
    assert notify.ready("up", env=env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_status_cannot_inject_assignments(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    notify.status("bad name\nREADY=1\n", env=env)
    assert sock.recv(4096) == b"STATUS=bad name READY=1"


def test_reloading_and_extend_timeout(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    notify.reloading(env=env)
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0
    notify.extend_timeout(90, env=env)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux only")
def test_abstract_namespace() -> None:
    name = f"vip-agent-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert notify.ready(env={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_systemd_every_call_is_a_no_op(tmp_path: Path) -> None:
    assert notify.ready(env={}) is False
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_interval() -> None:
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.5
    assert notify.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}) == 0.5
    assert notify.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_notifier_pings_only_while_alive(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    alive = threading.Event()
    alive.set()
    notifier = Notifier(alive.is_set, env={**env, "WATCHDOG_USEC": "200000"})
    assert notifier.interval == 0.2
    assert notifier.ready("started")  # before start(): no ping can come first
    assert sock.recv(4096) == b"READY=1\nSTATUS=started"
    notifier.start()
    try:
        assert sock.recv(4096) == b"WATCHDOG=1"  # at half the interval
        assert sock.recv(4096) == b"WATCHDOG=1"
        alive.clear()  # the main loop hangs
        _poll(lambda: notifier.withheld >= 1)
        _drain(sock)  # a ping may have left just before
        pings = notifier.pings
        _poll(lambda: notifier.withheld >= 3)
        assert _drain(sock) == []
        assert notifier.pings == pings
        alive.set()  # it recovers
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.stop()
    assert notifier._thread is None


def test_notifier_heartbeat_mode(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    with Notifier(env={**env, "WATCHDOG_USEC": "200000"}) as notifier:
        notifier.heartbeat()
        assert sock.recv(4096) == b"WATCHDOG=1"
        # no more heartbeats: after one interval the pings stop
        _poll(lambda: notifier.withheld >= 1)


def test_notifier_broken_liveness_check_withholds(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener

    def broken() -> bool:
        raise RuntimeError("boom")

    with Notifier(broken, env={**env, "WATCHDOG_USEC": "100000"}) as notifier:
        _poll(lambda: notifier.withheld >= 2)
        assert notifier.pings == 0
    assert _drain(sock) == []


def test_notifier_without_watchdog_starts_no_thread(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    notifier = Notifier(env=env)
    notifier.start()
    assert notifier.interval is None and notifier._thread is None
    assert notifier.enabled
    assert notifier.status("idle")
    assert sock.recv(4096) == b"STATUS=idle"
    notifier.stop()
    assert Notifier(env={}).enabled is False
