"""``vip-agent run`` as a lab user meets it: ERROR.txt, cancel and stop, ``--output`` on a rerun.

Real processes against the local server; waits are polls with deadlines.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthelpers import agent_env, run_agent, wait_for, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip
from agent.vip.client import VipClient
from agent.watch.after import ERROR_FILE


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)


def run_args(server: LocalVip, tmp_path: Path, ds: Path, output: str | None) -> list[str]:
    args = ["run", str(ds), "--server", server.url, "--state", str(tmp_path / "state"),
            "--poll", "0.1"]  # fmt: skip
    return args + (["--output", str(tmp_path / output)] if output else [])


def run(server: LocalVip, tmp_path: Path, ds: Path, output: str | None = "A") -> Any:
    return run_agent(*run_args(server, tmp_path, ds, output), api_key=server.api_key, cwd=tmp_path)


def test_failed_run_writes_error_txt_and_a_fixed_rerun_honours_a_new_output(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    job = {"pipeline": "Sleep/1.0", "inputs": {"duration": 0.1, "exit_code": 3}}
    ds = write_dataset(tmp_path / "drop" / "flaky", {"x.txt": "x\n"}, job)
    first = run(vip_server, tmp_path, ds, "A")
    assert first.returncode == 1, first.stderr
    assert "failed" in first.stderr
    # the same report as `watch` writes, saying how to run it again with `run`
    report = (ds / ERROR_FILE).read_text()
    assert "could not process the dataset 'flaky'" in report
    assert "ExecutionFailed" in report
    assert f"vip-agent run {ds}" in report
    # fixed: a new attempt, into the new --output (a failed run's output folder is not reused)
    job["inputs"]["exit_code"] = 0
    (ds / "job.yaml").write_text(yaml.safe_dump(job))
    second = run(vip_server, tmp_path, ds, "B")
    assert second.returncode == 0, second.stderr
    out = Path(second.stdout.strip().splitlines()[-1])
    assert out.parent == tmp_path / "B" and list(out.rglob("slept_*.txt"))
    assert not (ds / ERROR_FILE).exists()  # the stale report is gone


def test_output_of_a_finished_run_is_refused_not_ignored(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.txt"}}
    ds = write_dataset(tmp_path / "drop" / "subject", {"scan.txt": "abc\n"}, job)
    first = run(vip_server, tmp_path, ds, "A")
    assert first.returncode == 0, first.stderr
    out_a = Path(first.stdout.strip().splitlines()[-1])
    assert out_a.parent == tmp_path / "A"
    other = run(vip_server, tmp_path, ds, "B")
    assert other.returncode == 2
    assert "--output" in other.stderr and "refused" in other.stderr and str(out_a) in other.stderr
    assert not (tmp_path / "B").exists()
    # the same folder, or none, is fine
    for output in ("A", None):
        same = run(vip_server, tmp_path, ds, output)
        assert same.returncode == 0 and same.stdout.strip().splitlines()[-1] == str(out_a)


def start_long_run(tmp_path: Path, server: LocalVip, name: str) -> tuple[subprocess.Popen[str], Journal]:
    job = {"pipeline": "Sleep/1.0", "inputs": {"duration": 30}}
    ds = write_dataset(tmp_path / "drop" / name, {"x.txt": "x\n"}, job)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *run_args(server, tmp_path, ds, "A")],
        env=agent_env(server.api_key), cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    journal = Journal.in_state_dir(tmp_path / "state")
    wait_for(
        lambda: [d for d in journal.datasets() if d.stage == "monitor"], timeout=30,
        what="execution running",
    )  # fmt: skip
    return proc, journal


def test_cancel_from_another_shell_reports_cancelled(tmp_path: Path, vip_server: LocalVip) -> None:
    proc, journal = start_long_run(tmp_path, vip_server, "long")
    try:
        cancel = run_agent(
            "cancel", "long", "--state", str(tmp_path / "state"), "--wait", "30",
            api_key=vip_server.api_key, cwd=tmp_path,
        )  # fmt: skip
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert proc.returncode == 4, err
    assert "long cancelled" in err and "failed" not in err
    assert journal.find(name="long")[0].stage == "cancelled"
    client = VipClient(vip_server.url, vip_server.api_key)
    assert client.executions() == []  # killed and deleted


def test_sigint_stops_a_run_resumably_and_says_so(tmp_path: Path, vip_server: LocalVip) -> None:
    proc, journal = start_long_run(tmp_path, vip_server, "paused")
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "stopped at stage monitor" in err and "not cancelled" in err
    assert "failed" not in err and "Traceback" not in err
    (ds,) = journal.find(name="paused")
    assert ds.stage == "monitor" and not ds.final  # the same command resumes it
