"""Why two harnesses disagree on vip-agent's download speed against curl.

    .venv/bin/python benchmarks/download_check.py [--sizes 256,512,1024] [--rounds 2]

``python -m benchmarks`` (run_all.transfers) reported the agent's download at 2.45x curl
(1 GiB, the server's storage in /dev/shm, the agent's seconds timed inside its process, curl's
``time_total`` plus an fsync timed after it). An independent harness (server storage on disk,
256-512 MiB, curl's fsync timed right after it) measured 0.51-0.66x. This script times the
same downloads every way at once, so the factor that makes the difference shows:

* the server's storage on disk or in memory (``--storage disk,disk-cold,shm``; ``disk-cold``
  evicts the server's copy from the page cache before each download, so the server reads
  it from the disk the client writes to; ``disk-dirty`` writes the server's copy again right
  before each download and does not sync it, as when a harness downloads a file it has just
  uploaded);
* the size;
* the agent timed inside its process (``VipClient.download`` only: what run_all reports) or
  as a whole process (``python -c`` start, imports, key check, download: what a harness that
  runs a command sees), curl by its own ``time_total`` or as a whole process; the fsync after
  curl included in both.

Writes ``benchmarks/results/download_check.json`` and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
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
    machine,
    make_file,
    median,
    private_file,
    run_measured,
    say,
    workdir,
    write_result,
)
from transfer import curl_transfer, fsync_time

WORKERS = str(Path(__file__).with_name("_workers.py"))


def agent_download(server: LocalServer, remote: str, local: Path, size: int) -> dict[str, Any]:
    job = {"url": server.url, "key": server.api_key, "remote": remote, "local": str(local), "size": size}
    m = run_measured([PYTHON, WORKERS, "vipclient-download"], stdin_text=json.dumps(job), cwd=REPO,
                     timeout=600)
    out = m.json_out()
    ok = m.returncode == 0 and bool(out.get("ok"))
    return {"ok": ok, "inside_s": float(out["seconds"]) if ok else None, "process_s": m.wall_s}


def curl_download(server: LocalServer, header: Path, remote: str, local: Path) -> dict[str, Any]:
    m, seconds, error = curl_transfer("download", f"{server.url}/rest/path{remote}", header, local, 600)
    fsync_s = fsync_time(local) if seconds is not None else None
    return {"ok": seconds is not None, "inside_s": seconds, "process_s": m.wall_s, "fsync_s": fsync_s,
            "error": error}


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (clean pages: after a sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def case(tmp: Path, storage: str, size_mib: int, rounds: int) -> dict[str, Any]:
    size = size_mib * MIB
    parent = Path("/dev/shm") if storage == "shm" else None  # noqa: S108 - a private mkdtemp folder
    cold = storage == "disk-cold"
    with workdir(f"dlcheck-{storage}", parent) as where, \
            LocalServer(where / "server", max_download=size + 1) as server:
        header = private_file(tmp / f"h-{storage}-{size_mib}", f"apikey: {server.api_key}\n")
        stored = where / "server" / "user_localvip" / "bench" / "big.bin"
        make_file(stored, size)  # the server's copy, written where its storage is
        remote = "/vip/Home/bench/big.bin"
        rows: list[dict[str, Any]] = []
        for rnd in range(rounds + 1):  # round 0: untimed warm-up of both
            for client in (("agent", "curl") if rnd % 2 else ("curl", "agent")):
                local = tmp / f"down-{client}.bin"
                os.sync()  # earlier writes must not be flushed on this download's clock
                if cold:
                    evict(stored)
                if storage == "disk-dirty":
                    stored.unlink()
                    make_file(stored, size)
                got = (agent_download(server, remote, local, size) if client == "agent"
                       else curl_download(server, header, remote, local))
                local.unlink(missing_ok=True)
                if rnd:
                    rows.append({"client": client, "round": rnd, **got})

    def med(client: str, key: str) -> float | None:
        vals = [r[key] for r in rows if r["client"] == client and r["ok"] and r.get(key) is not None]
        return median(vals) if vals else None

    agent_in, agent_proc = med("agent", "inside_s"), med("agent", "process_s")
    curl_in, curl_proc, fsync = med("curl", "inside_s"), med("curl", "process_s"), med("curl", "fsync_s")
    mb = size / MB

    def rate(seconds: float | None) -> float | None:
        return mb / seconds if seconds else None

    curl_fsync = rate(curl_in + fsync) if curl_in and fsync else None
    curl_proc_fsync = rate(curl_proc + fsync) if curl_proc and fsync else None
    ratio_inside = (rate(agent_in) or 0) / (curl_fsync or float("inf"))
    ratio_proc = (rate(agent_proc) or 0) / (curl_proc_fsync or float("inf"))
    result: dict[str, Any] = {
        "storage": storage, "size_mib": size_mib, "samples": rows,
        "agent_mb_s_inside": rate(agent_in), "agent_mb_s_process": rate(agent_proc),
        "curl_mb_s_raw": rate(curl_in), "curl_mb_s_with_fsync": curl_fsync,
        "curl_mb_s_process_with_fsync": curl_proc_fsync, "curl_fsync_s": fsync,
        "ratio_inside": ratio_inside, "ratio_process": ratio_proc,
    }
    say(f"{storage:>9} {size_mib:5d} MiB: agent {result['agent_mb_s_inside'] or 0:6.0f} MB/s inside, "
        f"{result['agent_mb_s_process'] or 0:6.0f} as a process | curl {result['curl_mb_s_raw'] or 0:6.0f} raw, "
        f"{result['curl_mb_s_with_fsync'] or 0:6.0f} + fsync ({fsync or 0:.2f} s), "
        f"{result['curl_mb_s_process_with_fsync'] or 0:6.0f} as a process + fsync | "
        f"ratio inside {ratio_inside:.2f}, as processes {ratio_proc:.2f}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512,1024", help="MiB, comma-separated")
    parser.add_argument("--storage", default="disk,disk-cold,disk-dirty,shm",
                        help="where the server keeps files: disk, disk-cold, disk-dirty, shm")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per case (default 2)")
    args = parser.parse_args()
    if not shutil.which("curl"):
        say("curl is not installed")
        return 1
    info = machine()
    cases = []
    t0 = time.time()
    with workdir("dlcheck") as tmp:
        for storage in [s for s in args.storage.split(",") if s]:
            for size in [int(s) for s in args.sizes.split(",") if s]:
                cases.append(case(tmp, storage, size, args.rounds))
    path = write_result("download_check", {"benchmark": "download_check", "machine": info,
                                           "seconds": time.time() - t0, "cases": cases})
    say(f"results: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
