"""``vip-agent watch``: how soon a dataset starts uploading after its last write,
and what the watcher costs while idle; native (inotify) and polling observers.

    .venv/bin/python benchmarks/watch_latency.py [--settle 1] [--datasets 10] [--idle-seconds 60]

For each observer, a watcher process (settle rule, ``--settle S``) watches an empty
drop folder (only the template ``job.yaml``) against a local VIP server in
another process. First its CPU time (utime+stime from /proc) is read over
``--idle-seconds``. Then N datasets (a folder with one small file) are written
one every ``--gap`` seconds; for each, the journal gives when the agent first
saw it, when it judged it complete and when its upload started (the runner's
"uploading ..." event). Latencies are from the close of the dataset's last
file, with S subtracted. The polling observer polls at the agent's default
``poll_interval`` unless ``--poll-interval`` is given (through an agent.yaml).
Writes ``benchmarks/results/watch_latency.json``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    REPO,
    LocalServer,
    child_env,
    machine,
    median,
    private_file,
    proc_cpu_seconds,
    proc_status_kib,
    say,
    workdir,
    write_result,
)

JOB = "pipeline: FileStats/1.0\ninputs:\n  input_file: data.txt\n"


class Watcher:
    """A ``vip-agent watch`` subprocess; its log goes to a file we can read while it runs."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._handle = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._handle,
                                     stderr=subprocess.STDOUT, env=env, cwd=log.parent)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vip-agent watch exited ({self.proc.returncode}):\n{self.tail()}")
            if any(line.rstrip().endswith("ready") for line in self.log.read_text().splitlines()):
                return
            time.sleep(0.05)
        raise RuntimeError(f"vip-agent watch did not say 'ready' within {timeout:g} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._handle.close()
        return self.proc.returncode


def write_dataset(folder: Path, chunks: int = 4, chunk: int = 16 * 1024) -> float:
    """Create a dataset folder and write its file in a few chunks; returns time of the close."""
    folder.mkdir()
    with open(folder / "data.txt", "w") as out:
        for i in range(chunks):
            out.write((f"line {i} " * 64 + "\n") * (chunk // 512 or 1))
            out.flush()
    return time.time()


def first_event(events: list[Any], prefix: str | None = None, stage: str | None = None) -> float | None:
    for ev in events:
        if prefix is not None and ev.message.startswith(prefix):
            return float(ev.time)
        if stage is not None and ev.stage == stage and prefix is None:
            return float(ev.time)
    return None


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "min": None, "median": None, "mean": None, "max": None}
    return {"n": len(values), "min": min(values), "median": median(values),
            "mean": sum(values) / len(values), "max": max(values)}


def measure(mode: str, server: LocalServer, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from agent.journal import Journal

    base = tmp / mode
    drop, out, state, creds = base / "drop", base / "out", base / "state", base / "creds"
    for folder in (drop, out):
        folder.mkdir(parents=True)
    creds.mkdir(mode=0o700)
    private_file(creds / "vip-api-key", server.api_key)
    (drop / "job.yaml").write_text(JOB)
    if args.poll_interval is not None:
        config = base / "agent.yaml"
        config.write_text(
            f"state: {state}\ndrops:\n  - path: {drop}\n    server: {server.url}\n"
            f"    output: {out}\n    observer: {mode}\n    poll_interval: {args.poll_interval}\n"
            f"    readiness: {{rule: settle, settle_seconds: {args.settle}}}\n"
        )
        argv = [PYTHON, "-m", "agent", "watch", "--config", str(config)]
    else:
        argv = [PYTHON, "-m", "agent", "watch", str(drop), "--server", server.url, "--output", str(out),
                "--state", str(state), "--settle", str(args.settle), "--observer", mode]
    # the key reaches the watcher the way systemd's LoadCredential= hands it over
    watcher = Watcher(argv, child_env(CREDENTIALS_DIRECTORY=str(creds)), base / "watch.log")
    result: dict[str, Any] = {"observer": mode}
    try:
        watcher.wait_ready()
        pid = watcher.proc.pid
        time.sleep(2.0)  # let start-up work (first poll snapshot, key check) finish before the clock
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        say(f"{mode}: idle for {args.idle_seconds:g} s...")
        time.sleep(args.idle_seconds)
        cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
        result["idle"] = {
            "seconds": t1 - t0, "cpu_s": cpu1 - cpu0,
            "cpu_percent_of_one_core": 100.0 * (cpu1 - cpu0) / (t1 - t0),
            "rss_mib": (proc_status_kib(pid, "VmRSS") or 0) / 1024,
        }
        say(f"{mode}: idle CPU {cpu1 - cpu0:.3f} s over {t1 - t0:.0f} s")

        journal = Journal.in_state_dir(state)
        writes: dict[str, float] = {}
        for i in range(args.datasets):
            name = f"ds-{i:02d}"
            writes[name] = write_dataset(drop / name)
            time.sleep(args.gap)  # pacing of the simulated instrument, not synchronisation
        deadline = time.monotonic() + args.settle + 60 + (args.poll_interval or 10.0)
        rows: dict[str, Any] = {}
        while time.monotonic() < deadline:
            rows = {d.name: d for d in journal.datasets() if d.name in writes}
            started = [n for n, d in rows.items()
                       if first_event(journal.events(d.id), prefix="uploading") is not None]
            if len(started) == len(writes):
                break
            time.sleep(0.1)
        samples: list[dict[str, Any]] = []
        for name, written in writes.items():
            row = rows.get(name)
            events = journal.events(row.id) if row is not None else []
            upload = first_event(events, prefix="uploading")
            complete = first_event(events, prefix="complete")
            samples.append({
                "dataset": name, "last_write": written,
                "seen_after_s": (row.created - written) if row is not None else None,
                "complete_after_minus_settle_s": (complete - written - args.settle) if complete else None,
                "upload_start_after_minus_settle_s": (upload - written - args.settle) if upload else None,
                "final_stage": row.stage if row is not None else None,
            })
        journal.close()
        lat = [s["upload_start_after_minus_settle_s"] for s in samples
               if s["upload_start_after_minus_settle_s"] is not None]
        result["latency"] = {
            "settle_s": args.settle, "gap_s": args.gap, "datasets": args.datasets,
            "upload_started": len(lat),
            "upload_start_minus_settle_s": stats(lat),
            "seen_after_s": stats([s["seen_after_s"] for s in samples if s["seen_after_s"] is not None]),
            "samples": samples,
        }
        result["peak_rss_mib"] = (proc_status_kib(pid, "VmHWM") or 0) / 1024
        say(f"{mode}: upload started for {len(lat)}/{args.datasets}; latency minus settle: "
            + ", ".join(f"{v:.2f}" for v in lat))
    finally:
        result["exit_code"] = watcher.stop()
        result["log_tail"] = watcher.tail(15)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=1.0, help="settle seconds S (default 1)")
    parser.add_argument("--datasets", type=int, default=10, help="datasets per observer (default 10)")
    parser.add_argument("--gap", type=float, default=2.3,
                        help="seconds between two datasets (default 2.3, not a divisor of the poll interval)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window (default 60)")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="polling observer interval (default: the agent's default)")
    parser.add_argument("--observers", default="native,polling", help="native,polling or one of them")
    parser.add_argument("--result", default="watch_latency", help="results/<name>.json")
    args = parser.parse_args()
    info = machine()  # before the work: its load average is the background load
    from agent.config import DEFAULT_POLL_INTERVAL
    from agent.daemon import DEBOUNCE

    results: dict[str, Any] = {}
    with workdir("watch") as tmp, LocalServer(tmp / "server", max_running=8) as server:
        for mode in [m for m in args.observers.split(",") if m]:
            results[mode] = measure(mode, server, tmp, args)
    data = {
        "benchmark": "watch_latency", "machine": info,
        "settle_s": args.settle, "poll_interval_s": args.poll_interval or DEFAULT_POLL_INTERVAL,
        "debounce_s": DEBOUNCE,
        "notes": [
            "latencies are from the close of the dataset's file to the journal event, minus the "
            "settle time S; the agent also debounces events for debounce_s before the first look, "
            "and the polling observer only sees a change at its next poll.",
            "idle CPU: utime+stime of the watcher process (all threads) over the idle window, "
            "drop folder holding only job.yaml.",
        ],
        "observers": results,
    }
    path = write_result(args.result, data)
    print(f"{'observer':<9}{'idle CPU s':>11}{'idle %core':>11}{'RSS MiB':>9}"
          f"{'lat-S med':>11}{'lat-S min':>11}{'lat-S max':>11}{'started':>9}")
    ok = True
    for mode, r in results.items():
        idle, lat = r.get("idle", {}), r.get("latency", {})
        st = lat.get("upload_start_minus_settle_s", {})

        def f(v: Any, spec: str = ".2f") -> str:
            return format(v, spec) if isinstance(v, float) else "-"

        print(f"{mode:<9}{f(idle.get('cpu_s'), '.3f'):>11}{f(idle.get('cpu_percent_of_one_core'), '.3f'):>11}"
              f"{f(idle.get('rss_mib'), '.1f'):>9}{f(st.get('median')):>11}{f(st.get('min')):>11}"
              f"{f(st.get('max')):>11}{lat.get('upload_started', 0):>5}/{lat.get('datasets', 0)}")
        ok = ok and lat.get("upload_started") == lat.get("datasets")
    say(f"results: {path.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
