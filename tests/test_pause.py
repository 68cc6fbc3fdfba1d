"""Pause and resume (issue 17 item 23): a real ``vip-agent watch`` process, the real CLI,
the local VIP server; the pause holds across a restart and everything completes after resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.journal import Journal
from agent.localvip import LocalVip
from tests.agenthelpers import agent_env, run_agent, wait_for, write_dataset

TEMPLATE = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)


def make_drop(tmp_path: Path, job: dict[str, Any] | None = None) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "job.yaml").write_text(yaml.safe_dump(job or TEMPLATE), encoding="utf-8")
    return drop


@contextmanager
def watching(tmp_path: Path, server: LocalVip, drop: Path) -> Iterator[subprocess.Popen[str]]:
    """``vip-agent watch`` as a real process, stopped with SIGTERM (its log in agent.log)."""
    log = (tmp_path / "agent.log").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "watch", str(drop), "--server", server.url,
         "--output", str(tmp_path / "out"), "--state", str(tmp_path / "state"), "--settle", "0.3"],
        env=agent_env(server.api_key), stdout=subprocess.DEVNULL, stderr=log, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_for(lambda: "ready" in (tmp_path / "agent.log").read_text() or proc.poll() is not None,
                 timeout=30, what="agent ready")  # fmt: skip
        assert proc.poll() is None, (tmp_path / "agent.log").read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def cli(tmp_path: Path, server: LocalVip, *args: str) -> subprocess.CompletedProcess[str]:
    return run_agent(*args, "--state", str(tmp_path / "state"), api_key=server.api_key, cwd=tmp_path)


def status(tmp_path: Path, server: LocalVip) -> dict[str, dict[str, Any]]:
    done = cli(tmp_path, server, "status", "--json")
    assert done.returncode == 0, done.stderr
    return {r["name"]: r for r in json.loads(done.stdout)}


def launched(server: LocalVip) -> int:
    return len(list(server.state.query("SELECT name FROM executions")))


def uploaded(journal: Journal) -> int:
    return sum(f.uploaded for d in journal.datasets() for f in journal.files(d.id))


def stays(check: Any, seconds: float) -> None:
    """``check()`` holds for ``seconds`` (an observation window: the agent looks at the
    journal every 2 s, so 3 s covers at least one chance to start work)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check()
        time.sleep(0.1)


def test_pause_all_holds_new_datasets_across_a_restart_then_resume_completes(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path)
    journal = Journal.in_state_dir(tmp_path / "state")
    with watching(tmp_path, vip_server, drop):
        paused = cli(tmp_path, vip_server, "pause", "--all")
        assert paused.returncode == 0, paused.stderr
        assert "the whole agent paused" in paused.stdout and "applies it within seconds" in paused.stdout
        write_dataset(drop / "s1", {"data.txt": "one two three\n"})
        # detected and recorded (the agent keeps watching), shown paused with who paused it
        wait_for(lambda: status(tmp_path, vip_server).get("s1", {}).get("state") == "paused",
                 timeout=30, what="s1 recorded and paused")  # fmt: skip
        rec = status(tmp_path, vip_server)["s1"]
        assert rec["paused_by"]["scope"] == "all" and rec["paused_by"]["via"] == "command line"
        assert rec["paused_by"]["by"] and rec["paused_by"]["since"] > 0
        assert "vip-agent resume --all" in rec["paused"]
        stays(lambda: uploaded(journal) == 0 and launched(vip_server) == 0
              and journal.find(name="s1")[0].stage == "validate", 3.0)  # fmt: skip
        table = cli(tmp_path, vip_server, "status")
        assert "paused: the whole agent" in table.stdout and "s1" in table.stdout
    # a restart: the pause is in the journal, not in the process
    with watching(tmp_path, vip_server, drop):
        wait_for(lambda: "picked up" in (tmp_path / "agent.log").read_text()
                 or "resuming 1 unfinished" in (tmp_path / "agent.log").read_text(), timeout=30)  # fmt: skip
        stays(lambda: uploaded(journal) == 0 and launched(vip_server) == 0, 3.0)
        assert status(tmp_path, vip_server)["s1"]["state"] == "paused"
        resumed = cli(tmp_path, vip_server, "resume")
        assert resumed.returncode == 0 and "1 pause(s) lifted" in resumed.stdout, resumed.stdout
        wait_for(lambda: journal.find(name="s1")[0].final, timeout=60, what="s1 finished")
    (ds,) = journal.find(name="s1")
    assert ds.stage == "done" and ds.paused is None
    assert launched(vip_server) == 1
    assert "paused_by" not in status(tmp_path, vip_server)["s1"]
    assert json.loads((Path(ds.output_dir or "") / "STATUS.json").read_text())["state"] == "done"


