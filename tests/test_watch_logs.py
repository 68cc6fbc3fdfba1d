"""Service logging: one line per event, JSON on request, API keys never written."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

from agenthelpers import agent_env, run_agent, wait_for, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip
from agent.logs import get_logger, setup_logging

KEY = "s3cr3t-api-key-value"


def test_text_one_line_and_redacted() -> None:
    stream = io.StringIO()
    redact = setup_logging("text", stream=stream)
    redact.add(KEY)
    log = get_logger("test")
    log.info("using key %s for %s", KEY, "http://x")
    log.warning("header apikey: %s\nsecond line", "other-token-123")
    try:
        raise RuntimeError(f"failed with {KEY}")
    except RuntimeError:
        log.exception("boom")
    out = stream.getvalue()
    lines = out.splitlines()
    assert len(lines) == 3, out  # multi-line messages and tracebacks stay on one line
    assert KEY not in out and "other-token-123" not in out
    assert "using key *** for http://x" in lines[0] and "WARNING" in lines[1]
    assert "RuntimeError: failed with ***" in lines[2]


def test_json_format() -> None:
    stream = io.StringIO()
    redact = setup_logging("json", stream=stream, level=logging.DEBUG)
    redact.add(KEY)
    get_logger("watch").info("dataset %s done", "s1", extra={"dataset": "s1", "note": KEY})
    doc = json.loads(stream.getvalue())
    assert doc["message"] == "dataset s1 done" and doc["level"] == "info"
    assert doc["logger"] == "vip_agent.watch" and doc["dataset"] == "s1" and doc["note"] == "***"


BROKEN_JOB = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}


def test_each_failure_is_said_once(tmp_path: Path, vip_server: LocalVip) -> None:
    """Issue 17 #7: a failure is one ERROR line in the service log and one error on `run`'s
    terminal; "stopped" is never logged before a start-up error; a configuration error
    prints no stray "detail:" line."""
    drop = tmp_path / "drop"
    write_dataset(drop / "broken", {"date.txt": "typo\n"}, BROKEN_JOB)
    # `run`: the error once (as the dataset's last event), then where it is saved
    done = run_agent("run", str(drop / "broken"), "--server", vip_server.url, "--state",
                     str(tmp_path / "state-run"), "--output", str(tmp_path / "out-run"),
                     api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("is not in the dataset folder") == 1, done.stderr
    assert "ERROR.txt" in done.stderr.splitlines()[-1], done.stderr
    # `watch`: one line for the failure, at ERROR
    log_file = tmp_path / "watch.log"
    with log_file.open("w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "watch", str(drop), "--server", vip_server.url,
             "--output", str(tmp_path / "out"), "--state", str(tmp_path / "state"), "--settle", "0.2"],
            stdout=subprocess.DEVNULL, stderr=log_fh, env=agent_env(vip_server.api_key), cwd=tmp_path,
        )  # fmt: skip
        try:
            wait_for(lambda: "broken failed" in log_file.read_text(), timeout=30, what="the failure logged")
            wait_for(lambda: (drop / "broken" / "ERROR.txt").exists(), timeout=30, what="ERROR.txt")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
    lines = [line for line in log_file.read_text().splitlines() if "broken failed" in line]
    assert len(lines) == 1 and " ERROR " in lines[0], lines
    assert log_file.read_text().splitlines()[-1].endswith("INFO    stopped")
    # a start-up error: the page's port is taken
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_agent("watch", str(drop), "--server", vip_server.url, "--output", str(tmp_path / "out"),
                         "--state", str(tmp_path / "state2"), "--http", f"127.0.0.1:{port}",
                         api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert done.returncode != 0 and "Address already in use" in done.stderr, done.stderr
    assert "stopped" not in done.stderr and "detail:" not in done.stderr, done.stderr
    done = run_agent("watch", "--config", "missing.yaml", api_key="unused", cwd=tmp_path)
    assert done.returncode == 2 and "missing.yaml" in done.stderr, done.stderr
    assert "detail" not in done.stderr, done.stderr


def test_logs_follow_shows_events_first_and_output_as_it_grows(tmp_path: Path, vip_server: LocalVip) -> None:
    """Issue 17 #13: `logs --follow` prints the events first (also of a finished dataset),
    and a running job's stdout while it runs (VIP serves it), not only once it ended;
    what was shown live is not printed again when the log is saved."""
    state = tmp_path / "state"
    ds = write_dataset(tmp_path / "nap", {"note.txt": "n"}, {"pipeline": "Sleep/1.0", "inputs": {"duration": "4"}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(ds), "--server", vip_server.url, "--state", str(state),
         "--output", str(tmp_path / "out"), "--poll", "0.2"],
        env=agent_env(vip_server.api_key), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    follow = None
    try:
        journal = Journal.in_state_dir(state)
        wait_for(lambda: any(d.stage == "monitor" for d in journal.datasets()), timeout=30, what="running")
        follow = subprocess.Popen(
            [sys.executable, "-m", "agent", "logs", "nap", "--follow", "--interval", "0.1",
             "--live-interval", "0.2", "--state", str(state)],
            env=agent_env(vip_server.api_key), cwd=tmp_path, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert follow.stdout is not None
        seen: list[str] = []
        for line in follow.stdout:
            seen.append(line)
            if "Sleep: sleeping 4" in line:
                break
        (nap,) = journal.datasets()
        # read while the job still runs: the dataset has not ended, the execution neither
        assert not journal.get(nap.id).final and not any(e.ended for e in journal.executions(nap.id)), seen
        assert any("execution launched" in line for line in seen), seen  # events came first
        rest = follow.stdout.read()
        assert follow.wait(timeout=30) == 0
        assert proc.wait(timeout=30) == 0
    finally:
        for p in (proc, follow):
            if p is not None and p.poll() is None:
                p.kill()
    out = "".join(seen) + rest
    assert out.count("Sleep: sleeping 4") == 1, out  # not again from the saved file
    assert "Sleep: done" in out and "stdout.txt <==" in out, out
    # a finished dataset: --follow still prints its events, before the saved logs
    done = run_agent("logs", "nap", "--follow", "--state", str(state), api_key=vip_server.api_key, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    first_event = next(i for i, line in enumerate(lines) if "dataset nap recorded" in line)
    first_log = next(i for i, line in enumerate(lines) if line.startswith("==> "))
    assert first_event < first_log, done.stdout
