"""The agent against the local server's production behaviours (docs/localvip.md), one at a
time: a slow ``/results``, engine refusals on launch, GASW's replica statuses, platform-path
inputs, a cancel that reads ``Unknown``, late landings and slow deletes.

Each test drives the real runner over HTTP to ``agent.localvip`` with the one fault it is
about (the Done-when run with every fault together is tests/test_production_watch.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agenthelpers import drive, start_runner, wait_for, write_dataset

from agent.backend.vip import VipEngine
from agent.localvip import LocalVip
from agent.pacer import ServerBudget
from agent.web.source import waiting_for

FILESTATS = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.txt"}}


def posts(server: LocalVip) -> int:
    """Launch requests the server received (refused ones included)."""
    counts: dict[str, int] = server.stats_snapshot()["counts"]
    return int(counts.get("POST /executions", 0))


def executions_created(server: LocalVip) -> list[str]:
    return [row[0] for row in server.state.query("SELECT name FROM executions")]


class FakeClock:
    """A monotonic clock the test moves (the launch backoff of a ServerBudget)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- 1. a slow /results ----------------------------------------------------------------------
def test_slow_results_found_from_returned_files_and_listing(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    """``/results`` slower than its timeout: the outputs come from ``returnedFiles`` and a
    listing of the results folder, and the dataset ends done; it never gives up."""
    vip_server.faults = "results_delay=4"  # 4 s per output; the client waits 1.5 s
    ds = write_dataset(tmp_path / "drop" / "slow", {"scan.txt": "a\nb\n"}, FILESTATS)
    s = start_runner(
        tmp_path, ds, vip_server, poll_min=0.1, poll_max=0.3, retry_base=0.1,
        give_up_after=6.0,
        client_options={"timeout": 1.5, "results_timeout": 1.5, "retries": 0},
    )
    outcome = drive(s.runner, s.dataset_id, timeout=40)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "done", row.error
    assert list(Path(row.output_dir or "").rglob("report.json"))
    (out,) = s.journal.outputs(s.dataset_id)
    assert out.downloaded and out.size and out.remote.endswith("scan_stats.tgz")
    assert not s.client.exists(row.remote_root or "/nowhere")


# -- 2. engine refusals on launch ---------------------------------------------------------------
def _until_launch_wait(outcome: Any) -> bool:
    return bool(outcome.stage == "launch" and (outcome.retry_after or 0) > 20)


@pytest.mark.parametrize("code", [2003, 8000])
def test_engine_try_later_is_retried_with_backoff(
    tmp_path: Path, vip_server: LocalVip, code: int
) -> None:
    """2003 ENGINE_SATURATED and 4.6's 8000 "no ressources"/"Workflow is null": the dataset
    waits (queued, saying it waits for VIP's engine), no POST while the backoff runs, then
    launches once and ends done."""
    vip_server.faults = f"launch_refusal_code={code},times=1"
    ds = write_dataset(tmp_path / "drop" / "busy", {"scan.txt": "x\n"}, FILESTATS)
    clock = FakeClock()
    budget = ServerBudget(vip_server.url, max_rate=0, clock=clock)
    s = start_runner(tmp_path, ds, vip_server, poll_min=0.1, poll_max=0.3,
                     budget_for=lambda _server: budget)  # fmt: skip
    drive(s.runner, s.dataset_id, until=_until_launch_wait, timeout=30)
    row = s.journal.get(s.dataset_id)
    assert row.state == "queued" and row.error
    assert "waiting for VIP's engine" in row.error
    # the status page's queued row says why, in the same words
    assert waiting_for(row, {"state": row.state}, {}, 0, True) == row.error
    assert posts(vip_server) == 1
    # the engine policy's backoff: the next steps do not ask again
    for _ in range(3):
        assert s.runner.step(s.dataset_id).stage == "launch"
    assert posts(vip_server) == 1
    clock.now += 3600  # the backoff is over
    outcome = drive(s.runner, s.dataset_id, timeout=40)
    assert outcome.stage == "done", s.journal.get(s.dataset_id).error
    assert posts(vip_server) == 2 and len(executions_created(vip_server)) == 1


def test_launch_error_fails_with_vip_words_and_cleans(tmp_path: Path, vip_server: LocalVip) -> None:
    """2004 LAUNCH_ERROR is permanent: failed with VIP's message, the inputs deleted."""
    vip_server.faults = "launch_refusal_code=2004"
    ds = write_dataset(tmp_path / "drop" / "broken", {"scan.txt": "x\n"}, FILESTATS)
    s = start_runner(tmp_path, ds, vip_server, poll_min=0.1, poll_max=0.3)
    outcome = drive(s.runner, s.dataset_id, timeout=30)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "failed"
    assert row.error and "Error launching execution, contact admins!" in row.error
    assert "inputs were deleted" in row.error
    assert posts(vip_server) == 1 and executions_created(vip_server) == []
    root = row.remote_root or ""
    wait_for(lambda: not s.client.exists(root), timeout=10, what="inputs deleted")


# -- 6. GASW's job statuses ------------------------------------------------------------------------
def test_replica_statuses_are_no_job_problem(tmp_path: Path, vip_server: LocalVip) -> None:
    """A completed job reading CANCELLED_REPLICA (another replica did the work) gives no
    "did not complete" warning; ERROR still does."""
    vip_server.faults = "job_statuses=1"
    ds = write_dataset(tmp_path / "drop" / "replica", {"scan.txt": "x\n"}, FILESTATS)
    s = start_runner(tmp_path, ds, vip_server, poll_min=0.1, poll_max=0.3)
    assert drive(s.runner, s.dataset_id, timeout=30).stage == "done"
    (e,) = s.journal.executions(s.dataset_id)
    assert {j["status"] for j in (e.jobs or {}).values()} == {"CANCELLED_REPLICA"}
    events = [ev.message for ev in s.journal.events(s.dataset_id)]
    assert not [m for m in events if "did not complete" in m]


def test_gasw_statuses_of_done_and_failed_jobs() -> None:
    """VIP's job words: replicas and resubmissions of a job that did its work are no problem."""
    engine = VipEngine.__new__(VipEngine)  # job_problems reads no server
    done = {str(i): {"status": s} for i, s in enumerate(
        ["COMPLETED", "CANCELLED_REPLICA", "DELETED_REPLICA", "KILL_REPLICA", "REPLICATE",
         "RESCHEDULE"])}  # fmt: skip
    assert engine.job_problems(done) == []
    bad = {"1": {"status": "ERROR"}, "2": {"status": "STALLED_HELD"}, "3": {"status": "CANCELLED"}}
    assert engine.job_problems(bad) == ["1", "2", "3"]


# -- 5. cancel, late landings, slow deletes -------------------------------------------------------
def test_cancel_ends_when_the_list_says_killed(tmp_path: Path, vip_server: LocalVip) -> None:
    """``GET /executions/{id}`` reads Unknown after the kill (unknown_after_kill) while the
    list says Killed: the cancel ends, and the server is cleaned."""
    vip_server.faults = "unknown_after_kill=1"
    job = {"pipeline": "Sleep/1.0", "inputs": {"duration": 60}}
    ds = write_dataset(tmp_path / "drop" / "long", {"notes.txt": "x\n"}, job)
    s = start_runner(tmp_path, ds, vip_server, poll_min=0.1, poll_max=0.3)
    drive(s.runner, s.dataset_id, until=lambda o: o.stage == "monitor", timeout=30)
    (e,) = s.journal.executions(s.dataset_id)
    assert e.vip_id
    s.journal.update(s.dataset_id, cancel_requested=1)  # what `vip-agent cancel` records
    outcome = drive(s.runner, s.dataset_id, timeout=20)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "cancelled", row.error
    (e,) = s.journal.executions(s.dataset_id)
    assert e.status == "Killed"  # from the list: GET /executions/{id} read Unknown
    assert not s.client.exists(row.remote_root or "/nowhere")


def test_a_late_landing_after_the_delete_is_swept(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload answered with a timeout lands after the session was deleted (late_landing,
    recreating its folder): the sweep finds it and deletes it before the dataset ends."""
    from agent.runner import cleanup

    monkeypatch.setattr(cleanup, "LANDING_SWEEP", 8.0)
    # the one upload's answer is a timeout after 0.1 s; its file lands 6 s later, after the
    # dataset (re-sent at once, a one-second pipeline) was cleaned up
    vip_server.faults = "late_landing=1,times=1,transfer_wait=0.1,late_landing_delay=6"
    ds = write_dataset(tmp_path / "drop" / "late", {"scan.txt": "x\n"}, FILESTATS)
    s = start_runner(tmp_path, ds, vip_server, poll_min=0.1, poll_max=0.3,
                     client_options={"transfer_grace": 0.3, "backoff": 0.1})  # fmt: skip
    outcome = drive(s.runner, s.dataset_id, timeout=40)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "done", row.error
    counts = vip_server.stats_snapshot()["counts"]
    assert counts.get("late landing") == 1
    events = [ev.message for ev in s.journal.events(s.dataset_id)]
    assert [m for m in events if "reappeared on VIP after the delete" in m]
    assert not s.client.exists(row.remote_root or "/nowhere")


def test_a_slow_delete_never_fails_a_mirrored_dataset(tmp_path: Path) -> None:
    """VIP takes longer than the delete deadline: the dataset stays cleaning (saying so), the
    delete is asked again, and it ends done once the server is clean (memory backend: the
    hour passes on its clock)."""
    from agent.backend.memory import Faults, MemoryBackend
    from agent.runner.common import DELETE_DEADLINE

    backend = MemoryBackend(faults=Faults(delete_delay=DELETE_DEADLINE * 3))
    ds = write_dataset(tmp_path / "drop" / "slowdel", {"scan.txt": "x\n"}, FILESTATS)
    s = start_runner(tmp_path, ds, backend, poll_min=2.0, poll_max=60.0)
    drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20,
          until=lambda o: o.stage == "cleanup")  # fmt: skip
    start = backend.clock.time()
    drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20,
          until=lambda _o: backend.clock.time() - start > DELETE_DEADLINE + 1)  # fmt: skip
    row = s.journal.get(s.dataset_id)
    assert row.stage == "cleanup" and row.error and "waiting for VIP to delete" in row.error
    outcome = drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "done", row.error
    assert not any(p.startswith(row.remote_root or "/nowhere") for p in backend.paths())
    events = [ev.message for ev in s.journal.events(s.dataset_id)]
    assert len([m for m in events if "has not deleted" in m]) == 1


# -- 4. platform-path inputs and a group vip_root ---------------------------------------------
@pytest.fixture
def group_server(tmp_path: Path) -> Any:
    """Two accounts; group 'lab' of the first, group 'other' of the second only."""
    with LocalVip(tmp_path / "groups-root", api_keys=["key-one", "key-two"],
                  groups={"lab": ["user"], "other": ["user2"]}) as server:  # fmt: skip
        server.group_dir("lab").joinpath("shared").mkdir(parents=True)
        server.group_dir("lab").joinpath("shared", "scan.txt").write_text("in the group\n")
        yield server


def test_missing_platform_path_fails_at_validation_with_nothing_sent(
    tmp_path: Path, group_server: LocalVip
) -> None:
    missing = "/vip/Home/nowhere/scan.txt"
    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": missing}}
    ds = write_dataset(tmp_path / "drop" / "missing", {"notes.txt": "x\n"}, job)
    s = start_runner(tmp_path, ds, group_server, poll_min=0.1, poll_max=0.3)
    outcome = drive(s.runner, s.dataset_id, timeout=20)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "failed"
    assert row.error and f"input 'input_file': {missing} does not exist on VIP" in row.error
    counts = group_server.stats_snapshot()["counts"]
    assert not counts.get("upload") and not counts.get("mkdir") and posts(group_server) == 0
    assert not list(group_server.home().rglob("*"))  # no session folder


def test_group_input_runs_and_a_foreign_group_is_refused(
    tmp_path: Path, group_server: LocalVip
) -> None:
    """An input in the key's group folder runs; a vip_root in a group of others fails at
    validation, naming it."""
    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "/vip/lab (group)/shared/scan.txt"}}
    ds = write_dataset(tmp_path / "drop" / "grouped", {"notes.txt": "x\n"}, job)
    s = start_runner(tmp_path, ds, group_server, poll_min=0.1, poll_max=0.3)
    outcome = drive(s.runner, s.dataset_id, timeout=30)
    assert outcome.stage == "done", s.journal.get(s.dataset_id).error
    foreign = {**job, "vip_root": "/vip/other (group)/runs"}
    ds2 = write_dataset(tmp_path / "drop2" / "foreign", {"notes.txt": "y\n"}, foreign)
    s2 = start_runner(tmp_path / "second", ds2, group_server, poll_min=0.1, poll_max=0.3)
    assert drive(s2.runner, s2.dataset_id, timeout=20).stage == "failed"
    error = s2.journal.get(s2.dataset_id).error or ""
    assert "vip_root '/vip/other (group)/runs': the group folder /vip/other (group)" in error
    assert posts(group_server) == 1


def test_dry_run_names_a_missing_platform_path(tmp_path: Path, group_server: LocalVip) -> None:
    from agenthelpers import run_agent

    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "/vip/lab (group)/shared/gone.txt"}}
    ds = write_dataset(tmp_path / "drop" / "dry", {"notes.txt": "x\n"}, job)
    done = run_agent("run", str(ds), "--server", group_server.url, "--dry-run",
                     "--state", str(tmp_path / "state"), api_key=group_server.api_key,
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "input 'input_file': /vip/lab (group)/shared/gone.txt does not exist on VIP" in done.stdout
    assert group_server.stats_snapshot()["counts"].get("upload") is None


# -- the same decisions on the memory backend (no HTTP: the state machine alone) ---------------
def _memory_start(tmp_path: Path, runs: int = 1) -> Any:
    from agent.backend.memory import MemoryBackend

    backend = MemoryBackend(default_duration=30.0)
    job = {**FILESTATS, "runs": runs}
    ds = write_dataset(tmp_path / "drop" / "mem", {"scan.txt": "x\n"}, job)
    return start_runner(tmp_path, ds, backend, poll_min=2.0, poll_max=60.0)


def test_memory_engine_refusal_on_a_later_run_backs_off_then_runs(tmp_path: Path) -> None:
    """Three runs; the engine refuses the second launch (2003) from the monitor stage: the
    launches wait the engine policy's backoff (a minute of the backend's clock), no POST in
    between, and all three runs end."""
    from agent.pacer import policy

    s = _memory_start(tmp_path, runs=3)
    backend = s.backend
    drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20,
          until=lambda o: o.stage == "monitor")  # fmt: skip
    backend.faults.refuse_launches, backend.faults.refuse_code = 1, 2003
    refused_at = None
    for _ in range(200):
        s.runner.step(s.dataset_id)
        if backend.faults.refuse_launches == 0 and refused_at is None:
            refused_at, launches = backend.clock.time(), backend.calls["launch"]
        if refused_at is not None and backend.calls["launch"] > launches:
            break
        backend.clock.advance(1.0)
    assert refused_at is not None
    assert backend.clock.time() - refused_at >= policy("engine").base * (1 - policy("engine").jitter)
    outcome = drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20)
    assert outcome.stage == "done", s.journal.get(s.dataset_id).error
    assert len(backend.launches) == 3


def test_memory_launch_error_fails_and_cleans(tmp_path: Path) -> None:
    s = _memory_start(tmp_path)
    s.backend.faults.refuse_launches, s.backend.faults.refuse_code = 1, 2004
    outcome = drive(s.runner, s.dataset_id, sleep=s.backend.clock.advance, timeout=20)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "failed" and "inputs were deleted" in (row.error or "")
    assert not any(p.startswith(row.remote_root or "/nowhere") for p in s.backend.paths())
    assert s.backend.launches == []


def test_a_freed_slot_ends_a_capacity_backoff_not_an_engine_one() -> None:
    clock = FakeClock()
    budget = ServerBudget("https://vip.example", max_rate=0, clock=clock)
    budget.launch_refused(2003)
    budget.slot_freed()  # our execution ended: the engine may still be saturated
    assert budget.launch_wait() > 0
    clock.now += 3600
    budget.launch_refused(2001)
    budget.slot_freed()  # a slot of the account is free: launch now
    assert budget.launch_wait() == 0


def test_memory_launch_error_on_a_later_run(tmp_path: Path) -> None:
    """Three runs, the second refused for good (2004) while the first runs: no run is launched
    again, the first is followed to its end and mirrored, the server is cleaned, and the
    dataset fails saying which runs VIP refused."""
    s = _memory_start(tmp_path, runs=3)
    backend = s.backend
    drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20,
          until=lambda o: o.stage == "monitor")  # fmt: skip
    backend.faults.refuse_launches, backend.faults.refuse_code = 1, 2004
    outcome = drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20)
    row = s.journal.get(s.dataset_id)
    assert outcome.stage == "failed", row.error
    assert "was not launched: VIP refused it" in (row.error or "")
    assert len(backend.launches) == 1 and backend.calls["launch"] == 2
    assert list(Path(row.output_dir or "").rglob("result.txt"))  # the first run's output
    assert not any(p.startswith(row.remote_root or "/nowhere") for p in backend.paths())
