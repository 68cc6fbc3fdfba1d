"""The journal under a running `vip-agent watch` (issue 17 items 18 and 20), real processes:
deleted or emptied (the agent stops with one line; a restart adopts what is mirrored instead
of running it again), damaged before a start (one line, exit 2), and a full disk (one line,
then the agent goes on by itself once there is room).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from agenthelpers import run_agent, tmpfs, wait_for, watch_process, write_dataset

from agent.journal import JOURNAL_NAME, Journal
from agent.localvip import LocalVip

TEMPLATE: dict[str, object] = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}


def make_drop(tmp_path: Path, template: dict[str, object] = TEMPLATE) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "job.yaml").write_text(yaml.safe_dump(template), encoding="utf-8")
    return drop


@contextmanager
def watch(tmp_path: Path, server: LocalVip, log_name: str, state: Path | None = None
          ) -> Iterator[tuple[subprocess.Popen[str], Path]]:  # fmt: skip
    log_file = tmp_path / log_name
    args = [str(tmp_path / "drop"), "--server", server.url, "--output", str(tmp_path / "out"),
            "--state", str(state or tmp_path / "state"), "--settle", "0.3"]  # fmt: skip
    # alive=False: a test may see the service stop on its own (the journal gone)
    with watch_process(args, api_key=server.api_key, cwd=tmp_path, log=log_file, alive=False) as proc:
        yield proc, log_file


def errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_journal_lost_under_the_agent_stops_it_and_nothing_runs_twice(
    tmp_path: Path, vip_server: LocalVip, how: str
) -> None:
    drop = make_drop(tmp_path)
    state = tmp_path / "state"
    with watch(tmp_path, vip_server, "first.log") as (proc, log_file):
        write_dataset(drop / "s1", {"data.txt": "a b\n"})
        wait_for(lambda: "s1: done" in log_file.read_text(), timeout=60, what="s1 done")
        journal = state / JOURNAL_NAME
        if how == "deleted":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{journal}{suffix}").unlink(missing_ok=True)
        else:
            checkpoint(journal)  # what was written is in the file itself, then gone
            os.truncate(journal, 0)
        proc.wait(timeout=20)
        log = log_file.read_text()
    assert proc.returncode == 1, log
    (line,) = errors(log)
    assert f"was {how}" in line and "stopping" in line
    assert "Traceback" not in log
    assert vip_server.stats.counts["POST /executions"] == 1
    # restarted (systemd does): s1's outputs are mirrored, so it is recorded done, not run again
    with watch(tmp_path, vip_server, "second.log") as (proc, log_file):
        assert proc.poll() is None, log_file.read_text()
        rows = wait_for(lambda: Journal.in_state_dir(state).find(name="s1"), timeout=30)
        write_dataset(drop / "s2", {"data.txt": "c\n"})  # the agent works as usual meanwhile
        wait_for(lambda: "s2: done" in log_file.read_text(), timeout=60, what="s2 done")
        log = log_file.read_text()
    assert [r.stage for r in rows] == ["done"]
    assert "s1: already done" in log
    assert vip_server.stats.counts["POST /executions"] == 2  # s2 only
    assert "Traceback" not in log and not errors(log)


def test_a_damaged_journal_is_refused_at_start_with_one_line(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    make_drop(tmp_path)
    journal = Journal.in_state_dir(tmp_path / "state")
    for i in range(300):
        journal.add_dataset(name=f"d{i}", path=f"/x/{i}", server=vip_server.url, output_root="/o",
                            stage="done")  # fmt: skip
    checkpoint(journal.path)
    journal.close()
    raw = bytearray(journal.path.read_bytes())
    raw[8192:16384] = b"\xff" * 8192
    journal.path.write_bytes(bytes(raw))
    done = run_agent("watch", str(tmp_path / "drop"), "--server", vip_server.url,
                     "--state", str(tmp_path / "state"), api_key=vip_server.api_key,
                     cwd=tmp_path, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is damaged" in done.stderr and "Traceback" not in done.stderr
    assert len([ln for ln in done.stderr.splitlines() if "damaged" in ln]) == 1


def test_a_full_state_disk_is_said_once_and_the_agent_goes_on_when_there_is_room(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path, {"pipeline": "Sleep/1.0", "inputs": {"duration": 2}})
    state = tmp_path / "state"
    state.mkdir()
    with tmpfs(state, "size=16m", "needs root to mount a small tmpfs"):
        with watch(tmp_path, vip_server, "watch.log") as (proc, log_file):
            journal = Journal.in_state_dir(state)
            write_dataset(drop / "s1", {"data.txt": "a\n"})
            wait_for(lambda: any(d.stage == "monitor" for d in journal.datasets()), timeout=60)
            filler = fill(state)
            write_dataset(drop / "s2", {"data.txt": "b\n"})  # cannot even be recorded now
            # s1's execution ends meanwhile; the agent cannot record it, and says so once
            wait_for(lambda: vip_server.state.query("SELECT status FROM executions") == [("Finished",)],
                     timeout=30, what="s1's execution finished on the server")  # fmt: skip
            polls = vip_server.stats.counts["GET /executions/{id}"]
            wait_for(lambda: vip_server.stats.counts["GET /executions/{id}"] > polls + 1, timeout=30,
                     what="the agent seeing it ended (and failing to record it)")  # fmt: skip
            wait_for(lambda: "cannot write the journal" in log_file.read_text(), timeout=30)
            filler.unlink()
            wait_for(lambda: "s1: done" in log_file.read_text() and "s2: done" in log_file.read_text(),
                     timeout=90, what="both done once there is room")  # fmt: skip
            log = log_file.read_text()
    (line,) = errors(log)
    assert "the disk holding it is full" in line and "goes on by itself" in line
    assert "can be written again" in log
    assert "Traceback" not in log and "unexpected error" not in log
    assert vip_server.stats.counts["POST /executions"] == 2


def checkpoint(path: Path) -> None:
    """Move everything from the WAL into the journal file itself."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last block; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler
