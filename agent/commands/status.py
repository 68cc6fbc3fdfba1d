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
from pathlib import Path
from typing import Any

from agent.config import default_config_path, default_state_dir, load_config
from agent.errors import AgentError, one_line
from agent.journal import JOURNAL_NAME, Dataset, Journal
from agent.runner import status_record
from agent.watch.lock import AgentLock


class NotFound(AgentError):
    """No dataset matches the name given."""

    exit_code = 1


# -- shared by status, retry and cancel --------------------------------------------------


def add_state_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=Path, help="state folder (default: from --config, or the per-user one)")
    parser.add_argument("--config", type=Path, help="agent.yaml whose 'state' to use")


def state_dir(args: argparse.Namespace) -> Path:
    """``--state``, else the ``state`` of ``--config`` (or of the default agent.yaml), else the default."""
    if getattr(args, "state", None):
        return Path(args.state).expanduser().resolve()
    config = getattr(args, "config", None)
    if config is None and default_config_path().is_file():
        config = default_config_path()
    if config is not None:
        return load_config(config).state
    return default_state_dir()


def open_journal(state: Path) -> Journal | None:
    """The journal of a state folder, or None if no agent ever ran there."""
    if not (state / JOURNAL_NAME).is_file():
        return None
    return Journal.in_state_dir(state)


def find_dataset(journal: Journal, ref: str) -> Dataset:
    """The dataset named ``ref`` (the most recent run of that name), or with id ``ref``/``#ref``."""
    text = ref.lstrip("#")
    if text.isdigit():
        try:
            return journal.get(int(text))
        except KeyError:
            pass
    rows = journal.find(name=ref)
    if not rows:
        rows = [d for d in journal.datasets() if Path(d.path).name == ref]
    if not rows:
        raise NotFound(f"no dataset named {ref!r} in the journal (see `vip-agent status`)")
    return rows[-1]


def agent_pid(state: Path) -> int | None:
    """pid of the agent holding ``state`` (0 if unknown), None if no agent runs."""
    return AgentLock(state).held_by_other()


# -- status --------------------------------------------------------------------------------


def record(journal: Journal, ds: Dataset) -> dict[str, Any]:
    """The JSON record of one dataset (the same fields as STATUS.json, plus id and attempts)."""
    rec = status_record(journal, ds)
    rec = {"id": ds.id, **rec, "attempts": ds.attempts}
    if ds.paused and not ds.final and not rec.get("error"):
        rec["error"] = ds.paused
    return rec


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
    state = state_dir(args)
    journal = open_journal(state)
    records = []
    if journal is not None:
        rows = journal.datasets()
        if args.names:
            wanted = set(args.names)
            rows = [d for d in rows if d.name in wanted or Path(d.path).name in wanted]
        records = [record(journal, d) for d in rows]
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    pid = agent_pid(state)
    agent = f"running (pid {pid})" if pid else "running" if pid == 0 else "NOT running"
    print(f"agent: {agent}    state: {state}")
    if not records:
        print("no datasets yet")
        return 0
    print(render_table(records, shutil.get_terminal_size((120, 20)).columns))
    return 0
