"""``vip-agent status``: where every dataset stands (table, or ``--json``).

Reads the journal only (safe while an agent runs). Also says whether an agent
holds the state folder, so "stuck at uploading" with no agent running is
visibly "the agent is not running" rather than a mystery.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from typing import Any

from agent import queries
from agent.commands import add_state_args
from agent.errors import one_line


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_text(rec: dict[str, Any]) -> str:
    """A short progress column: transfer percentage, execution states, waiting reason."""
    p = rec.get("progress") or {}
    state = rec["state"]
    if p.get("kind") == "waiting" and state in ("waiting", "paused"):
        return str(p.get("reason", ""))
    if p.get("kind") in ("upload", "download") and state in ("uploading", "downloading"):
        total = p.get("total") or 0
        done = p.get("done") or 0
        return f"{100 * done / total:.0f}% of {_size(total)}" if total else ""
    statuses = list((rec.get("execution_status") or {}).values())
    if statuses and state in ("running", "queued", "downloading", "cleaning"):
        ended = sum(1 for s in statuses if s not in ("Running", "Ready", "Initializing", None))
        return f"{ended}/{len(statuses)} executions ended"
    return ""


def render_table(records: list[dict[str, Any]], width: int = 120) -> str:
    now = time.time()
    headers = ("NAME", "STATE", "PROGRESS", "AGE", "EXECUTIONS", "ERROR")
    rows = []
    for r in records:
        error = one_line(r.get("error"))
        rows.append((
            str(r["name"]), str(r["state"]), progress_text(r), _age(now - float(r["created"])),
            ",".join(r.get("executions") or []) or "-", error,
        ))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    widths = [min(w, 40) for w in widths[:-1]] + [widths[-1]]
    lines = []
    for row in [headers, *rows]:
        cells = [c if len(c) <= widths[i] else c[: widths[i] - 1] + "…" for i, c in enumerate(row[:-1])]
        line = "  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)) + "  " + row[-1]
        lines.append(line[:width].rstrip() if len(line) > width else line.rstrip())
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    add_state_args(parser)
    parser.add_argument("--json", action="store_true", help="a JSON list, one object per dataset")
    parser.add_argument("names", nargs="*", help="only these datasets")


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    records = queries.list_records(queries.open_journal(state), args.names)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    pid = queries.agent_pid(state)
    agent = f"running (pid {pid})" if pid else "running" if pid == 0 else "NOT running"
    print(f"agent: {agent}    state: {state}")
    if not records:
        print("no datasets yet")
        return 0
    print(render_table(records, shutil.get_terminal_size((120, 20)).columns))
    return 0
