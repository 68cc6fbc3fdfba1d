"""Peak memory of one whole dataset cycle on a 1 GiB input: ``vip-agent run`` vs
the official ``VipSession``, side by side against one local VIP server.

    .venv/bin/python benchmarks/run_memory.py [--size-mb 1024] [--repeat 2]

Both do the same work: upload the file, launch ``FileStats/1.0`` on it, monitor
it, download and extract the result tarball, clean the server. Each runs in its
own process, its peak RSS (VmHWM) sampled from /proc; the server (and the
pipeline it runs) live in other processes. The issue's target: vip-agent under
100 MB peak. Writes ``benchmarks/results/run_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from _common import (
    MIB,
    PYTHON,
    REPO,
    LocalServer,
    Measured,
    child_env,
    machine,
    make_file,
    private_file,
    run_measured,
    say,
    workdir,
    write_result,
)

WORKERS = str(Path(__file__).with_name("_workers.py"))
TARGET_MB = 100
POLL_S = 0.5  # both clients poll the execution at this interval


def report_sizes(folder: Path) -> list[int]:
    """``size`` of every FileStats report.json under ``folder``."""
    return [int(json.loads(p.read_text())["size"]) for p in sorted(folder.rglob("report.json"))]


def agent_cycle(server: LocalServer, tmp: Path, dataset: Path, rnd: int, timeout: float) -> dict[str, Any]:
    state, out = tmp / f"agent-state-{rnd}", tmp / f"agent-out-{rnd}"
    creds = tmp / f"creds-{rnd}"
    creds.mkdir(mode=0o700)
    private_file(creds / "vip-api-key", server.api_key)
    # the key reaches vip-agent the way systemd's LoadCredential= hands it over
    env = child_env(CREDENTIALS_DIRECTORY=str(creds))
    m = run_measured(
        [PYTHON, "-m", "agent", "run", str(dataset), "--server", server.url, "--output", str(out),
         "--state", str(state), "--poll", str(POLL_S)],
        cwd=tmp, env=env, timeout=timeout,
    )
    return row("vip-agent run", rnd, m, report_sizes(out), agent_stages(state))


def agent_stages(state: Path) -> dict[str, float]:
    """Seconds spent in each stage, from the journal's stage-change events."""
    from agent.journal import Journal

    if not (state / "journal.sqlite3").exists():
        return {}
    journal = Journal.in_state_dir(state)
    try:
        changes: list[tuple[str, float]] = []
        for ds in journal.datasets():
            for ev in journal.events(ds.id):
                if ev.stage and (not changes or changes[-1][0] != ev.stage):
                    changes.append((ev.stage, float(ev.time)))
    finally:
        journal.close()
    out: dict[str, float] = {}
    for (stage, start), (_next, end) in zip(changes, changes[1:], strict=False):
        out[stage] = out.get(stage, 0.0) + end - start
    return out


def vipsession_cycle(server: LocalServer, tmp: Path, source: Path, rnd: int, timeout: float) -> dict[str, Any]:
    inputs, out = tmp / f"vs-input-{rnd}", tmp / f"vs-out-{rnd}"
    inputs.mkdir()
    os.link(source, inputs / source.name)  # same bytes, no copy: the folder holds only the input
    job = {
        "url": server.url, "key": server.api_key, "session_name": f"bench_vs_{rnd}",
        "input_dir": str(inputs), "output_dir": str(out), "pipeline": "FileStats/1.0",
        "input_settings": {"input_file": str(inputs / source.name)}, "refresh": POLL_S,
        "finish_timeout": 120,
    }
    m = run_measured([PYTHON, WORKERS, "vipsession-cycle"], stdin_text=json.dumps(job),
                     cwd=tmp, timeout=timeout)
    result = m.json_out()
    return row("vip-client VipSession", rnd, m, report_sizes(out), result.get("stages", {}))


