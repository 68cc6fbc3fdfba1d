"""The state machine on the in-memory backend: no sockets, no threads, hours in milliseconds.

Everything here is about the runner's decisions (stages, waits, kills, cleanup, refusals,
outages); the same behaviours over HTTP to the local server are in test_runner.py,
test_remote_safety.py and the kill/chaos tests. The runner runs on the backend's clock, and
``drive(..., sleep=backend.clock.advance)`` moves it by exactly the wait the runner asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agenthelpers import Started, drive, start_runner, write_dataset

from agent.backend.memory import Faults, MemoryBackend
from agent.journal import Stage
from agent.leftovers import LEFT_FILE
from agent.runner import GaveUp, StepOutcome
from agent.runner.common import Advance

PIPELINE = "FileStats/1.0"


def _start(tmp_path: Path, duration: float = 5.0, backend: MemoryBackend | None = None,
           runs: int = 1, **runner: Any) -> Started:
    """A two-file dataset whose executions last ``duration`` seconds of the backend's clock."""
    job = {"pipeline": PIPELINE, "inputs": {"input_file": "*.txt"}, "runs": runs}
    ds = write_dataset(tmp_path / "drop" / "subject", {"x.txt": "x\n", "y.txt": "yy\n"}, job)
    backend = backend or MemoryBackend()
    backend.default_duration = duration
    options = {"poll_min": 2.0, "poll_max": 60.0, "retry_base": 5.0, **runner}
    return start_runner(tmp_path, ds, backend, **options)


def _run(s: Started, **kw: Any) -> StepOutcome:
    assert isinstance(s.backend, MemoryBackend)
    return drive(s.runner, s.dataset_id, sleep=s.backend.clock.advance, timeout=20, **kw)


def _events(s: Started) -> list[str]:
    return [e.message for e in s.journal.events(s.dataset_id)]


def _session_gone(s: Started) -> bool:
    root = s.journal.get(s.dataset_id).remote_root
    return bool(root) and not any(p.startswith(str(root)) for p in s.backend.paths())


def test_a_dataset_runs_to_done_and_the_server_is_clean(tmp_path: Path) -> None:
    s = _start(tmp_path, 600)
    started = s.backend.clock.time()
    assert _run(s).stage == "done", s.journal.get(s.dataset_id).error
    ds = s.journal.get(s.dataset_id)
    assert s.backend.clock.time() - started >= 600  # ten minutes of pipeline, no real time
    assert list(Path(ds.output_dir or "").rglob("result.txt"))
    assert _session_gone(s) and s.backend.running() == 0
    assert all(e.deleted for e in s.backend.executions.values())
    stages = [e.stage for e in s.journal.events(s.dataset_id) if e.stage]
    assert stages[-1] == "done" and "monitor" in stages and "cleanup" in stages


def test_runs_at_a_cap_of_one_launch_once_each(tmp_path: Path) -> None:
    backend = MemoryBackend(max_running=1)
    backend.faults.refuse_launches = 4
    s = _start(tmp_path, 30, backend, runs=3,
               capacity_wait=15.0)
    assert _run(s).stage == "done", s.journal.get(s.dataset_id).error
    assert len(backend.launches) == 3  # refusals cost waits, never an extra execution
    assert sorted(e.key for e in s.journal.executions(s.dataset_id)) == ["default-r1", "default-r2", "default-r3"]


def test_a_lost_launch_answer_never_launches_twice(tmp_path: Path) -> None:
    backend = MemoryBackend(faults=Faults(uncertain_launches=1))
    s = _start(tmp_path, 5, backend)
    assert _run(s).stage == "done", s.journal.get(s.dataset_id).error
    assert len(backend.launches) == 1


