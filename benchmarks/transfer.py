"""Upload and download of one large file: vip-agent's VipClient vs the official
vip-client vs curl, side by side against one local VIP server.

    .venv/bin/python benchmarks/transfer.py [--size-mb 1024] [--repeat 3]

Each transfer runs in its own client process, reaped with ``wait4`` for its exact
peak RSS and CPU time; the server runs in another process. Clients take turns in
every round (order rotated), page cache flushed with ``sync`` before each
transfer, and every copy is compared byte for byte afterwards (not timed).
Writes ``benchmarks/results/transfer.json``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    MB,
    MIB,
    PYTHON,
    REPO,
    LocalServer,
    Measured,
    machine,
    make_file,
    median,
    private_file,
    run_measured,
    say,
    workdir,
    write_result,
)

WORKERS = str(Path(__file__).with_name("_workers.py"))
CLIENTS = ("vip-agent", "vip-client", "curl")
REMOTE_DIR = "/vip/Home/bench"


def python_transfer(mode: str, job: dict[str, Any], timeout: float) -> tuple[Measured, float | None, str]:
    import json

    m = run_measured([PYTHON, WORKERS, mode], stdin_text=json.dumps(job), cwd=REPO, timeout=timeout)
    out = m.json_out()
    ok = m.returncode == 0 and bool(out.get("ok"))
    error = "" if ok else (m.stderr.strip().splitlines() or [f"exit {m.returncode}"])[-1]
    return m, (float(out["seconds"]) if ok else None), error


def fsync_time(path: Path) -> float:
    """Seconds to fsync a file just written (what an atomic download pays)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def curl_transfer(
    direction: str, url: str, header_file: Path, local: Path, timeout: float
) -> tuple[Measured, float | None, str]:
    curl = shutil.which("curl")
    assert curl is not None
    common = [curl, "-sS", "--fail", "-H", f"@{header_file}", "-w", "%{time_total} %{http_code}"]
    if direction == "upload":
        argv = [*common, "-H", "Content-Type: application/octet-stream", "-T", str(local),
                "-o", os.devnull, url]
    else:
        argv = [*common, "-o", str(local), f"{url}?action=content"]
    m = run_measured(argv, timeout=timeout)
    fields = m.stdout.split()
    ok = m.returncode == 0 and len(fields) == 2 and fields[1] in ("200", "201", "204")
    error = "" if ok else f"exit {m.returncode}: {m.stderr.strip()[-300:]} {m.stdout.strip()[-100:]}"
    return m, (float(fields[0]) if ok else None), error


