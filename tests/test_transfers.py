"""Upload at the latency limit: one request per file, listings verify, group commits, and
files that change while they are sent. Real local server, real journal, real files."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import drive, run_agent, start_runner, write_dataset

from agent import dataset as dataset_mod
from agent.journal import Journal
from agent.localvip import LocalVip
from agent.runner import UPLOAD_GROUP_FILES, Runner, admit
from agent.vip.client import VipClient


def _runner(tmp_path: Path, server: LocalVip, ds: Path, **kw: Any) -> tuple[Journal, int, Runner]:
    s = start_runner(tmp_path, ds, server, output_root=tmp_path / "out", poll_min=0.05, **kw)
    return s.journal, s.dataset_id, s.runner


def _step_past_upload(runner: Runner, dataset_id: int) -> str:
    runner.step(dataset_id)  # validate
    return str(drive(runner, dataset_id, until=lambda o: o.stage != "upload", max_wait=0).stage)


def test_small_files_cost_one_request_each(tmp_path: Path, vip_server: LocalVip) -> None:
    files = {f"parts/p{i:03d}.txt": f"part {i}\n" for i in range(40)}
    files.update({f"more/m{i}.txt": f"more {i}\n" for i in range(5)})
    ds = write_dataset(tmp_path / "drop" / "many", files,
                       {"pipeline": "ConcatFiles/1.0", "inputs": {"files": ["parts/*.txt", "more/*.txt"]}})
    journal, dataset_id, runner = _runner(tmp_path, vip_server, ds)
    assert runner.step(dataset_id).stage == "upload"
    vip_server.stats.reset()
    stage = runner.step(dataset_id).stage
    assert stage == "launch", journal.get(dataset_id).error
    counts = vip_server.stats.counts
    # one PUT per file, no properties() after each, one listing per folder to verify sizes
    assert counts["upload"] == 45
    assert counts["properties"] == 0
    assert counts["list"] == 2
    assert all(f.uploaded for f in journal.files(dataset_id))
    # several files were in flight at once
    assert vip_server.stats.peak_in_flight > 1


def test_listing_catches_a_file_the_server_lost(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(tmp_path / "drop" / "lost", {"a.txt": "aaa\n", "b.txt": "bbbb\n"},
                       {"pipeline": "ConcatFiles/1.0", "inputs": {"files": ["a.txt", "b.txt"]}})
    lost: list[Path] = []

    def lose_first(_id: int, _kind: str, done: int, _total: int) -> None:
        # while b.txt is sent, a.txt (already answered 201) vanishes from the server's storage
        if not lost and done > 4:
            (found,) = vip_server.home().rglob("a.txt")
            found.unlink()
            lost.append(found)

    journal, dataset_id, runner = _runner(tmp_path, vip_server, ds, transfer_threads=1,
                                          progress=lose_first)
    assert _step_past_upload(runner, dataset_id) == "launch", journal.get(dataset_id).error
    assert lost and lost[0].read_text() == "aaa\n"  # sent again after the listing
    assert any("not on VIP at the right size" in e.message for e in journal.events(dataset_id))
    assert vip_server.stats.counts["upload"] == 3


@pytest.mark.parametrize("change", ["grows", "touched"])
def test_file_changed_during_upload_is_never_verified(
    tmp_path: Path, vip_server: LocalVip, change: str
) -> None:
    big = os.urandom(3 << 20)  # several chunks: the change lands mid-transfer
    ds = write_dataset(tmp_path / "drop" / "growing", {"scan.bin": big},
                       {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.bin"}})
    target = ds / "scan.bin"
    changed: list[int] = []

    def write_more(_id: int, _kind: str, _done: int, _total: int) -> None:
        if not changed:
            changed.append(1)
            if change == "grows":  # the instrument appends while the agent sends
                with open(target, "ab") as fh:
                    fh.write(b"more data")
            else:  # same size, rewritten in place
                st = target.stat()
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    journal, dataset_id, runner = _runner(tmp_path, vip_server, ds, progress=write_more)
    stage = _step_past_upload(runner, dataset_id)
    row = journal.get(dataset_id)
    assert stage == "failed"
    assert "while it was being uploaded" in (row.error or "")
    messages = [e.message for e in journal.events(dataset_id)]
    assert not any("verified" in m for m in messages)
    assert not journal.files(dataset_id)[0].uploaded
    # nothing launched, and the partial session is gone from the server
    assert [r[0] for r in vip_server.state.query("SELECT name FROM executions")] == []
    client = VipClient(vip_server.url, vip_server.api_key)
    assert row.remote_root and not client.exists(row.remote_root)


def test_crash_resends_at_most_the_uncommitted_group(tmp_path: Path, vip_server: LocalVip) -> None:
    n = UPLOAD_GROUP_FILES * 2 + 10
    files = {f"parts/p{i:04d}.txt": f"part {i}\n" for i in range(n)}
    ds = write_dataset(tmp_path / "drop" / "crash-many", files,
                       {"pipeline": "ConcatFiles/1.0", "inputs": {"files": "parts/*.txt"}})
    args = ("run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
            "--output", str(tmp_path / "out"), "--poll", "0.1")
    first = run_agent(*args, api_key=vip_server.api_key, cwd=tmp_path,
                      VIP_AGENT_FAILPOINTS="upload:group")
    assert first.returncode == -signal.SIGKILL, first.stderr
    committed = sum(f.uploaded for f in Journal.in_state_dir(tmp_path / "state").files(1))
    assert committed >= UPLOAD_GROUP_FILES
    sent_before = vip_server.stats.counts["upload"]
    vip_server.stats.reset()
    second = run_agent(*args, api_key=vip_server.api_key, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    resent = vip_server.stats.counts["upload"]
    # the committed group is never sent again; what landed uncommitted is found by a listing
    assert resent <= n - committed
    assert sent_before + resent <= n + 8  # at most the PUTs cut by the kill are repeated
    out = Path(second.stdout.strip().splitlines()[-1])
    (joined,) = out.rglob("concatenated.txt")
    assert joined.read_text() == "".join(files[k] for k in sorted(files))


SLEEP_JOB = {"pipeline": "Sleep/1.0", "inputs": {"duration": 30}}


def _running(tmp_path: Path, vip_server: LocalVip) -> tuple[Journal, int, Runner]:
    """A dataset whose Sleep execution runs (stepped up to ``monitor``)."""
    first = write_dataset(tmp_path / "drop" / "first", {"x.txt": "x\n"}, SLEEP_JOB)
    journal, first_id, runner = _runner(tmp_path, vip_server, first)
    drive(runner, first_id, until=lambda o: o.stage == "monitor", max_wait=0)
    return journal, first_id, runner


def _waiting(tmp_path: Path, vip_server: LocalVip, journal: Journal, runner: Runner) -> int:
    """A second dataset, validated and uploaded, waiting for the running slot."""
    second = write_dataset(tmp_path / "drop" / "second", {"y.txt": "y\n"}, SLEEP_JOB)
    second_id = admit(journal, second, server=vip_server.url, output_root=tmp_path / "out",
                      fingerprint=dataset_mod.scan(second).fingerprint, name="second")
    drive(runner, second_id, until=lambda o: o.stage == "launch", max_wait=0)
    return second_id


def test_running_execution_is_polled_fast_while_launches_wait(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    from agent.runner import BUSY_POLL

    journal, first_id, runner = _running(tmp_path, vip_server)
    runner.poll_min, runner.poll_max = 5.0, 60.0
    assert runner.step(first_id).retry_after == 5.0  # short at first
    # it has run for 10 minutes: polls have grown to the maximum
    (e,) = journal.executions(first_id)
    journal.update_execution(first_id, e.key, launched=e.launched - 600)
    assert runner.step(first_id).retry_after == 60.0
    # another dataset now waits for the running slot: the running one is checked often
    second_id = _waiting(tmp_path, vip_server, journal, runner)
    assert BUSY_POLL / 2 <= runner.step(first_id).retry_after <= 1.5 * BUSY_POLL
    journal.set_stage(second_id, "cancelled")  # nothing waits any more
    assert runner.step(first_id).retry_after == 60.0


def test_busy_polls_start_shortly_before_the_shortest_run_seen(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    # a 6-hour pipeline behind a full cap: asked every 0.5 s for 6 hours is not needed once
    # the journal knows how long its runs take on this server
    from agent.runner import BUSY_POLL

    journal, first_id, runner = _running(tmp_path, vip_server)
    _waiting(tmp_path, vip_server, journal, runner)

    def fresh() -> Runner:  # a runner caches run times for a while: ask a new one
        return Runner(journal, runner.client_for, poll_min=5.0, poll_max=60.0)

    (e,) = journal.executions(first_id)
    journal.update_execution(first_id, e.key, launched=time.time() - 600)
    assert fresh().step(first_id).retry_after <= 1.5 * BUSY_POLL  # no history: asked often
    # three earlier runs of the pipeline on this server (one elsewhere, one of another
    # pipeline, one that failed fast: none of those count)
    now = time.time()
    for i, (pipeline, server, status, hours) in enumerate([
        ("Sleep/1.0", vip_server.url, "Finished", 1.0), ("Sleep/1.0", vip_server.url, "Finished", 2.0),
        ("Sleep/1.0", vip_server.url, "Finished", 1.5), ("Sleep/1.0", "http://other", "Finished", 0.1),
        ("FileStats/1.0", vip_server.url, "Finished", 0.1), ("Sleep/1.0", vip_server.url, "ExecutionFailed", 0.1),
    ]):  # fmt: skip
        past = write_dataset(tmp_path / "drop" / f"past{i}", {"z.txt": f"{i}\n"}, SLEEP_JOB)
        pid = admit(journal, past, server=server, output_root=tmp_path / "out",
                    fingerprint=dataset_mod.scan(past).fingerprint, name=f"past{i}")
        journal.update(pid, job={"pipeline": pipeline}, stage="done")
        journal.add_execution(pid, key="r1", name=f"past{i}", variant="", run=1, inputs={})
        journal.update_execution(pid, "r1", status=status, launched=now - 9 * 3600,
                                 ended=now - 9 * 3600 + hours * 3600)
    # running for 10 minutes, its runs take at least an hour: the usual interval (60 s max)
    assert fresh().step(first_id).retry_after == 60.0
    # 10 s before the shortest run's end (less one busy interval): looks again then
    journal.update_execution(first_id, e.key, launched=time.time() - 3590)
    assert 9.0 <= fresh().step(first_id).retry_after <= 9.6
    # at the shortest run's length: asked often again
    journal.update_execution(first_id, e.key, launched=time.time() - 3600)
    assert fresh().step(first_id).retry_after <= 1.5 * BUSY_POLL


def test_busy_polls_keep_their_rate_but_each_dataset_has_its_own_phase() -> None:
    from agent.runner import _on_grid

    step = 0.5
    for key in (1, 2, 3, 17):
        now, polls = 1000.0, []
        for _ in range(200):
            wait = _on_grid(step, key, now)
            assert step / 2 <= wait < 1.5 * step  # never two polls in a row
            now += wait + 0.01  # the step itself takes a moment
            polls.append(now)
        rate = (len(polls) - 1) / (polls[-1] - polls[0])
        assert 1 / step * 0.97 <= rate <= 1 / step + 1e-9  # the ceiling holds on average
    # datasets polled at the same moment ask at different instants afterwards
    phases = {round((1000.0 + _on_grid(step, key, 1000.0)) % step, 3) for key in range(1, 21)}
    assert len(phases) >= 15


def test_run_poll_option_is_checked(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(tmp_path / "drop" / "p", {"x.txt": "x\n"},
                       {"pipeline": "FileStats/1.0", "inputs": {"input_file": "x.txt"}})
    bad = run_agent("run", str(ds), "--server", vip_server.url, "--poll", "30:2",
                    api_key=vip_server.api_key, cwd=tmp_path)
    assert bad.returncode == 2 and "MIN:MAX" in bad.stderr
    good = run_agent("run", str(ds), "--server", vip_server.url, "--poll", "0.1:0.5",
                     "--state", str(tmp_path / "state"), "--output", str(tmp_path / "out"),
                     api_key=vip_server.api_key, cwd=tmp_path)
    assert good.returncode == 0, good.stderr


def test_latency_fault_delays_requests_in_parallel(vip_server: LocalVip) -> None:
    import threading

    vip_server.faults = "latency=1.0"
    client = VipClient(vip_server.url, vip_server.api_key)
    start = threading.Barrier(4)

    def ask() -> None:
        start.wait()
        client.exists("/vip/Home")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the threaded server held all four at once: a WAN's latency, not a queue
    assert vip_server.stats.peak_in_flight == 4
