"""The dataset runner against the real local server: every stage, failures, crash resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import drive, run_agent, start_runner, tree, wait_for, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip
from agent.runner import Runner
from agent.vip.client import VipClient


def server_execution_names(server: LocalVip) -> list[str]:
    """Names of every execution the server ever created, deleted ones included."""
    return [row[0] for row in server.state.query("SELECT name FROM executions")]


def start_run(
    tmp_path: Path, server: LocalVip, dataset: Path, **options: Any
) -> tuple[Journal, int, Runner, VipClient]:
    s = start_runner(tmp_path, dataset, server, options=options, poll_min=0.1, poll_max=0.5)
    return s.journal, s.dataset_id, s.runner, s.client


def stats_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remote_session_gone(client: VipClient, journal: Journal, dataset_id: int) -> bool:
    root = journal.get(dataset_id).remote_root
    assert root
    return not client.exists(root)


def test_single_job_end_to_end(tmp_path: Path, vip_server: LocalVip) -> None:
    data = b"alpha\nbeta\ngamma\n"
    ds = write_dataset(
        tmp_path / "drop" / "subject-1",
        {"scan.txt": data},
        {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.txt"}},
    )
    journal, dataset_id, runner, client = start_run(tmp_path, vip_server, ds)
    outcome = runner.run(dataset_id)
    row = journal.get(dataset_id)
    assert outcome.stage == "done", row.error
    out = Path(row.output_dir or "")
    reports = list(out.rglob("report.json"))
    assert len(reports) == 1
    # the archive became a folder named after it, under the execution's timestamp folder
    assert reports[0].parent.name == "scan_stats.tgz" and reports[0].parent.is_dir()
    assert not list(out.rglob("*.tgz")) or all(p.is_dir() for p in out.rglob("*.tgz"))
    assert json.loads(reports[0].read_text())["sha256"] == stats_of(data)
    # the server is clean: session folder gone, execution deleted
    assert remote_session_gone(client, journal, dataset_id)
    assert client.executions() == []
    status = json.loads((out / "STATUS.json").read_text())
    assert status["state"] == "done" and status["executions"]
    session = json.loads((out / "session_data.json").read_text())
    assert set(session["workflows"]) == set(status["executions"])


def test_list_input_makes_parallel_jobs(tmp_path: Path, vip_server: LocalVip) -> None:
    files = {f"sig/s{i}.txt": f"signal {i}\n" * (i + 1) for i in range(3)}
    ds = write_dataset(
        tmp_path / "drop" / "subject-2",
        files,
        {"pipeline": "FileStats/1.0", "inputs": {"input_file": "sig/*.txt"}},
    )
    journal, dataset_id, runner, _ = start_run(tmp_path, vip_server, ds)
    assert runner.run(dataset_id).stage == "done", journal.get(dataset_id).error
    (execution,) = journal.executions(dataset_id)
    assert len(execution.jobs or {}) == 3
    reports = {
        json.loads(p.read_text())["file"]: json.loads(p.read_text())["sha256"]
        for p in Path(journal.get(dataset_id).output_dir or "").rglob("report.json")
    }
    assert reports == {Path(k).name: stats_of(v.encode()) for k, v in files.items()}


def test_runs_and_variants_share_one_upload(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(
        tmp_path / "drop" / "subject-3",
        {"notes.txt": "one\ntwo\n"},
        {
            "pipeline": "TextTransform/1.0",
            "inputs": {"input_file": "notes.txt", "mode": "upper", "repeat": 1},
            "runs": 2,
            "variants": {"up": {"inputs": {"mode": "upper"}}, "low": {"inputs": {"mode": "lower"}}},
        },
    )
    journal, dataset_id, runner, _ = start_run(tmp_path, vip_server, ds)
    assert runner.run(dataset_id).stage == "done", journal.get(dataset_id).error
    executions = journal.executions(dataset_id)
    assert sorted(e.key for e in executions) == ["low-r1", "low-r2", "up-r1", "up-r2"]
    assert Counter(server_execution_names(vip_server)) == Counter(e.name for e in executions)
    # one upload of the dataset serves all four executions
    uploads = [ev for ev in journal.events(dataset_id) if ev.message.startswith("uploading")]
    assert len(uploads) == 1
    assert len({e.inputs["input_file"] for e in executions}) == 1
    assert {e.inputs["mode"] for e in executions} == {"upper", "lower"}


def test_failing_pipeline_keeps_logs_and_cleans(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(
        tmp_path / "drop" / "bad-1",
        {"notes.txt": "FAIL\nthis input makes TextTransform fail\n"},
        {"pipeline": "TextTransform/1.0",
         "inputs": {"input_file": "notes.txt", "mode": "upper", "repeat": 1}},
    )
    journal, dataset_id, runner, client = start_run(tmp_path, vip_server, ds)
    assert runner.run(dataset_id).stage == "failed"
    row = journal.get(dataset_id)
    assert "ExecutionFailed" in (row.error or "")
    logs = "".join(p.read_text() for p in Path(row.output_dir or "").rglob("logs/**/*.txt"))
    assert "FAIL" in logs
    assert remote_session_gone(client, journal, dataset_id)


def test_killed_execution_is_reported(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(
        tmp_path / "drop" / "slow-1", {"x.txt": "x\n"},
        {"pipeline": "Sleep/1.0", "inputs": {"duration": 60}},
    )
    journal, dataset_id, runner, client = start_run(tmp_path, vip_server, ds)
    drive(runner, dataset_id, until=lambda o: o.stage == "monitor", max_wait=0)
    (execution,) = journal.executions(dataset_id)
    assert execution.vip_id
    client.kill(execution.vip_id)  # killed by someone on the VIP portal
    assert runner.run(dataset_id).stage == "failed"
    assert "Killed" in (journal.get(dataset_id).error or "")
    assert remote_session_gone(client, journal, dataset_id)


def test_output_above_download_cap_ends_incomplete(tmp_path: Path) -> None:
    with LocalVip(tmp_path / "root", max_download=64) as server:
        ds = write_dataset(
            tmp_path / "drop" / "big-1", {"scan.txt": "data\n" * 100},
            {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.txt"}},
        )
        journal, dataset_id, runner, client = start_run(tmp_path, server, ds)
        assert runner.run(dataset_id).stage == "incomplete"
        row = journal.get(dataset_id)
        assert "LEFT_ON_VIP.txt" in (row.error or "") and "64 B" in (row.error or "")
        warnings = [ev.message for ev in journal.events(dataset_id) if ev.level == "warning"]
        assert any("direct-transfer limit" in m for m in warnings)
        # the output we could not mirror stays on the server with its execution; inputs gone
        (left,) = journal.outputs(dataset_id)
        assert client.exists(left.remote)
        assert not client.exists(f"{row.remote_root}/INPUTS")
        assert len(client.executions()) == 1
        assert left.remote in (Path(row.output_dir or "") / "LEFT_ON_VIP.txt").read_text()


def test_invalid_dataset_exits_2_and_sends_nothing(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(
        tmp_path / "drop" / "subject-4", {"other.txt": "x\n"},
        {"pipeline": "TextTransform/1.0", "inputs": {"input_file": "missing.txt", "repeat": "two"}},
    )
    result = run_agent(
        "run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
        "--output", str(tmp_path / "out"), api_key=vip_server.api_key, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "missing.txt" in result.stderr and "whole number" in result.stderr
    client = VipClient(vip_server.url, vip_server.api_key)
    assert client.list("/vip/Home") == []
    assert server_execution_names(vip_server) == []


def test_dry_run_prints_plan_and_sends_nothing(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(
        tmp_path / "drop" / "subject-5", {"a.txt": "a\n", "b.txt": "b\n"},
        {"pipeline": "FileStats/1.0", "inputs": {"input_file": "*.txt"}},
    )
    result = run_agent(
        "run", str(ds), "--server", vip_server.url, "--dry-run", "--state",
        str(tmp_path / "state"), api_key=vip_server.api_key, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "a.txt" in result.stdout and "b.txt" in result.stdout
    assert "nothing was sent" in result.stdout
    client = VipClient(vip_server.url, vip_server.api_key)
    assert client.list("/vip/Home") == []


# Crash points: every stage boundary, between the launch POST and its journal write, and
# in the middle of an upload and of a download. Each run is SIGKILLed there, then resumed.
CRASH_POINTS = [
    "stage:upload",
    "upload:partial",
    "stage:launch",
    "launch:posted",
    "stage:monitor",
    "stage:mirror",
    "download:partial",
    "stage:extract",
    "stage:cleanup",
]


@pytest.mark.parametrize("failpoint", CRASH_POINTS)
def test_resume_after_sigkill(tmp_path: Path, vip_server: LocalVip, failpoint: str) -> None:
    # two 3 MB random files: uploads and the concatenated output span many chunks
    files = {"a.bin": os.urandom(3_000_000), "b.bin": os.urandom(3_000_000)}
    ds = write_dataset(
        tmp_path / "drop" / "crash-1", files,
        {"pipeline": "ConcatFiles/1.0", "inputs": {"files": ["a.bin", "b.bin"], "output_name": "joined"},
         "runs": 2},
    )
    vip_server.max_download = 50_000_000
    args = ("run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
            "--output", str(tmp_path / "out"), "--poll", "0.1")
    first = run_agent(*args, api_key=vip_server.api_key, cwd=tmp_path,
                      VIP_AGENT_FAILPOINTS=failpoint)
    assert first.returncode == -signal.SIGKILL, (first.returncode, first.stderr)
    second = run_agent(*args, api_key=vip_server.api_key, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    out = Path(second.stdout.strip().splitlines()[-1])
    # exactly one execution per run, ever
    names = server_execution_names(vip_server)
    assert len(names) == 2 and len(set(names)) == 2, names
    # byte-identical outputs: each run's archive holds a+b
    joined = [p for p in out.rglob("concatenated.txt") if p.parent.name == "joined.tgz"]
    assert len(joined) == 2, tree(out).keys()
    for p in joined:
        assert p.read_bytes() == files["a.bin"] + files["b.bin"]
    assert not list(out.rglob("*.part"))
    # nothing left on the server
    client = VipClient(vip_server.url, vip_server.api_key)
    wait_for(lambda: all(client.list(p.path) == [] for p in client.list("/vip/Home")))
    assert client.executions() == []


def test_session_data_loads_in_official_client(tmp_path: Path, vip_server: LocalVip) -> None:
    from vip_client import VipSession

    ds = write_dataset(
        tmp_path / "drop" / "subject-6", {"scan.txt": "abc\n"},
        {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.txt"}},
    )
    journal, dataset_id, runner, _ = start_run(tmp_path, vip_server, ds)
    assert runner.run(dataset_id).stage == "done"
    row = journal.get(dataset_id)
    session = VipSession(output_dir=row.output_dir, verbose=False)
    assert session.session_name == row.session
    assert session.pipeline_id == "FileStats/1.0"
    assert set(session.workflows) == {e.vip_id for e in journal.executions(dataset_id)}


def test_retry_after_failed_execution_launches_anew(tmp_path: Path, vip_server: LocalVip) -> None:
    import yaml

    job = {"pipeline": "Sleep/1.0", "inputs": {"duration": 0.1, "exit_code": 3}}
    ds = write_dataset(tmp_path / "drop" / "flaky-1", {"x.txt": "x\n"}, job)
    journal, dataset_id, runner, _ = start_run(tmp_path, vip_server, ds)
    assert runner.run(dataset_id).stage == "failed"
    first_out = Path(journal.get(dataset_id).output_dir or "")
    # the user fixes the job file and asks for a retry
    job["inputs"]["exit_code"] = 0
    (ds / "job.yaml").write_text(yaml.safe_dump(job))
    result = run_agent("retry", "flaky-1", "--state", str(tmp_path / "state"),
                       api_key=vip_server.api_key, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert runner.run(dataset_id).stage == "done", journal.get(dataset_id).error
    names = server_execution_names(vip_server)
    assert len(names) == 2 and len(set(names)) == 2, names
    second_out = Path(journal.get(dataset_id).output_dir or "")
    assert second_out != first_out
    assert (first_out / "logs").is_dir()  # the failed attempt's logs are kept
    assert list(second_out.rglob("slept_*.txt"))


def test_keep_remote_leaves_data_and_execution_on_the_server(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    ds = write_dataset(
        tmp_path / "drop" / "keep-1", {"scan.txt": "abc\n"},
        {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.txt"}},
    )
    result = run_agent(
        "run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
        "--output", str(tmp_path / "out"), "--keep-remote", "--poll", "0.1",
        api_key=vip_server.api_key, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "remote data kept" in result.stderr
    journal = Journal.in_state_dir(tmp_path / "state")
    (row,) = journal.datasets()
    client = VipClient(vip_server.url, vip_server.api_key)
    assert client.exists(f"{row.remote_root}/INPUTS/scan.txt")
    assert [p for p in client.list(f"{row.remote_root}/OUTPUTS")]
    (execution,) = client.executions()
    assert execution["status"] == "Finished"


def test_run_at_the_servers_cap_does_not_post_a_launch_every_poll(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    """runs: 3 of a short pipeline at VIP's cap of 1, through the real CLI: the launches
    refused with 2001 back off on the server's budget and resume when one of ours ends
    (before: 63 launch POSTs, 60 refused, in 50 s for a 15 s pipeline)."""
    assert vip_server.max_running == 1
    ds = write_dataset(tmp_path / "drop" / "capped", {"x.txt": "x\n"},
                       {"pipeline": "Sleep/1.0", "inputs": {"duration": 2}, "runs": 3})
    result = run_agent("run", str(ds), "--server", vip_server.url, "--state",
                       str(tmp_path / "state"), "--output", str(tmp_path / "out"),
                       api_key=vip_server.api_key, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    posts = vip_server.stats.counts["POST /executions"]
    assert 3 <= posts <= 7, posts  # three launches and a handful of refusals, not one per poll
    assert len(server_execution_names(vip_server)) == 3