def one_transfer(
    client: str, direction: str, rnd: int, server: LocalServer, header: Path, source: Path,
    copy: Path, remote: str, timeout: float,
) -> dict[str, Any]:
    """One measured upload or download; ``copy`` is where the bytes must land."""
    size = source.stat().st_size
    local = source if direction == "upload" else copy
    os.sync()  # earlier transfers' dirty pages must not be flushed on this one's clock
    if client == "curl":
        m, seconds, error = curl_transfer(
            direction, f"{server.url}/rest/path{remote}", header, local, timeout)
    else:
        job = {"url": server.url, "key": server.api_key, "remote": remote, "local": str(local),
               "size": size}
        mode = ("vipclient-" if client == "vip-agent" else "official-") + direction
        m, seconds, error = python_transfer(mode, job, timeout)
    fsync_s = None
    if seconds is not None and direction == "download" and client != "vip-agent":
        # VipClient fsyncs before its clock stops; time the same for the others
        fsync_s = fsync_time(copy)
    if seconds is not None and not (copy.is_file() and filecmp.cmp(source, copy, shallow=False)):
        error, seconds = f"{copy.name} differs from the source", None
    rate = size / MB / seconds if seconds else None
    with_fsync = size / MB / (seconds + fsync_s) if seconds and fsync_s is not None else rate
    shown = f"{rate:7.1f} MB/s" if rate else f"FAILED ({error})"
    if fsync_s is not None:
        shown += f" ({with_fsync:.1f} with fsync)"
    say(f"round {rnd} {client:>10} {direction:>8}: {shown}, peak RSS {m.peak_rss_mib:7.1f} MiB")
    return {
        "client": client, "direction": direction, "round": rnd, "ok": seconds is not None,
        "error": error, "seconds": seconds, "mb_per_s": rate, "fsync_after_s": fsync_s,
        "mb_per_s_incl_fsync": with_fsync, "process_wall_s": m.wall_s,
        "peak_rss_mib": m.peak_rss_mib, "ru_maxrss_mib": m.ru_maxrss_mib,
        "cpu_user_s": m.cpu_user_s, "cpu_sys_s": m.cpu_sys_s,
        "stderr_tail": "" if seconds is not None else m.stderr[-2000:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per client (default 3)")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help=f"comma-separated subset of {','.join(CLIENTS)}")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per transfer")
    parser.add_argument("--result", default="transfer", help="results/<name>.json")
    args = parser.parse_args()
    info = machine()  # before the work: its load average is the background load
    clients = [c for c in args.clients.split(",") if c]
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    if not shutil.which("curl") and "curl" in clients:
        say("curl is not installed: skipping it")
        clients.remove("curl")
    size = args.size_mb * MIB
    samples: list[dict[str, Any]] = []
    with workdir("transfer") as tmp:
        say(f"writing a {args.size_mb} MiB test file...")
        source = make_file(tmp / "big.bin", size)
        with LocalServer(tmp / "server", max_download=size + 1) as server:
            from agent.vip.client import VipClient

            header = private_file(tmp / "curl-headers", f"apikey: {server.api_key}\n")
            home = server.root / "user_localvip"
            with VipClient(server.url, server.api_key) as setup:
                setup.makedirs(REMOTE_DIR)
                for rnd in range(args.repeat):
                    order = clients[rnd % len(clients):] + clients[:rnd % len(clients)]
                    for client in order:
                        name = f"{client}-{rnd}.bin"
                        remote = f"{REMOTE_DIR}/{name}"
                        local = tmp / f"down-{name}"
                        stored = home / "bench" / name
                        for direction in ("upload", "download"):
                            sample = one_transfer(client, direction, rnd, server, header, source,
                                                  stored if direction == "upload" else local,
                                                  remote, args.timeout)
                            samples.append(sample)
                            if not sample["ok"] and direction == "upload":
                                break  # nothing to download
                        local.unlink(missing_ok=True)
                        setup.delete(remote, missing_ok=True)
                        setup.wait_deleted(remote, timeout=60, interval=0.1)
    summary = summarise(samples, clients)
    result = {
        "benchmark": "transfer", "machine": info, "size_bytes": size, "repeat": args.repeat,
        "units": {"mb_per_s": "10^6 bytes per second of transfer time", "peak_rss_mib": "MiB"},
        "notes": [
            "seconds: the transfer call only (python clients: inside the process, after imports "
            "and key check; curl: its time_total). process_wall_s: spawn to exit.",
            "VipClient's download fsyncs the file before renaming it (inside 'seconds'); curl and "
            "vip-client do not: for them fsync_after_s is timed right after, and "
            "mb_per_s_incl_fsync counts it.",
            "peak_rss_mib: highest VmHWM of the client process sampled from /proc every 2 ms. "
            "ru_maxrss_mib (wait4) is only an upper bound: Linux seeds it at exec with the "
            "spawning benchmark process's RSS.",
        ],
        "summary": summary, "ratios": ratios(summary), "samples": samples,
    }
    path = write_result(args.result, result)
    print_table(summary, result["ratios"])
    say(f"results: {path.relative_to(REPO)}")
    return 0 if all(s["ok"] for s in samples if s["client"] != "vip-client") else 1


def summarise(samples: list[dict[str, Any]], clients: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for client in clients:
        out[client] = {}
        for direction in ("upload", "download"):
            rows = [s for s in samples if s["client"] == client and s["direction"] == direction]
            good = [s for s in rows if s["ok"]]
            out[client][direction] = {
                "runs": len(rows), "ok": len(good),
                "median_mb_per_s": median([s["mb_per_s"] for s in good]) if good else None,
                "median_mb_per_s_incl_fsync": (median([s["mb_per_s_incl_fsync"] for s in good])
                                               if good else None),
                "median_seconds": median([s["seconds"] for s in good]) if good else None,
                "peak_rss_mib": max((s["peak_rss_mib"] for s in rows), default=None),
                "median_cpu_s": median([s["cpu_user_s"] + s["cpu_sys_s"] for s in good]) if good else None,
                "errors": sorted({s["error"] for s in rows if not s["ok"]}),
            }
    return out


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    """vip-agent relative to each other client: speed (>1 = faster) and memory (<1 = smaller)."""
    out: dict[str, Any] = {}
    agent = summary.get("vip-agent")
    if not agent:
        return out
    for other in ("curl", "vip-client"):
        if other not in summary:
            continue
        for direction in ("upload", "download"):
            a, b = agent[direction], summary[other][direction]
            out.setdefault(f"vip-agent/{other}", {})[direction] = {
                "speed": _ratio(a["median_mb_per_s"], b["median_mb_per_s"]),
                "speed_incl_fsync": _ratio(a["median_mb_per_s_incl_fsync"],
                                           b["median_mb_per_s_incl_fsync"]),
                "peak_rss": _ratio(a["peak_rss_mib"], b["peak_rss_mib"]),
            }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_table(summary: dict[str, Any], ratio: dict[str, Any]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value else "-"

    print(f"{'client':<11}{'direction':<10}{'MB/s':>9}{'+fsync':>9}{'seconds':>9}"
          f"{'peak RSS MiB':>14}{'CPU s':>8}")
    for client, per in summary.items():
        for direction, s in per.items():
            print(f"{client:<11}{direction:<10}{fmt(s['median_mb_per_s'], '.1f'):>9}"
                  f"{fmt(s['median_mb_per_s_incl_fsync'], '.1f'):>9}{fmt(s['median_seconds'], '.2f'):>9}"
                  f"{fmt(s['peak_rss_mib'], '.1f'):>14}{fmt(s['median_cpu_s'], '.2f'):>8}")
    for name, per in ratio.items():
        for direction, r in per.items():
            print(f"{name} {direction}: speed x{fmt(r['speed'], '.2f')} "
                  f"(with fsync x{fmt(r['speed_incl_fsync'], '.2f')}), "
                  f"peak RSS x{fmt(r['peak_rss'], '.3f')}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
