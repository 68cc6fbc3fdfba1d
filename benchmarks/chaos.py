"""Chaos: SIGKILL ``vip-agent watch`` at random moments (optionally against a faulty server).

N datasets are dropped at once into a drop folder watched by a real ``vip-agent watch``
(``max_running: 1``) against ``vip-agent local-server``. The agent is killed with SIGKILL
K times, at random moments, and started again each time; then it runs to the end. The
same datasets also run once without kills and without faults (the reference). Reported:

* ``lost``: datasets that did not end ``done`` (or never appeared in the journal);
* ``duplicate_launches``: executions launched more than once for the same name (the
  server keeps deleted executions in its state, so every launch is counted);
* ``mismatches``: output files whose bytes differ from the reference run (or are missing
  or extra), timestamps in folder names set aside;
* ``remote_leftovers``: files left in the user's VIP storage and executions not deleted;
* ``part_files``: ``*.part`` files left in the output folders.

Usage (loopback only, bounded)::

    .venv/bin/python benchmarks/chaos.py --datasets 20 --kills 50
    .venv/bin/python benchmarks/chaos.py --datasets 20 --kills 50 \\
        --faults error_rate=0.1,drop_rate=0.05,transfer_timeout=0.05,capacity=0.1,unknown_blip=0.1

Writes ``benchmarks/results/chaos[-faults].json`` unless ``--no-save``; exits 1 when any
count above is not 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, REPO, RESULTS, LocalServer, child_env, private_file, workdir  # noqa: E402

JOB = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}
#: names under an output folder that differ from run to run by design
_VOLATILE = ("STATUS.json", "session_data.json", "ERROR.txt", "LEFT_ON_VIP.txt")
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}[_T]\d{6}|\d{2}-\d{2}-\d{4}_\d{2}:\d{2}:\d{2})$")


def _write_config(base: Path, server: LocalServer, drop: Path, out: Path, state: Path) -> Path:
    import yaml

    config = base / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "state": str(state),
        "drops": [{
            "path": str(drop), "server": server.url, "output": str(out), "max_running": 1,
            "readiness": {"settle_seconds": 0.2}, "poll": "0.2:1",
        }],
    }))  # fmt: skip
    return config


def _make_datasets(stage: Path, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = []
    for i in range(n):
        name = f"d{i:03}"
        folder = stage / name
        folder.mkdir(parents=True)
        lines = rng.randint(1, 200)
        (folder / "data.txt").write_text("".join(f"{name} line {j} {rng.random()}\n" for j in range(lines)))
        names.append(name)
    return names


def _start(config: Path, creds: Path, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-m", "agent", "watch", "--config", str(config)], cwd=REPO,
        env=child_env(CREDENTIALS_DIRECTORY=str(creds), PYTHONPATH=str(REPO)),
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip


def _journal_rows(state: Path) -> list[tuple[str, str]]:
    path = state / "journal.sqlite3"
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return [(str(n), str(s)) for n, s in db.execute("SELECT name, stage FROM datasets")]
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _all_final(state: Path, n: int) -> bool:
    rows = _journal_rows(state)
    finals = {"done", "failed", "cancelled", "incomplete"}
    return len({name for name, _ in rows}) >= n and all(stage in finals for _, stage in rows)


def _outputs(out: Path) -> dict[str, str]:
    """relative path (timestamps set aside) -> sha256 of every output file."""
    found: dict[str, str] = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        parts = path.relative_to(out).parts
        if parts[-1] in _VOLATILE or "logs" in parts or parts[-1].endswith(".part"):
            continue
        key = "/".join("<stamp>" if _STAMP.match(p) else p for p in parts)
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _server_report(server_root: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{server_root / '.localvip' / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        launches = dict(db.execute("SELECT name, COUNT(*) FROM executions GROUP BY name").fetchall())
        alive = [r[0] for r in db.execute("SELECT name FROM executions WHERE deleted=0")]
    finally:
        db.close()
    files = [
        str(p.relative_to(server_root)) for p in server_root.rglob("*")
        if p.is_file() and ".localvip" not in p.relative_to(server_root).parts
    ]  # fmt: skip
    return {"launches": launches, "executions_left": alive, "files_left": files}


def run_once(
    base: Path, names_stage: Path, n: int, *, kills: int, faults: str, seed: int,
    min_gap: float, max_gap: float, timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """One full run (with ``kills`` SIGKILLs); returns what happened."""
    import shutil

    base.mkdir(parents=True)
    drop, out, state, creds = base / "drop", base / "out", base / "state", base / "creds"
    for folder in (drop, out, creds):
        folder.mkdir()
    os.chmod(creds, 0o700)
    rng = random.Random(seed)
    with LocalServer(base / "server", max_running=4, faults=faults) as server:
        private_file(creds / "vip-api-key", server.api_key)
        config = _write_config(base, server, drop, out, state)
        import yaml

        (drop / "job.yaml").write_text(yaml.safe_dump(JOB))
        staged = base / "staged"
        shutil.copytree(names_stage, staged)
        with open(base / "agent.log", "ab") as log:
            proc = _start(config, creds, log)
            for name in sorted(os.listdir(staged)):  # dropped at once, each complete
                os.rename(staged / name, drop / name)
            started = time.monotonic()
            done_kills = 0
            kill_times: list[float] = []
            while done_kills < kills and not _all_final(state, n):
                time.sleep(rng.uniform(min_gap, max_gap))  # the random moment of the next kill
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kill_times.append(round(time.monotonic() - started, 3))
                done_kills += 1
                proc = _start(config, creds, log)
            deadline = time.monotonic() + timeout
            while not _all_final(state, n) and time.monotonic() < deadline:
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elapsed = time.monotonic() - started
        remote = _server_report(base / "server")
    rows = _journal_rows(state)
    stages: dict[str, list[str]] = {}
    for name, stage in rows:
        stages.setdefault(name, []).append(stage)
    return {
        "kills": done_kills,
        "kill_times_s": kill_times,
        "elapsed_s": round(elapsed, 1),
        "stages": stages,
        "outputs": _outputs(out),
        "part_files": [str(p.relative_to(out)) for p in out.rglob("*.part")],
        "remote": remote,
    }


def compare(reference: dict[str, Any], chaos: dict[str, Any], names: list[str]) -> dict[str, Any]:
    lost = [n for n in names if chaos["stages"].get(n, [])[-1:] != ["done"]]
    duplicates = {k: v for k, v in chaos["remote"]["launches"].items() if v > 1}
    ref, got = reference["outputs"], chaos["outputs"]
    mismatches = sorted(
        k for k in set(ref) | set(got) if ref.get(k) != got.get(k)
    )  # fmt: skip
    leftovers = chaos["remote"]["executions_left"] + chaos["remote"]["files_left"]
    return {
        "lost": len(lost), "lost_names": lost,
        "duplicate_launches": sum(v - 1 for v in duplicates.values()), "duplicated": duplicates,
        "mismatches": len(mismatches), "mismatched": mismatches[:20],
        "remote_leftovers": len(leftovers), "leftovers": leftovers[:20],
        "part_files": len(chaos["part_files"]),
        "reference_outputs": len(ref), "reference_lost": [
            n for n in names if reference["stages"].get(n, [])[-1:] != ["done"]
        ],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=int, default=20)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--faults", default="", help="local-server --faults spec for the chaos run")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-gap", type=float, default=0.1, help="least seconds between two kills")
    ap.add_argument("--max-gap", type=float, default=0.7, help="most seconds between two kills")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to finish after the kills")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = ap.parse_args(argv)
    with workdir("chaos") as tmp:
        names = _make_datasets(tmp / "datasets", args.datasets, args.seed)
        reference = run_once(tmp / "reference", tmp / "datasets", len(names), kills=0, faults="",
                             seed=args.seed, min_gap=0, max_gap=0, timeout=args.timeout)  # fmt: skip
        chaos = run_once(tmp / "chaos", tmp / "datasets", len(names), kills=args.kills,
                         faults=args.faults, seed=args.seed, min_gap=args.min_gap,
                         max_gap=args.max_gap, timeout=args.timeout)  # fmt: skip
        report = compare(reference, chaos, names)
        if any(report[k] for k in ("lost", "duplicate_launches", "mismatches", "remote_leftovers",
                                   "part_files")):  # fmt: skip
            log = (tmp / "chaos" / "agent.log").read_text(errors="replace")
            report["agent_log_tail"] = log[-4000:]
    summary = {
        "datasets": len(names), "kills": chaos["kills"], "faults": args.faults or None,
        "seed": args.seed, "elapsed_s": chaos["elapsed_s"], "reference_elapsed_s": reference["elapsed_s"],
        **report,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "agent_log_tail"}, indent=2))
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "chaos-faults.json" if args.faults else "chaos.json"
        (RESULTS / name).write_text(json.dumps({**summary, "kill_times_s": chaos["kill_times_s"]}, indent=2))
    bad = any(summary[k] for k in ("lost", "duplicate_launches", "mismatches", "remote_leftovers",
                                   "part_files"))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