def test_a_dataset_paused_while_running_is_polled_but_not_downloaded(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path, {"pipeline": "Sleep/1.0", "inputs": {"duration": 3}})
    journal = Journal.in_state_dir(tmp_path / "state")
    with watching(tmp_path, vip_server, drop):
        write_dataset(drop / "nap", {"data.txt": "z\n"})
        wait_for(lambda: any(d.stage == "monitor" for d in journal.datasets()), timeout=30)
        (ds,) = journal.datasets()
        paused = cli(tmp_path, vip_server, "pause", f"#{ds.id}")
        assert paused.returncode == 0 and f"dataset #{ds.id} paused" in paused.stdout, paused.stdout
        # the execution on VIP runs to its end and the agent sees it (polling is harmless) ...
        wait_for(lambda: journal.get(ds.id).stage == "mirror", timeout=60, what="execution seen ending")
        assert all(e.status == "Finished" for e in journal.executions(ds.id))
        # ... but nothing is downloaded while paused
        stays(lambda: journal.get(ds.id).stage == "mirror" and not journal.outputs(ds.id), 3.0)
        rec = status(tmp_path, vip_server)["nap"]
        assert rec["state"] == "paused" and rec["paused_by"]["scope"] == "dataset"
        # STATUS.json beside the outputs says so too (the runner does not step it meanwhile)
        report = Path(journal.get(ds.id).output_dir or "") / "STATUS.json"
        wait_for(lambda: json.loads(report.read_text())["state"] == "paused", timeout=10)
        resumed = cli(tmp_path, vip_server, "resume", "nap")
        assert resumed.returncode == 0 and "resumed" in resumed.stdout
        wait_for(lambda: journal.get(ds.id).final, timeout=60)
    assert journal.get(ds.id).stage == "done"
    assert all(o.downloaded for o in journal.outputs(ds.id))


def test_pause_names_what_it_cannot_pause(tmp_path: Path, vip_server: LocalVip) -> None:
    drop = make_drop(tmp_path)
    state = tmp_path / "state"
    Journal.in_state_dir(state).add_dataset(
        name="old", path=drop / "old", server=vip_server.url, output_root=tmp_path / "out",
        drop_dir=drop, stage="done",
    )  # fmt: skip
    done = cli(tmp_path, vip_server, "pause", "old")
    assert done.returncode == 1 and "old is done: it has ended, there is nothing to pause" in done.stderr
    other = tmp_path / "elsewhere"
    other.mkdir()
    done = cli(tmp_path, vip_server, "pause", "--drop", str(other))
    assert done.returncode == 1 and f"is not a drop folder of this agent (its drop folders: {drop})" in done.stderr
    done = cli(tmp_path, vip_server, "pause", "--drop", str(drop))
    assert done.returncode == 0 and f"drop folder {drop} paused" in done.stdout
    assert "no agent is running" in done.stdout
    again = cli(tmp_path, vip_server, "pause", "--drop", str(drop))
    assert "was already paused" in again.stdout
    both = cli(tmp_path, vip_server, "pause", "old", "--all")
    assert both.returncode == 1 and "not several" in both.stderr
    assert cli(tmp_path, vip_server, "resume", "--drop", str(drop)).stdout.startswith(f"drop folder {drop} resumed")
    assert "nothing was paused" in cli(tmp_path, vip_server, "resume").stdout
