"""Pickup and start-up cost: the debounce runs within the settle time, READY means caught
up, and a polling observer does not look inside finished datasets. Real folders, journal
and observers."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from agenthelpers import wait_for
from test_watch_detect import folder_for, make_drop, put
from test_watch_service import make_drop as make_service_drop
from test_watch_service import make_service

from agent.config import Readiness
from agent.localvip import LocalVip
from agent.watch import readiness
from agent.watch.detect import Candidates, DropEventHandler, start_observer


@pytest.mark.parametrize(("credit", "expected"), [(10.0, 1.2), (0.0, 2.0)])
def test_settle_counts_from_the_last_write_not_from_the_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, credit: float, expected: float
) -> None:
    drop = make_drop(tmp_path, readiness=Readiness(settle_seconds=2.0, stale_after=0))
    folder, _journal, _clock, ready = folder_for(tmp_path, drop)
    folder.change_credit = credit
    put(drop.path / "subject-1" / "scan.dat", b"1234")
    # the agent looks 0.8 s after the last write (its event debounce). A file's ctime
    # cannot be set into the past, so the wall clock the readiness rule reads is moved on
    real = time.time
    monkeypatch.setattr(readiness.time, "time", lambda: real() + 0.8)
    recheck = folder.check("subject-1")
    assert not ready
    # native events (credit): the 0.8 s already count towards the 2 s; otherwise they add
    assert recheck == pytest.approx(expected, abs=0.1)


def test_ready_only_after_the_catch_up_scan(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_service_drop(tmp_path)
    for i in range(5):
        put(drop / f"subject-{i}" / "data.txt", f"{i}\n".encode())
    service = make_service(tmp_path, vip_server, drop, settle=30)
    service.start()
    try:
        # no waiting: when start() returns (then READY is sent), every dataset was looked at
        names = {d.name for d in service.journal.datasets()} if service.journal else set()
        assert names == {f"subject-{i}" for i in range(5)}
    finally:
        service.stop()


def test_polling_skips_settled_datasets(tmp_path: Path) -> None:
    drop = make_drop(tmp_path, observer="polling", poll_interval=0.05)
    for i in range(3):
        put(drop.path / f"old-{i}" / "scan.dat")
    seen: list[str] = []
    got = threading.Event()

    def notify(name: str) -> None:
        seen.append(name)
        got.set()

    looked: list[str] = []
    settled = {"old-0", "old-1", "old-2"}

    def settled_names() -> set[str]:
        looked.append("poll")
        return set(settled)

    handler = DropEventHandler(Candidates(drop), notify)
    observer, kind = start_observer(drop, handler, logging.getLogger("t"), settled=settled_names)
    try:
        assert kind == "polling"
        # a change inside a settled (finished) dataset is not looked for ...
        put(drop.path / "old-1" / "more.dat")
        # ... a new dataset is seen, and then changes inside it too
        put(drop.path / "new-1" / "scan.dat")
        assert got.wait(10)
        assert seen == ["new-1"]
        got.clear()
        put(drop.path / "new-1" / "scan.dat", b"grown")
        assert got.wait(10)
        assert set(seen) == {"new-1"}
        # once it is no longer settled (its run ended with new content), it is looked into
        settled.discard("old-1")
        before = len(looked)
        # two polls later it has been looked into once: its content is the baseline
        wait_for(lambda: len(looked) >= before + 2, what="two polls")
        got.clear()
        put(drop.path / "old-1" / "more.dat", b"changed again")
        assert got.wait(10)
        assert "old-1" in seen
    finally:
        observer.stop()
        observer.join(5)


def test_restart_settles_unchanged_finished_datasets_with_one_stat(tmp_path: Path) -> None:
    from agent.watch.drop import DropFolder

    drop = make_drop(tmp_path, readiness=Readiness(settle_seconds=0, stale_after=0))
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    for name in ("same", "grown"):
        put(drop.path / name / "scan.dat", name.encode())
        folder.check(name)
    assert len(ready) == 2
    for dataset_id in ready:
        journal.set_stage(dataset_id, "failed", error="ended")  # any finished run
    put(drop.path / "grown" / "extra.dat", b"added while the agent was down")
    # a restart: a new DropFolder on the same journal
    again = DropFolder(drop, journal, on_ready=ready.append, clock=clock)
    again.catch_up(["grown", "same"])
    assert again.is_settled("same")  # finished, top-level entry unchanged: not looked into
    assert not again.is_settled("grown")
    assert [d.name for d in journal.datasets()] == ["same", "grown", "grown"]  # a new run
