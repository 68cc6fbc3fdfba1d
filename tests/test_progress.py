"""Progress people can read: tqdm bars on a terminal (`run`), rate/ETA lines in the service log, STATUS.json current."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from agenthelpers import agent_env, run_agent, wait_for, write_dataset

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


def run_in_pty(args: list[str], api_key: str, cwd: Path, timeout: float = 90) -> tuple[int, str]:
    """``vip-agent ARGS`` with its stderr on a real pseudo-terminal: (exit status, what it drew)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=cwd, env=agent_env(api_key),
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
    proc.communicate(timeout=timeout)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def test_run_on_a_terminal_draws_a_bar_with_rate_and_eta(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = write_dataset(tmp_path / "big", {"data.txt": b"word " * 600_000}, FILESTATS)  # 3 MB
    code, screen = run_in_pty(
        ["run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
         "--output", str(tmp_path / "out"), "--poll", "0.1"], vip_server.api_key, tmp_path,
    )  # fmt: skip
    assert code == 0, screen
    assert "upload: 100%|" in screen and "download: 100%|" in screen
    assert "3.00MB/3.00MB" in screen and "B/s, ETA " in screen
    # the event announcing each transfer is printed above its bar, not after it
    lines = screen.replace("\r\n", "\n").split("\n")
    announce = next(i for i, line in enumerate(lines) if "uploading 1 file(s)" in line)
    bar = next(i for i, line in enumerate(lines) if "upload:" in line)
    assert announce < bar, screen


def test_retried_uploads_rewind_one_bar_with_a_known_total(tmp_path: Path) -> None:
    """Issue 17 #4: half of the PUTs cut mid-body (four times): each retry takes its bytes
    back on the same bar; never a new line per report, never an unknown total or > 100 %."""
    server = LocalVip(tmp_path / "vip", faults="drop_rate=0.5,methods=PUT,seed=3,times=4")
    server.start()
    try:
        files: dict[str, bytes | str] = {f"f{i}.txt": b"word " * 800_000 for i in range(3)}  # 3 x 4 MB, streamed PUTs
        ds = write_dataset(tmp_path / "big", files, FILESTATS)
        code, screen = run_in_pty(
            ["run", str(ds), "--server", server.url, "--state", str(tmp_path / "state"),
             "--output", str(tmp_path / "out"), "--poll", "0.1"], server.api_key, tmp_path,
        )  # fmt: skip
        injected = server.faults.injected
    finally:
        server.stop()
    assert code == 0, screen
    assert injected >= 2, injected  # PUTs were really cut (else this proves nothing)
    lines = screen.replace("\r\n", "\n").split("\n")
    upload_lines = [line for line in lines if "upload:" in line]
    assert len(upload_lines) == 1, upload_lines  # one bar for the stage, redrawn in place
    frames = [f for f in upload_lines[0].split("\r") if "upload:" in f]
    assert frames and all("?" not in f.split("|")[2].split("[")[0] for f in frames), frames
    assert all("/12.0MB" in f for f in frames), frames  # the total stays known
    percents = [int(f.split("upload:")[1].split("%")[0]) for f in frames]
    assert max(percents) == 100 and all(0 <= p <= 100 for p in percents), percents
    assert any(b < a for a, b in itertools.pairwise(percents)), percents  # it went back on a retry
    assert "TB/s" not in screen


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


def test_tracker_takes_rewinds_and_late_reports_without_lying() -> None:
    """Issue 17 #22: a retry after the transfer reached its total goes back on the same
    transfer (not '250% (525 B of 210 B)'); a report overtaken by the finishing one is not
    written over the finished figures."""
    now = [0.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    tracker.update(7, "download", 100, 210)
    now[0] += 1.0
    end = tracker.update(7, "download", 210, 210)
    assert end.journal and end.log and end.log.startswith("download 100% (210 B of 210 B)")
    late = tracker.update(7, "download", 105, 210)  # another thread's report, overtaken
    assert not late.journal and not late.status and late.log is None
    now[0] += 2.0
    back = tracker.update(7, "download", 0, 210)  # the last file is fetched again
    assert back.done == 0 and back.total == 210 and back.journal
    now[0] += 1.0
    again = tracker.update(7, "download", 210, 210)
    assert again.log == "download 100% (210 B of 210 B) at 52 B/s, complete"
    assert describe("download", 525, 210, None, None) == "download 100% (210 B of 210 B), complete"


def test_dry_run_lists_in_natural_order_and_readably(tmp_path: Path, vip_server: LocalVip) -> None:
    """Issue 17 #14: f2 before f10, and a list input one value a line (no Python repr)."""
    files: dict[str, bytes | str] = {f"f{i}.txt": f"w{i}\n" for i in (1, 2, 3, 10, 11)}
    ds = write_dataset(tmp_path / "many", files, FILESTATS)
    done = run_agent("run", str(ds), "--dry-run", "--server", vip_server.url,
                     api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "['" not in out and "']" not in out, out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  f")]
    assert listed == ["f1.txt", "f2.txt", "f3.txt", "f10.txt", "f11.txt"], out
    values = [line.split("/")[-1] for line in out.splitlines() if line.startswith("    - ")]
    assert values == listed, out  # the jobs in the same order: job 0 is f1, job 3 is f10
    assert "  input_file: 5 value(s), one job each" in out


def test_retried_transfers_take_their_bytes_back(tmp_path: Path) -> None:
    """Issue 17 #22: a download (and an upload) cut half-way twice is sent again from zero,
    and the client's progress takes the cut attempt's bytes back: the running total never
    passes the file's size ('download 250% (525 B of 210 B)') and ends exactly on it."""
    from agent.vip.client import VipClient

    server = LocalVip(tmp_path / "vip", faults=r"drop_rate=1.0,match=/data\.bin,methods=PUT,times=2")
    server.start()
    try:
        client = VipClient(server.url, server.api_key, retries=4, backoff=0.01)
        local = tmp_path / "data.bin"
        local.write_bytes(os.urandom(3 * MB))  # streamed (not one small PUT)
        folder = "/vip/Home/API/rewind"
        client.makedirs(folder)
        for direction in ("upload", "download"):
            if direction == "download":  # two cut GETs now
                server.faults.methods = frozenset({"GET"})
                server.faults.times = server.faults.injected + 2
            seen = [0]
            totals: list[int] = []

            def progress(n: int, seen: list[int] = seen, totals: list[int] = totals) -> None:
                seen[0] += n
                totals.append(seen[0])

            if direction == "upload":
                client.upload(local, f"{folder}/data.bin", progress=progress)
            else:
                client.download(f"{folder}/data.bin", tmp_path / "back.bin", expected_size=3 * MB, progress=progress)
            assert max(totals) <= 3 * MB and totals[-1] == 3 * MB, (direction, max(totals))
            assert any(b < a for a, b in itertools.pairwise(totals)), direction  # it went back
        injected = server.faults.injected
    finally:
        server.stop()
    assert injected == 4
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
