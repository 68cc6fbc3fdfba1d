"""One owner per dataset (issue 15.5), through the real CLI: a `vip-agent watch` process and
`vip-agent run` processes on one state folder, against the local server on a slow link.

What is counted is what the server received: one upload of each file and one launch per run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from agenthelpers import agent_env, run_agent, wait_for, watch_process, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip
from agent.localvip.faults import FaultSpec

TEMPLATE = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}
FILES: dict[str, bytes | str] = {"data.txt": "a b c\n", "notes/extra.txt": "x\n", "notes/more.txt": "y\n"}


@contextmanager
def service(tmp_path: Path, server: LocalVip, drop: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A real `vip-agent watch` on ``drop`` (state in tmp_path/state); its log file."""
    log_file = tmp_path / "watch.log"
    args = [str(drop), "--server", server.url, "--output", str(tmp_path / "out"),
            "--state", str(tmp_path / "state"), "--settle", "0.3"]  # fmt: skip
    with watch_process(args, api_key=server.api_key, cwd=tmp_path, log=log_file) as proc:
        yield proc, log_file


def make_drop(tmp_path: Path) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump(TEMPLATE), encoding="utf-8")
    return drop


def stage_of(journal: Journal, name: str) -> str | None:
    rows = journal.find(name=name)
    return str(rows[-1].stage) if rows else None


def launches(server: LocalVip) -> int:
    return server.stats.counts["POST /executions"]


def test_run_on_a_dataset_the_service_runs_refuses_with_one_line_and_nothing_twice(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path)
    vip_server.faults = FaultSpec(latency=1.5, methods=frozenset({"PUT"}))  # a slow link
    with service(tmp_path, vip_server, drop) as (proc, log_file):
        journal = Journal.in_state_dir(tmp_path / "state")
        write_dataset(drop / "s1", FILES)
        wait_for(lambda: stage_of(journal, "s1") == "upload", timeout=60, what="s1 uploading")
        # a lab re-runs it by hand while the service uploads it: refused, the service named
        done = run_agent("run", str(drop / "s1"), "--server", vip_server.url,
                         "--state", str(tmp_path / "state"), "--poll", "0.05:0.3",
                         api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 75, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {proc.pid}" in lines[0], done.stderr
        assert "the running service (vip-agent watch" in lines[0] and "Traceback" not in done.stderr
        # a dataset not yet taken, in its drop folder: the service's too
        write_dataset(drop / "s2", {"data.txt": "z\n"})
        early = run_agent("run", str(drop / "s2"), "--server", vip_server.url,
                          "--state", str(tmp_path / "state"),
                          api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
        assert early.returncode == 75 and f"pid {proc.pid}" in early.stderr, early.stderr
        vip_server.faults = FaultSpec()
        wait_for(lambda: stage_of(journal, "s1") == "done" and stage_of(journal, "s2") == "done",
                 timeout=90, what="s1 and s2 done")  # fmt: skip
        log = log_file.read_text()
    (s1,) = journal.find(name="s1")
    assert vip_server.stats.counts["upload"] == len(journal.files(s1.id)) + 1  # s2: one file
    assert launches(vip_server) == 2  # one each
    assert "Traceback" not in log and "IllegalTransition" not in log
    assert "picked up from the journal" not in log


def test_the_service_leaves_a_run_alone_and_takes_its_dataset_once_it_is_killed(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere).mkdir()
    (elsewhere / "job.yaml").write_text(yaml.safe_dump(TEMPLATE), encoding="utf-8")
    state = tmp_path / "state"
    with service(tmp_path, vip_server, drop) as (proc, log_file):
        journal = Journal.in_state_dir(state)
        # a small run beside the service: run alone drives it, to the end
        write_dataset(elsewhere / "small", {"data.txt": "q\n"})
        small = run_agent("run", str(elsewhere / "small"), "--server", vip_server.url,
                          "--state", str(state), "--poll", "0.05:0.3",
                          api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
        assert small.returncode == 0, small.stderr
        assert launches(vip_server) == 1
        # a slow one: the run holds its lease while it uploads, the service leaves it alone
        vip_server.faults = FaultSpec(latency=2.0, methods=frozenset({"PUT"}))
        write_dataset(elsewhere / "big", FILES)
        runner = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", str(elsewhere / "big"), "--server",
             vip_server.url, "--state", str(state), "--poll", "0.05:0.3"],
            env=agent_env(vip_server.api_key), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=tmp_path,
        )  # fmt: skip
        try:
            wait_for(lambda: stage_of(journal, "big") == "upload", timeout=60, what="big uploading")
            (big,) = journal.find(name="big")
            lease = journal.lease(big.id)
            assert lease is not None and lease.owner.pid == runner.pid and lease.alive()
            # a second run on it is refused, naming the first
            again = run_agent("run", str(elsewhere / "big"), "--server", vip_server.url,
                              "--state", str(state), api_key=vip_server.api_key, cwd=tmp_path)
            assert again.returncode == 75 and f"vip-agent run (pid {runner.pid})" in again.stderr
            # the run dies without a word (SIGKILL): its lease dies with it
            runner.send_signal(signal.SIGKILL)
            runner.wait(timeout=10)
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
        assert "picked up from the journal" not in log_file.read_text()  # not while it lived
        vip_server.faults = FaultSpec()
        wait_for(lambda: "big: picked up from the journal" in log_file.read_text(), timeout=30,
                 what="the service takes big")  # fmt: skip
        wait_for(lambda: stage_of(journal, "big") == "done", timeout=90, what="big done")
        lease = journal.lease(big.id)
        assert lease is None or lease.owner.pid == proc.pid
        log = log_file.read_text()
    assert launches(vip_server) == 2  # small once, big once (the service resumed its upload)
    assert "small: picked up" not in log  # the service never drove the small run
    assert "Traceback" not in log


def test_a_killed_service_blocks_nothing_run_takes_its_dataset(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path)
    vip_server.faults = FaultSpec(latency=2.0, methods=frozenset({"PUT"}))
    with service(tmp_path, vip_server, drop) as (proc, _log_file):
        journal = Journal.in_state_dir(tmp_path / "state")
        write_dataset(drop / "s1", FILES)
        wait_for(lambda: stage_of(journal, "s1") == "upload", timeout=60, what="s1 uploading")
        proc.send_signal(signal.SIGKILL)  # the service dies holding s1's lease
        proc.wait(timeout=10)
    vip_server.faults = FaultSpec()
    done = run_agent("run", str(drop / "s1"), "--server", vip_server.url,
                     "--state", str(tmp_path / "state"), "--poll", "0.05:0.3",
                     api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resuming s1 at stage upload" in done.stderr
    assert stage_of(journal, "s1") == "done" and launches(vip_server) == 1
