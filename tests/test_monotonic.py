"""Every duration the agent acts on is measured on a monotonic clock (issue 17, item 19).

The runner gets two clocks: the wall clock (``clock``: what users see, what the journal
stores) and a monotonic one (``monotonic``: how long an execution has read ``Unknown``, the
give-up deadline, the delete deadline, kill repeats). Here the monotonic clock is the memory
backend's (executions last seconds of it) and the wall clock is that plus a jump the test
makes, as NTP or a user fixing the date would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import Started, drive, start_runner, wait_for, write_dataset

from agent import health
from agent.backend.memory import Faults, MemoryBackend
from agent.runner import GaveUp, StepOutcome

HOUR = 3600.0


class JumpingWall:
    """The wall clock: the backend's (monotonic) clock plus the jumps made so far."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.offset = 0.0

    def __call__(self) -> float:
        return self.backend.clock.time() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


def _start(tmp_path: Path, backend: MemoryBackend, duration: float, **runner: Any) -> tuple[Started, JumpingWall]:
    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "*.txt"}}
    ds = write_dataset(tmp_path / "drop" / "subject", {"x.txt": "x\n"}, job)
    backend.default_duration = duration
    wall = JumpingWall(backend)
    options = {"poll_min": 2.0, "poll_max": 60.0, "retry_base": 5.0, **runner}
    s = start_runner(tmp_path, ds, backend, clock=wall, monotonic=backend.clock.time, **options)
    return s, wall


def _run(s: Started, **kw: Any) -> StepOutcome:
    assert isinstance(s.backend, MemoryBackend)
    return drive(s.runner, s.dataset_id, sleep=s.backend.clock.advance, timeout=20, **kw)


def test_a_wall_clock_jump_during_an_unknown_blip_kills_nothing(tmp_path: Path) -> None:
    """The incident: +7 h on the wall clock during a 14 s Unknown blip (limit 6 h)."""
    backend = MemoryBackend()
    s, wall = _start(tmp_path, backend, duration=120.0)
    _run(s, until=lambda o: o.stage == "monitor")
    backend.faults.unknown_reads = 2
    assert s.runner.step(s.dataset_id).stage == "monitor"  # reads Unknown: since now
    wall.jump(7 * HOUR)
    backend.clock.advance(14.0)
    assert s.runner.step(s.dataset_id).stage == "monitor"  # still Unknown, 14 s later
    notice = s.journal.get(s.dataset_id).error or ""
    assert "reads Unknown" in notice and "treated as running" in notice, notice
    assert _run(s).stage == "done", s.journal.get(s.dataset_id).error
    assert backend.calls["kill"] == 0
    assert not any("killing it" in e.message for e in s.journal.events(s.dataset_id))


def test_the_unknown_limit_still_holds_on_the_monotonic_clock(tmp_path: Path) -> None:
    """A wall clock set back by 7 h does not keep a really stuck execution alive."""
    backend = MemoryBackend(faults=Faults(unknown_reads=10**6))
    s, wall = _start(tmp_path, backend, duration=12 * HOUR, poll_min=300.0, poll_max=600.0)
    _run(s, until=lambda o: o.stage == "monitor")
    assert s.runner.step(s.dataset_id).stage == "monitor"
    wall.jump(-7 * HOUR)
    _run(s, until=lambda o: bool(backend.calls["kill"]))
    assert backend.calls["kill"] == 1
    killed = backend.clock.time() - min(e.launched or 0 for e in s.journal.executions(s.dataset_id))
    assert 6 * HOUR <= killed < 6 * HOUR + 700  # the limit, to within one poll
    assert _run(s).stage == "failed"


def test_a_wall_clock_jump_during_an_outage_does_not_give_up(tmp_path: Path) -> None:
    """``vip-agent run`` gives up after 1 h of a failing server, measured monotonically."""
    backend = MemoryBackend()
    s, wall = _start(tmp_path, backend, duration=30.0, give_up_after=HOUR)
    _run(s, until=lambda o: o.stage == "monitor")
    backend.faults.outage = 2
    assert s.runner.step(s.dataset_id).retry_after  # failing: waits
    wall.jump(5 * HOUR)
    assert s.runner.step(s.dataset_id).retry_after  # still failing, 5 s later: no GaveUp
    assert _run(s).stage == "done", s.journal.get(s.dataset_id).error
    # and a real hour of outage still gives up, whatever the wall clock says
    s2, wall2 = _start(tmp_path / "second", MemoryBackend(faults=Faults(outage=10**6)),
                       duration=30.0, give_up_after=HOUR)
    wall2.jump(-10 * HOUR)
    with pytest.raises(GaveUp):
        _run(s2)


def test_a_wall_clock_jump_during_a_slow_delete_is_not_a_failure(tmp_path: Path) -> None:
    """The delete deadline (10 min) is a duration: a jump of a day is not a server that
    failed to delete."""
    backend = MemoryBackend(faults=Faults(delete_delay=30.0))
    s, wall = _start(tmp_path, backend, duration=5.0)
    _run(s, until=lambda o: o.stage == "cleanup")
    s.runner.step(s.dataset_id)  # the delete is sent and polled
    wall.jump(24 * HOUR)
    assert _run(s).stage == "done", s.journal.get(s.dataset_id).error
    said = [e.message for e in s.journal.events(s.dataset_id)]
    assert not any("has not deleted" in m for m in said), said  # never taken for a late delete


def test_server_checks_go_on_after_the_wall_clock_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's server check is repeated every ``interval`` seconds of monotonic time: a
    wall clock set back by a day does not freeze it (it is the in-process case of
    ``time.time`` used for a duration)."""
    probes: list[str] = []
    checker = health.ServerChecker(probes.append, interval=0.05)
    wait_for(lambda: checker.get("https://vip.example").checked, timeout=5, what="first check")
    real = time.time
    monkeypatch.setattr(health.time, "time", lambda: real() - 86400)
    # asked again and again, as the page does: a check is due once 0.05 s have passed
    wait_for(lambda: checker.get("https://vip.example") and len(probes) >= 2, timeout=5,
             what="a second server check after the wall clock went back a day")
    assert len(probes) >= 2
