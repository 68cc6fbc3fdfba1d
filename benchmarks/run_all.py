"""Every measure of vip-agent's speed and cost, side by side with its anchor, in one run.

    .venv/bin/python -m benchmarks [--quick] [--rounds N] [--only M1,M2] [--chaos]

Anchors: ``curl`` (transfers), the official ``vip-client`` 0.1.10 (``VipSession``, small
files), a serial ``vip-agent run`` loop and the ideal schedule (makespan). Every measure
runs its contenders in interleaved rounds (order rotated each round) against one local
VIP server in its own process, so background load hits both sides alike. Prints one line
per measure, ``MEASURE ratio=R goal=G ok|SHORT``, and writes a report (``report.md``,
``results.json``, plots when matplotlib is installed) to a new folder
``benchmarks/results/run-<time>/`` (not tracked: tracked files are never overwritten).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _common import (
    MB,
    MIB,
    PYTHON,
    REPO,
    RESULTS,
    LocalServer,
    child_env,
    machine,
    make_file,
    median,
    private_file,
    proc_cpu_seconds,
    proc_status_kib,
    run_measured,
    say,
    server_storage,
    window_stats,
    workdir,
)

WORKERS = str(Path(__file__).with_name("_workers.py"))


@dataclass
class Measure:
    """One line of the result table."""

    name: str
    ratio: float | None
    goal: float
    higher_is_better: bool
    what: str  # how the ratio is computed, for the report
    agent: str = ""  # vip-agent's figure, human-readable
    anchor: str = ""  # the anchor's figure
    detail: dict[str, Any] = field(default_factory=dict)
    #: the local server's profile the measure ran against (docs/localvip.md)
    profile: str = "ideal"

    @property
    def ok(self) -> bool:
        if self.ratio is None:
            return False
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.3g}"
        where = "" if self.profile == "ideal" else f" [{self.profile}]"
        return f"{self.name}{where} ratio={ratio} goal={op}{self.goal:g} {'ok' if self.ok else 'SHORT'}"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def worker(mode: str, job: dict[str, Any], timeout: float = 900) -> tuple[dict[str, Any], Any]:
    m = run_measured([PYTHON, WORKERS, mode], stdin_text=json.dumps(job), cwd=REPO, timeout=timeout)
    out = m.json_out()
    if m.returncode != 0 or not out.get("ok"):
        say(f"  {mode} failed: {out.get('error') or m.stderr.strip()[-500:]}")
    return out, m


def rotate(items: list[str], rnd: int) -> list[str]:
    k = rnd % len(items)
    return items[k:] + items[:k]


# -- 1. large transfers: vip-agent vs curl ---------------------------------------------------


def transfers(tmp: Path, args: argparse.Namespace, profile: str = "ideal") -> tuple[list[Measure], dict[str, Any]]:
    import transfer as tr

    size = args.size_mb * MIB
    source = make_file(tmp / "big.bin", size)
    samples: list[dict[str, Any]] = []
    clients = ["vip-agent", "curl"]
    with server_storage("transfer-server", 3 * size) as storage, \
            LocalServer(storage / "server", max_download=size + 1, profile=profile) as server:
        from agent.vip.client import VipClient

        header = private_file(tmp / f"curl-headers-{profile}", f"apikey: {server.api_key}\n")
        home = server.root / "user_localvip"
        with VipClient(server.url, server.api_key) as setup:
            setup.makedirs(tr.REMOTE_DIR)
            # one untimed round first: the first transfer into a fresh server (its storage, the
            # disk's first allocations) ran up to 2x slower, whoever made it
            for client in clients:
                name, local = f"warmup-{client}.bin", tmp / f"warmup-{client}.bin"
                for direction in ("upload", "download"):
                    target = home / "bench" / name if direction == "upload" else local
                    tr.one_transfer(client, direction, -1, server, header, source, target,
                                    f"{tr.REMOTE_DIR}/{name}", 600)
                local.unlink(missing_ok=True)
                setup.delete(f"{tr.REMOTE_DIR}/{name}", missing_ok=True)
                setup.wait_deleted(f"{tr.REMOTE_DIR}/{name}", timeout=60, interval=0.1)
            for rnd in range(args.rounds):
                for client in rotate(clients, rnd):
                    name = f"{client}-{rnd}.bin"
                    remote = f"{tr.REMOTE_DIR}/{name}"
                    local = tmp / f"down-{name}"
                    for direction in ("upload", "download"):
                        target = home / "bench" / name if direction == "upload" else local
                        samples.append(tr.one_transfer(client, direction, rnd, server, header,
                                                       source, target, remote, 600))
                    local.unlink(missing_ok=True)
                    setup.delete(remote, missing_ok=True)
                    setup.wait_deleted(remote, timeout=60, interval=0.1)
    source.unlink()

    def med(client: str, direction: str, key: str) -> float | None:
        vals = [s[key] for s in samples if s["client"] == client and s["direction"] == direction
                and s["ok"] and s[key] is not None]
        return median(vals) if vals else None

    up_a, up_c = med("vip-agent", "upload", "mb_per_s"), med("curl", "upload", "mb_per_s")
    dn_a = med("vip-agent", "download", "mb_per_s")
    dn_c = med("curl", "download", "mb_per_s_incl_fsync")
    dn_raw = med("curl", "download", "mb_per_s")
    rss = max((s["peak_rss_mib"] for s in samples if s["client"] == "vip-agent"), default=None)
    mb = f"{args.size_mb:,} MiB"
    out = [
        Measure("upload_1g", up_a / up_c if up_a and up_c else None, 0.8, True,
                f"vip-agent MB/s / curl MB/s, upload of {mb}",
                f"{up_a or 0:.0f} MB/s", f"curl {up_c or 0:.0f} MB/s"),
        Measure("download_1g", dn_a / dn_c if dn_a and dn_c else None, 0.8, True,
                f"vip-agent MB/s (fsync included) / curl MB/s + an fsync after it, download of {mb}",
                f"{dn_a or 0:.0f} MB/s", f"curl {dn_c or 0:.0f} MB/s with fsync ({dn_raw or 0:.0f} raw)"),
        Measure("transfer_peak_rss", rss * MIB / MB / 100 if rss else None, 1.0, False,
                "vip-agent's peak RSS (up or down) / 100 MB",
                f"{rss or 0:.1f} MiB", "goal 100 MB (vip-client 0.1.10: ~1× the file up, ~2× down)"),
    ]
    for m in out:
        m.profile = profile
    return out, {"samples": samples}


# -- 2. many small files: vip-agent's upload stage vs VipSession.upload_inputs ----------------


def small_files(tmp: Path, args: argparse.Namespace, files: int, latency: float,
                goal: float, profile: str = "ideal", name: str = "") -> tuple[Measure, dict[str, Any]]:
    """The upload stage of ``files`` small files, vip-agent vs VipSession on one server.

    Under the production profile VipSession uploads one file at a time, each staged ~2 s: its
    2,000 files would take over an hour. It then uploads the first ``--vipsession-sample``
    files only, and its time is scaled to all of them (linear: one file after the other);
    the report says so.
    """
    name = name or f"small_files_{int(latency * 1000)}ms"
    base = tmp / f"{name}-{profile}"
    data = base / "data"
    data.mkdir(parents=True)
    payload = os.urandom(4096)
    for i in range(files):
        (data / f"f{i:05d}.dat").write_bytes(payload[:4000] + i.to_bytes(4, "big") + payload[4004:])
    # one VIP folder per round: the session name is deterministic (name + fingerprint), and
    # a round uploading into the previous round's files would time VIP's "already exists"
    # answers instead of uploads (VipSession gets a new session name per round too)
    def template(rnd: int) -> Path:
        path = base / f"job-{rnd}.yaml"
        path.write_text(f"pipeline: ConcatFiles/1.0\nvip_root: /vip/Home/bench-{rnd}\n"
                        "inputs:\n  files: '*.dat'\n")
        return path

    production = profile == "production"
    sample = min(files, args.vipsession_sample) if production else files
    vs_data = data
    if sample < files:  # VipSession's share: the first `sample` files (see the docstring)
        vs_data = base / "vs-data"
        vs_data.mkdir()
        for path in sorted(data.iterdir())[:sample]:
            os.link(path, vs_data / path.name)
    faults = f"latency={latency:g}" if latency else ""
    times: dict[str, list[float]] = {"vip-agent": [], "vipsession": []}
    windows: dict[str, list[tuple[float, float]]] = {"vip-agent": [], "vipsession": []}
    rounds = args.prod_small_rounds if production else args.small_rounds
    with LocalServer(base / "server", faults=faults, profile=profile) as server:
        for rnd in range(rounds):
            for client in rotate(list(times), rnd):
                began = time.time()
                if client == "vip-agent":
                    job = {"url": server.url, "key": server.api_key, "dataset": str(data),
                           "state": str(base / f"state-{rnd}"), "output": str(base / "out"),
                           "template": str(template(rnd)), "max_rate": 5.0 if production else None}
                    out, _ = worker("agent-upload-stage", job, timeout=3600)
                else:
                    job = {"url": server.url, "key": server.api_key, "input_dir": str(vs_data),
                           "output_dir": str(base / f"vs-{rnd}"), "session_name": f"bench_{rnd}"}
                    out, _ = worker("vipsession-upload", job, timeout=3600)
                windows[client].append((began, time.time()))
                if out.get("ok"):
                    seconds = float(out["seconds"])
                    times[client].append(seconds * (files / sample if client == "vipsession" else 1))
                say(f"round {rnd} {name} [{profile}] {client}: {out.get('seconds', float('nan')):.2f} s"
                    + (f" for {sample:,} of {files:,} files" if client == "vipsession" and sample < files else ""))
    stats = server.stats()
    polite = [window_stats(stats, a, b) for a, b in windows["vip-agent"]] if stats else []
    shutil.rmtree(base, ignore_errors=True)
    agent = median(times["vip-agent"]) if times["vip-agent"] else None
    anchor = median(times["vipsession"]) if times["vipsession"] else None
    scaled = f" (timed on {sample:,} files, ×{files / sample:.3g}: it sends one file at a time)" if sample < files else ""
    timeouts = sum(w["transfer_wait_timeouts"] for w in polite)
    measure = Measure(
        name, anchor / agent if agent and anchor else None, goal, True,
        f"VipSession.upload_inputs seconds / vip-agent upload stage seconds, {files:,} × 4 KiB, "
        + (f"{latency * 1000:g} ms added per request" if latency else f"the {profile} server"),
        f"{agent or 0:.2f} s" + (f", {timeouts} transfer timeouts" if production else ""),
        f"VipSession {anchor or 0:.2f} s{scaled}", profile=profile,
    )
    return measure, {"files": files, "latency_s": latency, "seconds": times, "vipsession_sample": sample,
                     "agent_windows": polite, "profile": profile}


# -- 3. the slot never idles: watch makespan vs the ideal and a serial run loop ---------------


def _credentials(folder: Path, key: str) -> Path:
    folder.mkdir(mode=0o700, parents=True)
    private_file(folder / "vip-api-key", key)
    return folder


def _watch(config: Path, creds: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115 - inherited by the child, closed with it
    return subprocess.Popen(
        [PYTHON, "-m", "agent", "watch", "--config", str(config)], stdin=subprocess.DEVNULL,
        stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent,
        env=child_env(CREDENTIALS_DIRECTORY=str(creds), **env),
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _watch_paced(config: Path, creds: Path, log: Path, server: str) -> subprocess.Popen[bytes]:
    """`watch` with the request ceiling it keeps with a real VIP (5/s; off for loopback)."""
    handle = open(log, "wb")  # noqa: SIM115 - inherited by the child, closed with it
    code = ("import sys; from agent.pacer import budget_for; "
            f"budget_for({server!r}).configure(max_rate=5.0); "
            f"sys.argv = ['vip-agent', 'watch', '--config', {str(config)!r}]; "
            "from agent.cli import main; raise SystemExit(main())")
    return subprocess.Popen(
        [PYTHON, "-c", code], stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
        cwd=log.parent, env=child_env(CREDENTIALS_DIRECTORY=str(creds)),
    )


def makespan(tmp: Path, args: argparse.Namespace, profile: str = "ideal") -> tuple[list[Measure], dict[str, Any]]:
    from agent.journal import Journal

    production = profile == "production"
    n, duration = args.datasets, 3.0
    job = f"pipeline: Sleep/1.0\ninputs:\n  duration: {duration:g}\n"
    base = tmp / f"makespan-{profile}"
    goal = 1.10 if production else 1.15
    with LocalServer(base / "server", max_running=1, profile=profile) as server:
        creds = _credentials(base / "creds", server.api_key)
        drop, results_dir, state = base / "drop", base / "out", base / "state"
        drop.mkdir(parents=True)
        (drop / "job.yaml").write_text(job)
        config = base / "agent.yaml"
        # keep_remote: the outputs stay on the server, and their mtimes date each execution's end
        config.write_text(
            f"state: {state}\ndrops:\n  - path: {drop}\n    server: {server.url}\n"
            f"    output: {results_dir}\n    max_running: 1\n    keep_remote: true\n"
            "    readiness: {rule: settle, settle_seconds: 0.5}\n"
        )
        staging = base / "staging"
        for i in range(n):
            (staging / f"ds-{i:02d}").mkdir(parents=True)
            (staging / f"ds-{i:02d}" / "x.txt").write_text(f"{i}\n")
        proc = (_watch_paced(config, creds, base / "watch.log", server.url) if production
                else _watch(config, creds, base / "watch.log"))
        began = time.time()
        try:
            time.sleep(2.0)  # start-up, not measured
            for i in range(n):
                os.replace(staging / f"ds-{i:02d}", drop / f"ds-{i:02d}")
            journal = Journal.in_state_dir(state)
            deadline = time.monotonic() + 60 + n * (duration + (60 if production else 10))
            while time.monotonic() < deadline:
                rows = journal.datasets()
                if len(rows) == n and all(d.final for d in rows):
                    break
                time.sleep(0.2)
        finally:
            _stop(proc)
        ended = time.time()
        rows = journal.datasets()
        timeline: list[dict[str, Any]] = []
        for d in rows:
            events = journal.events(d.id)
            up = next((e.time for e in events if e.stage == "upload"), None)
            mirror_end = next((e.time for e in events if e.stage in ("extract", "cleanup")), None)
            mirror_start = next((e.time for e in events if e.stage == "mirror"), None)
            execs = journal.executions(d.id)
            timeline.append({"dataset": d.name, "stage": d.stage, "upload_start": up,
                             "mirror_start": mirror_start, "mirror_end": mirror_end,
                             "vip_id": execs[0].vip_id if execs else None})
        db = sqlite3.connect(server.root / ".localvip" / "state.sqlite3")
        for row in timeline:
            found = db.execute("SELECT start_ms, results_dir FROM executions WHERE id=?",
                               (row["vip_id"],)).fetchone()
            if found is None:
                continue
            row["exec_start"] = found[0] / 1000
            results = server.root / "user_localvip" / found[1].removeprefix("/vip/Home/")
            outputs = list(results.rglob("slept_*.txt")) if results.is_dir() else []
            row["exec_end"] = max((p.stat().st_mtime for p in outputs), default=None)
        db.close()
        journal.close()

        # the anchor: the same datasets one after the other with `vip-agent run`
        serial_s = None
        if not args.no_serial and not production:  # 20 serial runs of ~10 s each under production
            serial_drop = base / "serial"
            serial_drop.mkdir()
            (serial_drop / "job.yaml").write_text(job)
            t0 = time.perf_counter()
            ok = 0
            for i in range(n):
                folder = serial_drop / f"ds-{i:02d}"
                folder.mkdir()
                (folder / "x.txt").write_text(f"serial {i}\n")
                done = subprocess.run(
                    [PYTHON, "-m", "agent", "run", str(folder), "--server", server.url,
                     "--state", str(base / "serial-state"), "--output", str(base / "serial-out"),
                     "--keep-remote"],
                    cwd=base, env=child_env(CREDENTIALS_DIRECTORY=str(creds)),
                    capture_output=True, timeout=600, check=False,
                )
                ok += done.returncode == 0
            serial_s = time.perf_counter() - t0 if ok == n else None
    stats = server.stats()
    polite = window_stats(stats, began, ended) if stats else {}
    good = [r for r in timeline if r.get("exec_start") and r.get("exec_end") and r["upload_start"]
            and r["mirror_end"]]
    good.sort(key=lambda r: r["exec_start"])
    result: dict[str, Any] = {"datasets": n, "pipeline_seconds": duration, "timeline": timeline,
                              "serial_run_loop_s": serial_s, "server": polite, "profile": profile,
                              "stages": sorted({str(d.stage) for d in rows})}
    politeness = _politeness(polite, profile)
    if len(good) != n:
        return [Measure("makespan", None, goal, False, "watch makespan / ideal", profile=profile,
                        agent=f"{len(good)} of {n} datasets done ({', '.join(result['stages'])})"),
                *politeness], result
    t0 = min(r["upload_start"] for r in good)
    t1 = max(r["mirror_end"] for r in good)
    busy = sum(r["exec_end"] - r["exec_start"] for r in good)
    first = min(good, key=lambda r: r["upload_start"])
    last = max(good, key=lambda r: r["mirror_end"])
    ideal = busy + (first["exec_start"] - first["upload_start"]) + (last["mirror_end"] - last["exec_end"])
    gaps = [b["exec_start"] - a["exec_end"] for a, b in zip(good, good[1:], strict=False)]
    result.update(makespan_s=t1 - t0, ideal_s=ideal, busy_s=busy, gaps_s=gaps, t0=t0)
    refusals = polite.get("launch_refusals", 0)
    out = [Measure(
        "makespan", (t1 - t0) / ideal, goal, False,
        f"`watch` makespan of {n} datasets (Sleep {duration:g} s, max_running 1) / ideal "
        "(Σ execution times + the first dataset's time to launch + the last one's mirror)",
        f"{t1 - t0:.1f} s (idle between executions: median {median(gaps):.2f} s, max {max(gaps):.2f} s"
        + (f"; {refusals} engine refusals" if production else "") + ")",
        f"ideal {ideal:.1f} s" + (f"; serial `vip-agent run` loop {serial_s:.1f} s" if serial_s else ""),
        profile=profile,
    ), *politeness]
    if serial_s:
        out.append(Measure("makespan_vs_serial_run", serial_s / (t1 - t0), 1.0, True,
                           "serial `vip-agent run` loop seconds / `watch` makespan",
                           f"{t1 - t0:.1f} s", f"serial loop {serial_s:.1f} s"))
    return out, result


def _politeness(polite: dict[str, Any], profile: str) -> list[Measure]:
    """The agent's manners under the production profile: API requests per second (the
    documented budget: 5/s sustained, bursts of 10) and transfer timeouts of its own making."""
    if profile != "production" or not polite:
        return []
    return [
        Measure("requests_per_s", polite["api_per_s_peak_10s"], 5.0, False,
                "`watch`'s API requests per second (transfers apart), highest over any 10 s, "
                "during the makespan run; budget 5/s (docs/vip-rest.md)",
                f"peak {polite['api_per_s_peak_10s']:.2f}/s over 10 s ({polite['api_per_s_peak_1s']} in "
                f"one second), mean {polite['api_per_s_mean']:.2f}/s",
                "budget 5/s", profile=profile),
        Measure("transfer_timeouts", float(polite["transfer_wait_timeouts"]), 0.0, False,
                "transfers the server timed out for want of a platform slot (20) during the "
                "makespan run", f"{polite['transfer_wait_timeouts']}", "goal 0", profile=profile),
    ]


# -- 4. pickup latency with native events -----------------------------------------------------


def pickup(tmp: Path, args: argparse.Namespace) -> tuple[Measure, dict[str, Any]]:
    import watch_latency as wl

    ns = argparse.Namespace(settle=1.0, datasets=args.pickup_datasets, gap=1.3, idle_seconds=3.0,
                            poll_interval=None)
    with LocalServer(tmp / "pickup-server") as server:
        res = wl.measure("native", server, tmp / "pickup", ns)
    lat = [s["upload_start_after_minus_settle_s"] for s in res["latency"]["samples"]
           if s["upload_start_after_minus_settle_s"] is not None]
    p95 = quantile(lat, 0.95) if len(lat) == ns.datasets else None
    return Measure(
        "pickup_p95", p95, 0.5, False,
        "seconds from the settle time's end (last write + S) to the upload's start, p95, "
        f"native events, {ns.datasets} datasets, S = 1 s",
        f"p95 {p95 if p95 is not None else float('nan'):.2f} s, median {median(lat) if lat else float('nan'):.2f} s",
        "goal 0.5 s",
    ), {"samples": res["latency"]["samples"]}


# -- 5. restart and idle cost with many finished datasets -------------------------------------


def _finished_drop(base: Path, n: int, server: str) -> tuple[Path, Path]:
    """A drop folder of ``n`` one-file datasets the journal knows as done (written in bulk)."""
    from agent import dataset as dataset_mod
    from agent.journal import Journal

    drop, state = base / "drop", base / "state"
    drop.mkdir(parents=True)
    (drop / "job.yaml").write_text("pipeline: FileStats/1.0\ninputs:\n  input_file: data.txt\n")
    Journal.in_state_dir(state).close()  # the schema
    rows: list[list[Any]] = []
    for i in range(n):
        folder = drop / f"ds-{i:05d}"
        folder.mkdir()
        (folder / "data.txt").write_text(f"{i}\n")
        fp = dataset_mod.scan(folder).fingerprint
        rows.append([folder.name, str(folder), str(drop), fp, "done", server, str(base / "out"),
                     "{}"])
    now = time.time() + 1.0  # recorded after the datasets were written, as a real run is
    rows = [[*row, now, now, now] for row in rows]
    db = sqlite3.connect(state / "journal.sqlite3")
    with db:
        db.executemany(
            "INSERT INTO datasets (name, path, drop_dir, fingerprint, stage, server, output_root,"
            " options, created, updated, finished) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.close()
    return drop, state


def restart(tmp: Path, n: int, idle_seconds: float) -> dict[str, Any]:
    """Start `watch` (polling observer) on ``n`` finished datasets: READY time, memory, idle CPU."""
    base = tmp / f"restart-{n}"
    with LocalServer(base / "server") as server:
        drop, state = _finished_drop(base, n, server.url)
        creds = _credentials(base / "creds", server.api_key)
        config = base / "agent.yaml"
        config.write_text(
            f"state: {state}\ndrops:\n  - path: {drop}\n    server: {server.url}\n"
            f"    output: {base / 'out'}\n    observer: polling\n"
        )
        sock_path = base / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(120)
        t0 = time.monotonic()
        proc = _watch(config, creds, base / "watch.log", NOTIFY_SOCKET=str(sock_path))
        result: dict[str, Any] = {"datasets": n}
        try:
            while True:
                message = sock.recv(4096).decode()
                if "READY=1" in message.split("\n"):
                    break
            result["ready_s"] = time.monotonic() - t0
            result["rss_at_ready_mib"] = (proc_status_kib(proc.pid, "VmHWM") or 0) / 1024
            if idle_seconds:
                time.sleep(2.0)
                cpu0, w0 = proc_cpu_seconds(proc.pid), time.monotonic()
                time.sleep(idle_seconds)
                cpu1, w1 = proc_cpu_seconds(proc.pid), time.monotonic()
                result["idle_cpu_percent"] = 100 * (cpu1 - cpu0) / (w1 - w0)
                result["idle_window_s"] = w1 - w0
            result["peak_rss_mib"] = (proc_status_kib(proc.pid, "VmHWM") or 0) / 1024
        finally:
            _stop(proc)
            sock.close()
    say(f"restart with {n:,} finished datasets: {result}")
    shutil.rmtree(base, ignore_errors=True)
    return result


# -- 6. how cost grows -------------------------------------------------------------------------


def upload_stage(tmp: Path, files: int, server: LocalServer) -> dict[str, Any]:
    base = tmp / f"scale-{files}"
    data = base / "data"
    data.mkdir(parents=True)
    for i in range(files):
        (data / f"f{i:05d}.dat").write_text(f"file {i}\n" * 100)
    (base / "job.yaml").write_text("pipeline: ConcatFiles/1.0\ninputs:\n  files: '*.dat'\n")
    job = {"url": server.url, "key": server.api_key, "dataset": str(data),
           "state": str(base / "state"), "output": str(base / "out"),
           "template": str(base / "job.yaml")}
    out, m = worker("agent-upload-stage", job, timeout=1800)
    shutil.rmtree(base, ignore_errors=True)
    return {"files": files, "seconds": out.get("seconds"), "peak_rss_mib": m.peak_rss_mib,
            "ok": bool(out.get("ok"))}


def scaling(tmp: Path, args: argparse.Namespace) -> tuple[list[Measure], dict[str, Any]]:
    sizes = args.scale_files
    with LocalServer(tmp / "scale-server") as server:
        files = [upload_stage(tmp, n, server) for n in sizes]
    for row in files:
        say(f"upload stage, {row['files']:,} files: {row['seconds']} s, {row['peak_rss_mib']:.1f} MiB")
    starts = [restart(tmp, n, 0) for n in args.scale_datasets]

    def growth(rows: list[dict[str, Any]], key: str, n_key: str) -> float | None:
        a, b = rows[0], rows[-1]
        if not a.get(key) or not b.get(key):
            return None
        return (b[key] / b[n_key]) / (a[key] / a[n_key])

    out = [
        Measure("scale_files_time", growth(files, "seconds", "files"), 1.5, False,
                f"upload stage seconds per file at {sizes[-1]:,} files / at {sizes[0]:,} files "
                "(1.0 = linear)",
                ", ".join(f"{r['files']:,}: {r['seconds'] or 0:.1f} s" for r in files), "linear"),
        Measure("scale_files_memory", files[-1]["peak_rss_mib"] * MIB / MB / 100, 1.0, False,
                f"peak RSS of the upload stage of {sizes[-1]:,} files / 100 MB",
                ", ".join(f"{r['files']:,}: {r['peak_rss_mib']:.0f} MiB" for r in files), "100 MB"),
        Measure("scale_restart_time", growth(starts, "ready_s", "datasets"), 1.5, False,
                f"READY seconds per finished dataset at {args.scale_datasets[-1]:,} / at "
                f"{args.scale_datasets[0]:,} (1.0 = linear; fixed start-up cost counts against "
                "the small one)",
                ", ".join(f"{r['datasets']:,}: {r.get('ready_s', 0):.2f} s" for r in starts), "linear"),
    ]
    return out, {"upload_stage": files, "restart": starts}


# -- report ------------------------------------------------------------------------------------


def plots(run_dir: Path, data: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    made = []
    tr = data.get("transfers", {}).get("samples")
    if tr:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels, values = [], []
        for client in ("vip-agent", "curl"):
            for direction, key in (("upload", "mb_per_s"), ("download", "mb_per_s_incl_fsync")):
                vals = [s[key] for s in tr if s["client"] == client and s["direction"] == direction
                        and s["ok"] and s[key]]
                labels.append(f"{client}\n{direction}")
                values.append(median(vals) if vals else 0)
        ax.bar(labels, values, color=["#2a7", "#2a7", "#888", "#888"])
        ax.set_ylabel("MB/s (downloads include fsync)")
        ax.set_title("1 GiB transfers, median of interleaved rounds")
        fig.tight_layout()
        fig.savefig(run_dir / "throughput.png", dpi=110)
        plt.close(fig)
        made.append("throughput.png")
    ms = data.get("makespan", {})
    if ms.get("timeline") and ms.get("t0"):
        rows = sorted((r for r in ms["timeline"] if r.get("exec_start") and r.get("exec_end")),
                      key=lambda r: r["exec_start"])
        t0 = ms["t0"]
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for i, r in enumerate(rows):
            if r.get("upload_start") and r.get("exec_start"):
                ax.barh(i, r["exec_start"] - r["upload_start"], left=r["upload_start"] - t0,
                        color="#9cd", height=0.7)
            ax.barh(i, r["exec_end"] - r["exec_start"], left=r["exec_start"] - t0, color="#2a7",
                    height=0.7)
            if r.get("mirror_start") and r.get("mirror_end"):
                ax.barh(i, r["mirror_end"] - r["exec_end"], left=r["exec_end"] - t0,
                        color="#fb5", height=0.7)
        for a, b in zip(rows, rows[1:], strict=False):
            ax.axvspan(a["exec_end"] - t0, b["exec_start"] - t0, color="#e44", alpha=0.25, lw=0)
        ax.set_xlabel("seconds (green: the execution slot busy; red: slot idle; blue: before "
                      "launch; orange: mirror)", fontsize=8)
        ax.set_ylabel("dataset")
        ax.set_title(f"watch, {len(rows)} datasets, max_running 1: makespan {ms['makespan_s']:.1f} s, "
                     f"ideal {ms['ideal_s']:.1f} s", fontsize=9)
        fig.tight_layout()
        fig.savefig(run_dir / "makespan.png", dpi=110)
        plt.close(fig)
        made.append("makespan.png")
    sc = data.get("scaling", {}).get("upload_stage")
    if sc:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["files"] for r in sc], [r["seconds"] or 0 for r in sc], "o-", label="seconds")
        ax2 = ax.twinx()
        ax2.plot([r["files"] for r in sc], [r["peak_rss_mib"] for r in sc], "s--", color="#c60",
                 label="peak RSS MiB")
        ax.set_xlabel("files in the dataset")
        ax.set_ylabel("upload stage, s")
        ax2.set_ylabel("peak RSS, MiB")
        fig.tight_layout()
        fig.savefig(run_dir / "scaling.png", dpi=110)
        plt.close(fig)
        made.append("scaling.png")
    return made


def report(run_dir: Path, info: dict[str, Any], measures: list[Measure], images: list[str],
           started: float, load_during: list[float]) -> str:
    lines = [
        f"# vip-agent benchmark, {info['date']}",
        "",
        f"{info['cpus']} cores ({info['cpu_model']}), {info['mem_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['versions'].get('python')}; load average at start "
        f"{info['loadavg_1_5_15'][0]}, during the run {min(load_during):.1f}–{max(load_during):.1f} "
        f"(other work shares the machine); {time.time() - started:.0f} s in all.",
        "",
    ]
    lines += side_by_side(measures)
    lines += ["", "What each ratio is:", ""]
    seen: set[str] = set()
    for m in measures:
        if m.name not in seen:
            seen.add(m.name)
            lines.append(f"* `{m.name}`: {m.what}")
    lines += [""] + [f"![{name}]({name})" for name in images]
    text = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(text)
    return text


def side_by_side(measures: list[Measure]) -> list[str]:
    """The result table: one row per measure, the ideal server and the production profile
    in two columns (a measure run on one profile only leaves the other empty)."""
    names: list[str] = []
    by: dict[tuple[str, str], Measure] = {}
    for m in measures:
        if m.name not in names:
            names.append(m.name)
        by[(m.name, m.profile)] = m

    def cell(m: Measure | None) -> list[str]:
        if m is None:
            return ["", "", ""]
        op = "≥" if m.higher_is_better else "≤"
        ratio = "n/a" if m.ratio is None else f"{m.ratio:.2f}"
        return [m.agent, m.anchor, f"{ratio} ({op} {m.goal:g}) {'ok' if m.ok else '**SHORT**'}"]

    out = ["| measure | ideal server: vip-agent | anchor | ratio (goal) | production profile: vip-agent "
           "| anchor | ratio (goal) |", "|---|---|---|---|---|---|---|"]
    for name in names:
        out.append("| " + " | ".join([name, *cell(by.get((name, "ideal"))),
                                       *cell(by.get((name, "production")))]) + " |")
    return out


STEPS = ("transfers", "small_files", "makespan", "pickup", "restart", "scaling", "chaos")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and one round each (minutes, for a check)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the transfers (default 5)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--chaos", action="store_true",
                        help="also run benchmarks/chaos.py (kills and faults), when present")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial `run` loop anchor")
    parser.add_argument("--profiles", default="ideal,production",
                        help="server profiles for the transfer, small-file and makespan measures "
                        "(default both, side by side; docs/localvip.md)")
    parser.add_argument("--vipsession-sample", type=int, default=40, metavar="N",
                        help="under the production profile VipSession uploads only the first N "
                        "files (2 s each, one at a time), its time scaled to all (default 40)")
    args = parser.parse_args()
    args.profiles = [p for p in args.profiles.split(",") if p]
    if set(args.profiles) - {"ideal", "production"}:
        parser.error("--profiles: ideal, production")
    args.prod_small_rounds = 1
    args.size_mb = 256 if args.quick else 1024
    args.rounds = 1 if args.quick else args.rounds
    args.small_rounds = 1 if args.quick else 2
    args.datasets = 6 if args.quick else 20
    args.pickup_datasets = 5 if args.quick else 20
    args.idle_seconds = 10.0 if args.quick else 60.0
    args.finished = 2000 if args.quick else 10000
    args.scale_files = [500, 2000] if args.quick else [1000, 5000, 20000]
    args.scale_datasets = [200, 1000] if args.quick else [1000, 10000]
    steps = [s for s in args.only.split(",") if s] or [s for s in STEPS if s != "chaos"]
    if args.chaos and "chaos" not in steps:
        steps.append("chaos")
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown measures: {', '.join(sorted(unknown))}")

    started = time.time()
    info = machine()
    run_dir = RESULTS / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    measures: list[Measure] = []
    data: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items()}}
    load: list[float] = [os.getloadavg()[0]]

    def step(name: str, fn: Callable[[], tuple[list[Measure] | Measure, dict[str, Any]]]) -> None:
        say(f"== {name}")
        try:
            got, detail = fn()
        except Exception as err:  # one broken measure must not lose the others
            say(f"{name} failed: {type(err).__name__}: {err}")
            data[name] = {"error": repr(err)}
            return
        load.append(os.getloadavg()[0])
        for m in got if isinstance(got, list) else [got]:
            measures.append(m)
            print(m.line(), flush=True)
        data[name] = detail

    with workdir("all") as tmp:
        for profile in args.profiles:
            suffix = "" if profile == "ideal" else f"_{profile}"
            if "transfers" in steps:
                step(f"transfers{suffix}", partial(transfers, tmp, args, profile))
            if "small_files" in steps:
                few, many = (100, 500) if args.quick else (300, 2000)
                goal = 5.0 if profile == "production" else 1.5
                step(f"small_files_300{suffix}",
                     partial(small_files, tmp, args, few, 0.0, goal, profile, name="small_files_300"))
                step(f"small_files_2000{suffix}",
                     partial(small_files, tmp, args, many, 0.0, goal, profile, name="small_files_2000"))
                if profile == "ideal":
                    step("small_files_50ms", partial(small_files, tmp, args, 200 if args.quick else 500, 0.05, 4.0))
            if "makespan" in steps:
                step(f"makespan{suffix}", partial(makespan, tmp, args, profile))
        if "pickup" in steps:
            step("pickup", lambda: pickup(tmp, args))
        if "restart" in steps:
            def restart_step() -> tuple[list[Measure], dict[str, Any]]:
                r = restart(tmp, args.finished, args.idle_seconds)
                n = f"{args.finished:,}"
                return [
                    Measure("restart_ready", r.get("ready_s"), 3.0, False,
                            f"seconds from start to READY=1 (sent after the catch-up scan), {n} "
                            "finished datasets", f"{r.get('ready_s', 0):.2f} s", "goal 3 s"),
                    Measure("restart_memory", (r.get("peak_rss_mib") or 0) * MIB / MB / 150, 1.0,
                            False, f"peak RSS of `watch` with {n} finished datasets / 150 MB",
                            f"{r.get('peak_rss_mib', 0):.0f} MiB", "goal 150 MB"),
                    Measure("idle_cpu_polling", r.get("idle_cpu_percent"), 0.5, False,
                            f"% of one core used by an idle `watch` (polling observer, {n} "
                            f"finished dataset folders) over {args.idle_seconds:g} s",
                            f"{r.get('idle_cpu_percent', 0):.2f} %", "goal 0.5 %"),
                ], r
            step("restart", restart_step)
        if "scaling" in steps:
            step("scaling", lambda: scaling(tmp, args))
    if "chaos" in steps:
        chaos = Path(__file__).with_name("chaos.py")
        if chaos.is_file():
            say("== chaos")
            # its own report goes to the run folder, never over the tracked results/chaos*.json
            with open(run_dir / "chaos.txt", "w") as log_file:
                done = subprocess.run([PYTHON, str(chaos), "--no-save"], cwd=REPO, check=False,
                                      stdout=log_file, stderr=subprocess.STDOUT)
            data["chaos"] = {"exit_code": done.returncode, "log": "chaos.txt"}
            say(f"chaos: exit {done.returncode} (0: nothing lost, launched twice or left over); "
                "see chaos.txt")
        else:
            say("benchmarks/chaos.py is not there yet: skipped")
    images = plots(run_dir, data)
    (run_dir / "results.json").write_text(json.dumps(
        {**data, "measures": [m.__dict__ | {"ok": m.ok} for m in measures]}, indent=2, default=str))
    text = report(run_dir, info, measures, images, started, load)
    say(text)
    say(f"report: {run_dir.relative_to(REPO)}/report.md")
    return 0 if all(m.ok for m in measures) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