def test_unknown_for_hours_is_killed_and_cleaned_only_once_confirmed(tmp_path: Path) -> None:
    backend = MemoryBackend(faults=Faults(unknown_reads=10**6))
    s = _start(tmp_path, 12 * 3600, backend, poll_max=600.0)
    inputs = f"{s.journal.get(s.dataset_id).remote_root}/INPUTS"
    # while it reads Unknown nothing is deleted: the inputs stay under a job that may run
    outcome = _run(s, until=lambda o: bool(backend.calls["kill"]))
    assert outcome.stage == "monitor" and backend.calls["delete"] == 0
    assert any(p.startswith(str(s.journal.get(s.dataset_id).remote_root)) for p in backend.paths())
    assert _run(s).stage == "failed"
    assert "killed by vip-agent" in (s.journal.get(s.dataset_id).error or "")
    assert backend.calls["kill"] == 1 and inputs not in backend.paths() and _session_gone(s)
    warned = [m for m in _events(s) if "reads Unknown" in m]
    assert len(warned) == 1, warned


def test_a_short_unknown_is_said_once_and_the_run_goes_on(tmp_path: Path) -> None:
    backend = MemoryBackend(faults=Faults(unknown_reads=3))
    s = _start(tmp_path, 60, backend)
    assert _run(s).stage == "done"
    assert backend.calls["kill"] == 0
    assert len([m for m in _events(s) if "reads Unknown" in m]) == 1


def test_a_word_the_platform_does_not_define_counts_as_running(tmp_path: Path) -> None:
    backend = MemoryBackend()
    s = _start(tmp_path, 5, backend)
    _run(s, until=lambda o: o.stage == "monitor")
    (exec_id,) = backend.executions
    backend.set_status(exec_id, "Hibernating")
    for _ in range(5):
        assert s.runner.step(s.dataset_id).stage == "monitor"
        backend.clock.advance(100)
    backend.set_status(exec_id, None)
    assert _run(s).stage == "done"
    assert len([m for m in _events(s) if "Hibernating" in m and "not one VIP" in m]) == 1


def test_an_execution_gone_from_the_server_fails_the_dataset(tmp_path: Path) -> None:
    backend = MemoryBackend()
    s = _start(tmp_path, 500, backend)
    _run(s, until=lambda o: o.stage == "monitor")
    for e in backend.executions.values():
        e.deleted = True
    assert _run(s).stage == "failed"
    (e,) = s.journal.executions(s.dataset_id)
    assert e.status == "Lost" and any("vanished" in m for m in _events(s))


def test_an_outage_is_waited_out_with_backoff(tmp_path: Path) -> None:
    backend = MemoryBackend()
    s = _start(tmp_path, 5, backend)
    _run(s, until=lambda o: o.stage == "monitor")
    backend.faults.outage = 4
    waits = []
    outcome = s.runner.step(s.dataset_id)
    while outcome.stage == "monitor" and backend.faults.outage:
        waits.append(outcome.retry_after or 0.0)
        backend.clock.advance(outcome.retry_after or 0.0)
        outcome = s.runner.step(s.dataset_id)
    assert waits == sorted(waits) and waits[-1] > waits[0]  # it backs off
    assert _run(s).stage == "done"
    assert any("answers again" in m for m in _events(s))


def test_run_gives_up_on_a_server_down_for_too_long(tmp_path: Path) -> None:
    backend = MemoryBackend(faults=Faults(outage=10**6))
    s = _start(tmp_path, 5, backend,
               give_up_after=3600.0)
    with pytest.raises(GaveUp, match="Nothing is lost"):
        _run(s)
    assert s.journal.get(s.dataset_id).stage == "validate"  # resumable


def test_a_failed_transfer_is_retried(tmp_path: Path) -> None:
    backend = MemoryBackend(faults=Faults(transfer_failures=2))
    s = _start(tmp_path, 5, backend)
    assert _run(s).stage == "done"
    assert backend.calls["put"] == 4  # two files, two attempts failed
    assert backend.bytes_moved["upload"] == len("x\n") + len("yy\n")


