"""Detection and readiness: observers (native and polling), debounce, rules, identity.

Readiness logic runs against real folders and a real journal with an injected
clock (so quiet periods need no waiting); observers are real watchdog observers
on tmp folders.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from agent.config import DropConfig, Readiness, config_from_args
from agent.journal import Journal
from agent.watch.detect import Candidates, DeadlineQueue, DropEventHandler, start_observer
from agent.watch.drop import DropFolder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_drop(tmp_path: Path, **kw: object) -> DropConfig:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    base = config_from_args(drop, server="http://127.0.0.1:9", output=tmp_path / "drop" / "_results")
    readiness = kw.pop("readiness", Readiness(settle_seconds=5, stale_after=0))
    from dataclasses import replace

    return replace(base.drops[0], readiness=readiness, **kw)  # type: ignore[arg-type]


def folder_for(tmp_path: Path, drop: DropConfig) -> tuple[DropFolder, Journal, Clock, list[int]]:
    journal = Journal.in_state_dir(tmp_path / "state")
    clock = Clock()
    ready: list[int] = []
    return DropFolder(drop, journal, on_ready=ready.append, clock=clock), journal, clock, ready


def put(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- DeadlineQueue ---------------------------------------------------------------------------


def test_queue_debounces_and_caps() -> None:
    clock = Clock()
    q: DeadlineQueue[str] = DeadlineQueue(clock)
    for _ in range(10):
        q.touch("a", 1.0, max_delay=3.0)
        clock.now += 0.5
    # pushed back by every touch, but never later than 3 s after the first one
    assert q.pop_due(timeout=0) == ["a"]
    assert q.pending() == 0
    q.touch("b", 1.0)
    clock.now += 0.9
    assert q.pop_due(timeout=0) == []
    clock.now += 0.2
    assert q.pop_due(timeout=0) == ["b"]
    q.at("c", clock.now + 5)
    q.at("c", clock.now + 1)  # earlier wins
    q.at("c", clock.now + 9)  # later is ignored
    clock.now += 1
    assert q.pop_due(timeout=0) == ["c"]


def test_queue_blocks_without_cpu_and_wakes() -> None:
    q: DeadlineQueue[str] = DeadlineQueue()
    out: list[list[str]] = []
    t = threading.Thread(target=lambda: out.append(q.pop_due(timeout=30)))
    cpu = time.process_time()
    t.start()
    time.sleep(0.3)  # let it block: this measures idleness, it does not synchronise
    q.wake()
    t.join(timeout=5)
    assert out == [[]]
    assert time.process_time() - cpu < 0.2
    q.soon("x")
    assert q.pop_due(timeout=1) == ["x"]


# -- candidates ------------------------------------------------------------------------------


def test_candidates_folders(tmp_path: Path) -> None:
    drop = make_drop(tmp_path)
    c = Candidates(drop)
    root = drop.path
    assert c.key_for(root / "s1" / "a" / "b.dat", False) == "s1"
    assert c.key_for(root / "s1", True) == "s1"
    assert c.key_for(root / "job.yaml", False) is None
    assert c.key_for(root / ".hidden" / "x", False) is None
    assert c.key_for(root / "copy.part", True) is None
    assert c.key_for(root / "_results" / "s1" / "out.txt", False) is None  # our own output
    assert c.key_for(tmp_path / "elsewhere", True) is None
    for name in ("s1", "s2", ".git", "big.tmp"):
        (root / name).mkdir()
    put(root / "loose.txt")
    assert c.list() == ["s1", "s2"]


def test_candidates_files_with_marker(tmp_path: Path) -> None:
    drop = make_drop(
        tmp_path, datasets="files", pattern="*.nii.gz",
        readiness=Readiness(rule="marker", marker="READY", stale_after=0),
    )  # fmt: skip
    c = Candidates(drop)
    root = drop.path
    assert c.key_for(root / "scan1.nii.gz", False) == "scan1.nii.gz"
    assert c.key_for(root / "scan1.nii.gz.READY", False) == "scan1.nii.gz"
    assert c.key_for(root / "scan1.nii.gz.part", False) is None
    assert c.key_for(root / "notes.txt", False) is None
    assert c.key_for(root / "sub" / "scan2.nii.gz", False) is None
    put(root / "scan1.nii.gz")
    put(root / "scan1.nii.gz.READY")
    put(root / "scan1.nii.gz.ERROR.txt")
    assert c.list() == ["scan1.nii.gz"]


# -- observers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["native", "polling"])
def test_observer_reports_new_dataset(tmp_path: Path, kind: str) -> None:
    drop = make_drop(tmp_path, observer=kind, poll_interval=0.1)
    seen: list[str] = []
    got = threading.Event()

    def notify(name: str) -> None:
        seen.append(name)
        got.set()

    observer, used = start_observer(drop, DropEventHandler(Candidates(drop), notify), logging.getLogger("t"))
    try:
        assert used == kind
        put(drop.path / "subject-7" / "deep" / "scan.dat", b"1234")
        assert got.wait(10), "no event"
        assert set(seen) == {"subject-7"}
        # let the write's trailing events arrive, then: reading a file (as an upload
        # does) and writing our own outputs are not changes of any dataset
        while got.wait(0.5):
            got.clear()
        seen.clear()
        (drop.path / "subject-7" / "deep" / "scan.dat").read_bytes()
        put(drop.path / "_results" / "subject-7" / "out.txt")
        assert not got.wait(0.5), seen
    finally:
        observer.stop()
        observer.join(5)


class _NoWatchesLeft(Observer):  # type: ignore[misc,valid-type]
    """A native observer failing as inotify does when ``max_user_watches`` is exhausted.

    Simulated: exhausting the real kernel limit would disturb the whole machine.
    """

    def start(self) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


def test_native_failure_falls_back_to_polling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    drop = make_drop(tmp_path, poll_interval=0.1)
    got = threading.Event()
    handler = DropEventHandler(Candidates(drop), lambda name: got.set())
    with caplog.at_level(logging.WARNING):
        observer, used = start_observer(drop, handler, logging.getLogger("t"), native_factory=_NoWatchesLeft)
    try:
        assert used == "polling"
        text = caplog.text
        assert "fs.inotify.max_user_watches" in text and "not full" in text
        put(drop.path / "late" / "a.dat")
        assert got.wait(10)
    finally:
        observer.stop()
        observer.join(5)
    assert isinstance(observer, BaseObserver)


# -- readiness and identity -------------------------------------------------------------------


def test_settle_waits_for_quiet_then_takes_once(tmp_path: Path) -> None:
    drop = make_drop(tmp_path)
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "s1" / "a.dat", b"1")
    delay = folder.check("s1")
    (row,) = journal.find(name="s1")
    assert row.stage == "waiting" and row.state == "waiting" and delay == pytest.approx(5)
    assert row.progress == {"kind": "waiting", "reason": "still changing"}
    clock.now += 4
    put(drop.path / "s1" / "b.dat", b"22")  # a new piece: the quiet period starts again
    assert folder.check("s1") == pytest.approx(5)
    clock.now += 4.9
    assert folder.check("s1") is not None and not ready
    clock.now += 0.2
    assert folder.check("s1") is None
    (row,) = journal.find(name="s1")
    assert ready == [row.id] and row.stage == "validate" and row.fingerprint
    # later checks and a restarted watcher never take it again
    clock.now += 100
    assert folder.check("s1") is None
    again, _, _, ready2 = folder_for(tmp_path, drop)
    assert again.check("s1") is None and not ready2
    assert len(journal.find(name="s1")) == 1


def test_partial_file_holds_back(tmp_path: Path) -> None:
    drop = make_drop(tmp_path)
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "s1" / "a.dat")
    put(drop.path / "s1" / "b.dat.part")
    folder.check("s1")
    clock.now += 60
    folder.check("s1")
    assert not ready
    assert "partial files" in (journal.find(name="s1")[0].progress or {}).get("reason", "")
    os.rename(drop.path / "s1" / "b.dat.part", drop.path / "s1" / "b.dat")
    folder.check("s1")
    clock.now += 5
    folder.check("s1")
    assert len(ready) == 1


def test_marker_rule(tmp_path: Path) -> None:
    drop = make_drop(tmp_path, readiness=Readiness(rule="marker", marker="READY", stale_after=0))
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "s1" / "a.dat")
    assert folder.check("s1") is None
    clock.now += 3600
    folder.check("s1")
    assert not ready
    put(drop.path / "s1" / "READY", b"")
    folder.check("s1")
    (row,) = journal.find(name="s1")
    assert ready == [row.id] and row.options["marker"] == "READY"


def test_manifest_rule(tmp_path: Path) -> None:
    drop = make_drop(tmp_path, readiness=Readiness(rule="manifest", settle_seconds=2, stale_after=0))
    (drop.path / "job.yaml").write_text(
        yaml.safe_dump({"pipeline": "FileStats/1.0", "inputs": {"input_file": "a.raw"},
                        "expect": ["*.raw", "meta.json"]})
    )  # fmt: skip
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "s1" / "a.raw")
    folder.check("s1")
    clock.now += 100
    folder.check("s1")
    assert not ready
    assert "meta.json" in (journal.find(name="s1")[0].progress or {})["reason"]
    put(drop.path / "s1" / "meta.json", b"{}")
    folder.check("s1")
    clock.now += 2
    folder.check("s1")
    assert len(ready) == 1


def test_stale_dataset_is_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    drop = make_drop(tmp_path, readiness=Readiness(rule="marker", stale_after=30))
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "s1" / "a.dat")
    assert folder.check("s1") == pytest.approx(30)  # a check is scheduled for the deadline
    clock.now += 31
    with caplog.at_level(logging.WARNING):
        folder.check("s1")
        folder.check("s1")
    (row,) = journal.find(name="s1")
    assert row.stage == "waiting" and "not complete after 30 s" in (row.error or "")
    warnings = [e for e in journal.events(row.id) if e.level == "warning"]
    assert len(warnings) == 1 and caplog.text.count("not complete after") == 1


def test_new_content_is_a_new_run_and_changes_are_not_mixed(tmp_path: Path) -> None:
    drop = make_drop(tmp_path, readiness=Readiness(settle_seconds=1, stale_after=0))
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "s1" / "a.dat", b"v1")
    folder.check("s1")
    clock.now += 1
    folder.check("s1")
    (first,) = journal.find(name="s1")
    journal.set_stage(first.id, "upload")  # the runner has it
    put(drop.path / "s1" / "a.dat", b"v2 longer")
    folder.check("s1")
    folder.check("s1")
    warnings = [e for e in journal.events(first.id) if "changed after it was taken" in e.message]
    assert len(warnings) == 1 and len(journal.find(name="s1")) == 1
    for stage in ("launch", "monitor", "mirror", "cleanup", "done"):
        journal.set_stage(first.id, stage)  # that run ends: the new content is a new run
    folder.check("s1")
    clock.now += 1
    folder.check("s1")
    rows = journal.find(name="s1")
    assert len(rows) == 2 and rows[1].stage == "validate" and ready == [first.id, rows[1].id]
    assert rows[1].fingerprint != first.fingerprint


def test_vanished_waiting_dataset_is_closed(tmp_path: Path) -> None:
    drop = make_drop(tmp_path)
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "s1" / "a.dat")
    folder.check("s1")
    (drop.path / "s1" / "a.dat").unlink()
    (drop.path / "s1").rmdir()
    folder.check("s1")
    (row,) = journal.find(name="s1")
    assert row.stage == "cancelled" and "removed" in (row.error or "")


def test_one_file_datasets(tmp_path: Path) -> None:
    drop = make_drop(
        tmp_path, datasets="files", pattern="*.nii.gz",
        readiness=Readiness(rule="marker", marker="READY", stale_after=0),
    )  # fmt: skip
    folder, journal, clock, ready = folder_for(tmp_path, drop)
    put(drop.path / "scan01.nii.gz", b"voxels")
    folder.check("scan01.nii.gz")
    assert not ready
    put(drop.path / "scan01.nii.gz.READY", b"")
    folder.check("scan01.nii.gz")
    (row,) = journal.find(name="scan01")
    assert ready == [row.id] and row.path == str(drop.path / "scan01.nii.gz")
