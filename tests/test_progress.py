"""Progress people can read: tqdm bars on a terminal (`run`), rate/ETA lines in the service log, STATUS.json current."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from agenthelpers import agent_env, wait_for, write_dataset

from agent.localvip import LocalVip
from agent.progress import ProgressTracker, describe

FILESTATS = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "*.txt"}}
MB = 1_000_000


def test_tracker_rate_eta_and_pacing() -> None:
    """Pure arithmetic with a hand-moved clock: rate over the recent window, ETA, when to log."""
    now = [100.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    first = tracker.update(1, "upload", 10 * MB, 100 * MB)
    assert first.journal and first.log is None  # the first report only starts the clock
    now[0] += 2.0
    second = tracker.update(1, "upload", 30 * MB, 100 * MB)  # 20 MB in 2 s
    assert second.rate == 10 * MB and second.eta == 7.0
    assert second.log == "upload 30% (30.0 MB of 100.0 MB) at 10.0 MB/s, 7 s left"
    now[0] += 0.5
    quiet = tracker.update(1, "upload", 35 * MB, 100 * MB)
    assert quiet.log is None and not quiet.journal  # neither a new 25 % step nor a second later
    now[0] += 40.0
    assert tracker.update(1, "upload", 40 * MB, 100 * MB).log  # 30 s without a line: one anyway
    now[0] += 1.0
    last = tracker.update(1, "upload", 100 * MB, 100 * MB)
    assert last.journal and last.status and last.log and last.log.endswith(", complete")
    assert last.as_progress()["kind"] == "upload" and "rate" in last.as_progress()
    assert describe("download", 0, 0, None, None) == "download 100% (0 B of 0 B), complete"


def test_run_on_a_terminal_draws_a_bar_with_rate_and_eta(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(tmp_path / "big", {"data.txt": b"word " * 600_000}, FILESTATS)  # 3 MB
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(ds), "--server", vip_server.url,
         "--state", str(tmp_path / "state"), "--output", str(tmp_path / "out"), "--poll", "0.1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path,
        env=agent_env(vip_server.api_key),
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=60)
    reader.join(timeout=10)
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen
    assert "upload: 100%|" in screen and "download: 100%|" in screen
    assert "3.00MB/3.00MB" in screen and "B/s, ETA " in screen


def test_service_log_and_status_json_during_a_slow_upload(tmp_path: Path, vip_server: LocalVip) -> None:
    # Each upload answers 0.7 s late (injected latency) and one file moves at a time: four
    # files take about 3 s, long enough for a progress line and a STATUS.json mid-transfer.
    vip_server.faults.latency = 0.7
    vip_server.faults.match = r"/rest/path/"
    vip_server.faults.methods = frozenset({"PUT"})
    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "state": str(tmp_path / "state"),
        "drops": [{"path": str(drop), "output": str(out), "server": vip_server.url,
                   "transfer_parallelism": 1, "readiness": {"settle_seconds": 0.2}}],
    }))  # fmt: skip
    log_file = tmp_path / "agent.log"
    with log_file.open("w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "watch", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=log_fh, env=agent_env(vip_server.api_key), cwd=tmp_path,
        )  # fmt: skip
        try:
            write_dataset(drop / "slow", {f"part{i}.txt": b"x" * 300_000 for i in range(4)}, FILESTATS)

            def mid_upload() -> dict[str, object] | None:
                found = list(out.glob("slow*/STATUS.json"))
                if not found:
                    return None
                try:
                    status = json.loads(found[0].read_text())
                except ValueError:
                    return None
                p = status.get("progress") or {}
                ok = status["state"] == "uploading" and p.get("kind") == "upload" and 0 < p["done"] < p["total"]
                return status if ok else None

            status = wait_for(mid_upload, timeout=30, interval=0.05, what="STATUS.json during the upload")
            assert status["progress"]["total"] == 1_200_000
            wait_for(lambda: "upload 100% (1.2 MB of 1.2 MB)" in log_file.read_text(), timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
    lines = [line for line in log_file.read_text().splitlines() if ": upload " in line]
    assert any(" left" in line and "/s" in line for line in lines), lines  # a line mid-way, rate and ETA
    assert lines[-1].endswith(", complete") and "slow: upload 100%" in lines[-1]