def test_outputs_above_the_transfer_limit_end_incomplete(tmp_path: Path) -> None:
    backend = MemoryBackend(max_transfer=100, output_size=1000)
    s = _start(tmp_path, 5, backend)
    assert _run(s).stage == "incomplete"
    ds = s.journal.get(s.dataset_id)
    assert (Path(ds.output_dir or "") / LEFT_FILE).is_file()
    (left,) = [o for o in s.journal.outputs(s.dataset_id) if not o.downloaded]
    assert left.remote in backend.paths()  # kept on the server with its execution


def test_a_slow_delete_is_polled_until_gone(tmp_path: Path) -> None:
    backend = MemoryBackend(faults=Faults(delete_delay=30.0))
    s = _start(tmp_path, 5, backend)
    assert _run(s).stage == "done" and _session_gone(s)
    assert backend.calls["delete"] == 1 and backend.calls["exists"] > 2


def test_cancel_kills_then_cleans(tmp_path: Path) -> None:
    backend = MemoryBackend()
    s = _start(tmp_path, 3600, backend)
    _run(s, until=lambda o: o.stage == "monitor")
    s.journal.update(s.dataset_id, cancel_requested=1)
    assert _run(s).stage == "cancelled"
    assert backend.calls["kill"] == 1 and _session_gone(s) and backend.running() == 0


def test_a_dataset_moved_by_another_process_is_not_a_traceback(tmp_path: Path) -> None:
    """A step's stage change after another writer ended the dataset: logged, never raised."""
    s = _start(tmp_path, 5)
    _run(s, until=lambda o: o.stage == "monitor")
    stale = s.journal.get(s.dataset_id)
    s.journal.set_stage(s.dataset_id, Stage.CANCELLED, message="by another process")
    outcome = s.runner._apply(stale, Advance(Stage.MIRROR, "all executions ended"))
    assert outcome.stage == "cancelled" and outcome.final
    # a change the table forbids (a bug) fails the dataset with a message instead
    s2 = _start(tmp_path / "2", 5)
    ds = s2.journal.get(s2.dataset_id)
    outcome = s2.runner._apply(ds, Advance(Stage.CLEANUP, "skipping ahead"))
    assert outcome.stage == "failed"
    assert "not a legal stage change" in (s2.journal.get(s2.dataset_id).error or "")


def test_capacity_refusals_delay_the_launch_without_failing(tmp_path: Path) -> None:
    """Moved from test_runner_robustness.py (it needed no HTTP): three refusals, three waits
    at ``launch`` (public state "queued"), three warnings, then done."""
    backend = MemoryBackend(faults=Faults(refuse_launches=3))
    s = _start(tmp_path, 5, backend, capacity_wait=0.1, retry_base=0.1)
    stages: list[StepOutcome] = []
    outcome = _run(s, until=lambda o: bool(stages.append(o)))
    assert outcome.stage == "done", s.journal.get(s.dataset_id).error
    waits = [o for o in stages if o.stage == "launch" and o.retry_after]
    assert len(waits) == 3 and len(backend.launches) == 1
    warnings = [e.message for e in s.journal.events(s.dataset_id) if e.level == "warning"]
    assert len(warnings) == 3 and all("retry" in w for w in warnings), warnings


def test_a_full_cap_is_not_asked_again_at_every_poll(tmp_path: Path) -> None:
    """runs: 3 at the server's cap of 1: the refused launches back off on the server's budget
    (agent.pacer) and resume as soon as one of ours ends, instead of one POST per busy poll."""
    backend = MemoryBackend(max_running=1)
    s = _start(tmp_path, 15, backend, runs=3)
    assert _run(s).stage == "done", s.journal.get(s.dataset_id).error
    assert len(backend.launches) == 3
    refused = backend.calls["launch"] - 3
    # a handful (2-4 over 25 runs: the backoff's jitter decides whether one more try falls
    # before our execution ends), where every 0.5 s poll used to ask (about 60)
    assert refused <= 4, backend.calls
    assert backend.calls["status"] > 3 * refused  # polling itself went on as before
