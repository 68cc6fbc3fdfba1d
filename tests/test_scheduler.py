"""Scheduling logic: pools, the running-executions cap, timers, auth pause, cancel, stop.

These tests drive the real :class:`agent.scheduler.Scheduler` and a real
journal with a *fake runner* (``FakeRunner`` below), so that concurrency can be
measured exactly and each stage's duration controlled. The real runner against
the real local server is exercised in ``test_watch_service.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from agenthelpers import wait_for

from agent.config import Limits
from agent.journal import Journal
from agent.runner import Interrupted, StepOutcome
from agent.scheduler import Scheduler
from agent.vip.errors import AuthError

SERVER = "http://127.0.0.1:9"


class FakeRunner:
    """Walks a dataset through the stages, recording executions in the journal like the runner."""

    def __init__(self, journal: Journal, *, work: float = 0.05, polls: int = 2, cap: int = 1) -> None:
        self.journal = journal
        self.cap = cap
        self.work = work
        self.polls = polls
        self.lock = threading.Lock()
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.intervals: dict[str, list[tuple[int, float, float]]] = {"upload": [], "run": []}
        self.key_ok = True
        self.stop = threading.Event()
        self.block_uploads = False
        self._polled: Counter[int] = Counter()
        self._started: dict[int, float] = {}

    def _busy(self, what: str, dataset_id: int, seconds: float) -> None:
        with self.lock:
            self.now[what] += 1
            self.peak[what] = max(self.peak[what], self.now[what])
        start = time.monotonic()
        try:
            if self.block_uploads and what == "upload":
                if self.stop.wait(30):
                    raise Interrupted("stopping")
            time.sleep(seconds)  # simulated work of the stage, not synchronisation
        finally:
            with self.lock:
                self.now[what] -= 1
                if what == "upload":
                    self.intervals["upload"].append((dataset_id, start, time.monotonic()))

    def slot_free(self, server: str) -> bool:
        """The running cap, as :meth:`agent.runner.Runner.slot_free` applies it."""
        return self.journal.running_executions(server) < self.cap

    def step(self, dataset_id: int) -> StepOutcome:
        if not self.key_ok:
            raise AuthError("Bad credentials", code=8002)
        ds = self.journal.get(dataset_id)
        j = self.journal
        if ds.cancel_requested:
            j.set_stage(dataset_id, "cancelled")
            return StepOutcome("cancelled")
        if ds.stage == "validate":
            j.add_execution(dataset_id, key="default-r1", name=f"e{dataset_id}", variant="default",
                            run=1, inputs={})  # fmt: skip
            j.set_stage(dataset_id, "upload")
            return StepOutcome("upload")
        if ds.stage == "upload":
            self._busy("upload", dataset_id, self.work)
            j.set_stage(dataset_id, "launch")
            return StepOutcome("launch")
        if ds.stage == "launch":
            running = j.running_executions(SERVER)
            with self.lock:
                self.peak["running"] = max(self.peak["running"], running + 1)
            j.update_execution(dataset_id, "default-r1", vip_id=f"x{dataset_id}", status="Running")
            self._started[dataset_id] = time.monotonic()
            j.set_stage(dataset_id, "monitor")
            return StepOutcome("monitor", 0.02)
        if ds.stage == "monitor":
            self._polled[dataset_id] += 1
            if self._polled[dataset_id] < self.polls:
                return StepOutcome("monitor", 0.02)
            j.update_execution(dataset_id, "default-r1", status="Finished")
            self.intervals["run"].append((dataset_id, self._started[dataset_id], time.monotonic()))
            j.set_stage(dataset_id, "mirror")
            return StepOutcome("mirror")
        if ds.stage == "mirror":
            self._busy("download", dataset_id, self.work)
            j.set_stage(dataset_id, "cleanup")
            j.set_stage(dataset_id, "done")
            return StepOutcome("done")
        raise AssertionError(ds.stage)


def add(journal: Journal, n: int, drop: str = "/drop") -> list[int]:
    return [
        journal.add_dataset(name=f"d{i}", path=f"{drop}/d{i}", server=SERVER, output_root="/out",
                            fingerprint=f"f{i}", drop_dir=drop)  # fmt: skip
        for i in range(n)
    ]


def all_final(journal: Journal, ids: list[int]) -> bool:
    return all(journal.get(i).final for i in ids)


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal.in_state_dir(tmp_path / "state")


def test_limits_and_overlap(journal: Journal) -> None:
    ids = add(journal, 12)
    runner = FakeRunner(journal, cap=2)
    finals: list[tuple[int, str]] = []
    limits = Limits(max_uploads=2, max_downloads=1)
    s = Scheduler(journal, runner, limits_for=lambda g: limits, on_final=lambda i, st: finals.append((i, st)))
    s.start()
    try:
        wait_for(lambda: all_final(journal, ids), timeout=20)
    finally:
        s.stop()
    assert sorted(finals) == [(i, "done") for i in ids]
    assert runner.peak["upload"] == 2 and runner.peak["download"] == 1
    assert runner.peak["running"] <= 2
    # uploads of later datasets overlap executions of earlier ones
    runs = runner.intervals["run"]
    assert any(
        u_start < r_end and r_start < u_end
        for (ud, u_start, u_end) in runner.intervals["upload"]
        for (rd, r_start, r_end) in runs
        if ud != rd
    )


def test_running_cap_of_one_is_never_exceeded(journal: Journal) -> None:
    ids = add(journal, 6)
    runner = FakeRunner(journal, work=0.01, polls=3, cap=1)
    s = Scheduler(journal, runner)
    s.start()
    try:
        wait_for(lambda: all_final(journal, ids), timeout=20)
    finally:
        s.stop()
    assert runner.peak["running"] == 1
    runs = sorted(runner.intervals["run"], key=lambda r: r[1])
    assert all(a[2] <= b[1] for a, b in zip(runs, runs[1:], strict=False))  # in turn


def test_auth_error_pauses_once_and_resumes(journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    ids = add(journal, 4)
    runner = FakeRunner(journal)
    runner.key_ok = False
    probes = Counter[str]()

    def probe(server: str) -> None:
        probes[server] += 1
        if not runner.key_ok:
            raise AuthError("Bad credentials", code=8002)

    s = Scheduler(journal, runner, probe=probe, auth_retry=(0.05, 0.2))
    with caplog.at_level(logging.INFO, logger="vip_agent"):
        s.start()
        try:
            wait_for(lambda: all(journal.get(i).state == "paused" for i in ids), timeout=10)
            wait_for(lambda: probes[SERVER] >= 3, timeout=10)  # backoff keeps probing
            assert not any(journal.get(i).final for i in ids)
            assert caplog.text.count("pausing every dataset") == 1
            runner.key_ok = True
            s.probe_now()
            wait_for(lambda: all_final(journal, ids), timeout=10)
        finally:
            s.stop()
    assert all(journal.get(i).stage == "done" and not journal.get(i).paused for i in ids)
    assert "works again" in caplog.text


def test_journal_poll_picks_up_retry_and_cancel(journal: Journal) -> None:
    runner = FakeRunner(journal, polls=10_000)  # executions never end by themselves
    s = Scheduler(journal, runner, poll_journal=0.1)
    s.start()
    try:
        (i,) = add(journal, 1)  # recorded by another process (e.g. `vip-agent retry`)
        wait_for(lambda: journal.get(i).stage == "monitor", timeout=10)
        journal.update(i, cancel_requested=1)  # `vip-agent cancel`
        wait_for(lambda: journal.get(i).stage == "cancelled", timeout=10)
    finally:
        s.stop()
    assert s.idle()


def test_stop_abandons_long_transfer_quickly(journal: Journal) -> None:
    ids = add(journal, 2)
    runner = FakeRunner(journal)
    runner.block_uploads = True
    s = Scheduler(journal, runner, stop_event=runner.stop)
    s.start()
    wait_for(lambda: runner.now["upload"] == 2, timeout=10)
    t0 = time.monotonic()
    assert s.stop(grace=2.0)
    assert time.monotonic() - t0 < 2.0
    # journal consistent: both still at upload, resumable by the next start
    assert [journal.get(i).stage for i in ids] == ["upload", "upload"]


def test_a_launched_execution_at_stage_launch_does_not_block_itself(journal: Journal) -> None:
    """A crash after the launch but before the move to ``monitor``: with a cap of 1, the
    dataset's own running execution must not keep it at ``launch`` forever (found by chaos)."""
    (i,) = add(journal, 1)
    journal.add_execution(i, key="default-r1", name=f"e{i}", variant="default", run=1, inputs={})
    journal.update_execution(i, "default-r1", vip_id=f"x{i}", status="Running")
    journal.set_stage(i, "upload")
    journal.set_stage(i, "launch")
    runner = FakeRunner(journal, cap=1)
    runner._started[i] = time.monotonic()
    s = Scheduler(journal, runner)
    s.start()
    try:
        wait_for(lambda: journal.get(i).stage == "done", timeout=10)
    finally:
        s.stop()