def row(client: str, rnd: int, m: Measured, sizes: list[int], stages: dict[str, float]) -> dict[str, Any]:
    ok = m.returncode == 0 and len(sizes) == 1
    lines = m.stderr.strip().splitlines()
    return {
        "client": client, "round": rnd, "ok": ok, "report_sizes": sizes,
        "error": "" if ok else (lines[-1] if lines else f"exit {m.returncode}"),
        "wall_s": m.wall_s, "peak_rss_mib": m.peak_rss_mib, "peak_rss_mb": m.peak_rss_mib * MIB / 1e6,
        "ru_maxrss_mib": m.ru_maxrss_mib, "cpu_user_s": m.cpu_user_s, "cpu_sys_s": m.cpu_sys_s,
        "stages_s": stages, "stderr_tail": "" if ok else m.stderr[-3000:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="input size in MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="cycles per client, order alternating (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per cycle")
    parser.add_argument("--result", default="run_memory", help="results/<name>.json")
    args = parser.parse_args()
    size = args.size_mb * MIB
    info = machine()  # before the work: its load average is the background load
    rows: list[dict[str, Any]] = []
    with workdir("run") as tmp:
        dataset = tmp / "drop" / "bigset"
        say(f"writing a {args.size_mb} MiB input...")
        source = make_file(dataset / "big.bin", size)
        (dataset / "job.yaml").write_text(
            "pipeline: FileStats/1.0\ninputs:\n  input_file: big.bin\n"
        )
        with LocalServer(tmp / "server", max_download=15_000_000, max_running=4) as server:
            for rnd in range(args.repeat):
                cycles = [lambda r=rnd: agent_cycle(server, tmp, dataset, r, args.timeout),
                          lambda r=rnd: vipsession_cycle(server, tmp, source, r, args.timeout)]
                if rnd % 2:
                    cycles.reverse()
                for cycle in cycles:
                    os.sync()
                    r = cycle()
                    rows.append(r)
                    state = "ok" if r["ok"] else f"FAILED ({r['error']})"
                    say(f"round {rnd} {r['client']:<22} {state}: peak RSS {r['peak_rss_mib']:.1f} MiB, "
                        f"wall {r['wall_s']:.1f} s")
                    if r["ok"] and r["report_sizes"] != [size]:
                        r["ok"], r["error"] = False, f"report says {r['report_sizes']} bytes, not {size}"
    summary: dict[str, Any] = {}
    for client in ("vip-agent run", "vip-client VipSession"):
        mine = [r for r in rows if r["client"] == client]
        summary[client] = {
            "runs": len(mine), "ok": sum(r["ok"] for r in mine),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "wall_s": [round(r["wall_s"], 2) for r in mine],
        }
    agent, official = summary["vip-agent run"], summary["vip-client VipSession"]
    result = {
        "benchmark": "run_memory", "machine": info, "input_bytes": size, "poll_s": POLL_S,
        "target": f"vip-agent peak RSS under {TARGET_MB} MB",
        "target_met": agent["peak_rss_mb"] < TARGET_MB and agent["ok"] == agent["runs"],
        "ratio_peak_rss_agent_over_vipsession": agent["peak_rss_mib"] / official["peak_rss_mib"],
        "notes": ["peak_rss: highest VmHWM of the client process sampled from /proc every 2 ms; "
                  "ru_maxrss is an upper bound seeded with the benchmark's own RSS at exec."],
        "summary": summary, "samples": rows,
    }
    path = write_result(args.result, result)
    print(f"{'client':<24}{'ok':>6}{'peak RSS MiB':>14}{'peak RSS MB':>13}  wall s")
    for client, s in summary.items():
        print(f"{client:<24}{s['ok']:>3}/{s['runs']:<2}{s['peak_rss_mib']:>14.1f}{s['peak_rss_mb']:>13.1f}  "
              f"{', '.join(f'{w:.1f}' for w in s['wall_s'])}")
    print(f"vip-agent / VipSession peak RSS: x{result['ratio_peak_rss_agent_over_vipsession']:.3f}; "
          f"target < {TARGET_MB} MB: {'met' if result['target_met'] else 'NOT met'}")
    say(f"results: {path.relative_to(REPO)}")
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
