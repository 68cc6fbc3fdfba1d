"""``vip-agent status [NAME|#ID]``: where every dataset stands (table, or ``--json``), or one in detail.

Reads the journal only (safe while an agent runs). Also says whether an agent
holds the state folder, so "stuck at uploading" with no agent running is
visibly "the agent is not running" rather than a mystery.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from agent import pause as user_pause
from agent import queries
from agent.commands import add_state_args
from agent.dicom.status import pending_studies
from agent.progress import current
from agent.runner.failure import headline
from agent.vip.models import ENDED_STATUSES


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


#: a transfer whose figures have not moved for this long is not running (they move every second)
STALE_AFTER = 15.0


def progress_text(rec: dict[str, Any], agent_running: bool | None = None, now: float | None = None) -> str:
    """A short progress column: transfer percentage, execution states, waiting reason.

    Only figures that describe the dataset's current state are shown (an upload's once it
    downloads are history). A transfer nobody moves any more (no agent holds the state
    folder, ``agent_running`` False) says it is stopped, without a rate or a time left.
    """
    p = current(rec) or {}
    state = rec["state"]
    if p.get("kind") == "waiting" and state in ("waiting", "paused"):
        return str(p.get("reason", ""))
    if p.get("kind") in ("upload", "download"):
        total = p.get("total") or 0
        done = min(p.get("done") or 0, total)
        if not total:
            return ""
        text = f"{100 * done / total:.0f}% of {_size(total)}"
        quiet = (now if now is not None else time.time()) - float(rec.get("updated") or 0)
        if quiet >= STALE_AFTER and agent_running is False:
            return f"stopped at {text}: no agent"  # no rate, no time left: nothing moves
        if quiet >= STALE_AFTER:
            return f"{text}, no progress for {_age(quiet)}"
        if p.get("rate"):
            text += f", {_size(float(p['rate']))}/s"
        if p.get("eta") is not None and done < total:
            text += f", {_age(float(p['eta']))} left"
        return text
    statuses = list((rec.get("execution_status") or {}).values())
    if statuses and state in ("running", "queued", "downloading", "cleaning"):
        # Unknown and words VIP does not define may still run: only an ended label counts
        ended = sum(1 for s in statuses if s in ENDED_STATUSES or s == "Lost")
        return f"{ended}/{len(statuses)} executions ended"
    return ""


def render_table(
    records: list[dict[str, Any]], width: int = 120, agent_running: bool | None = None
) -> str:
    """One row per dataset; the error, last, wraps under its column instead of being cut
    (at spaces: a path is broken only when it is longer than the column)."""
    now = time.time()
    headers = ("ID", "NAME", "STATE", "PROGRESS", "AGE", "EXECUTIONS", "ERROR")
    rows = []
    for r in records:
        rows.append((
            f"#{r['id']}", str(r["name"]), str(r["state"]), progress_text(r, agent_running, now),
            _age(now - float(r["created"])), ",".join(r.get("executions") or []) or "-",
            headline(r.get("error")),  # a job's stderr: its last line (all in `status NAME`)
        ))  # fmt: skip
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]
    widths = [min(w, 40) for w in widths[:-1]]
    indent = sum(widths) + 2 * len(widths)
    room = width - indent
    if room < 30:  # too narrow beside the other columns: the error goes below its row
        indent, room = 4, max(20, width - 4)
    lines = []
    for row in [headers, *rows]:
        cells = [
            c if len(c) <= widths[i] else c[: widths[i] - 1] + "…" for i, c in enumerate(row[:-1])
        ]
        head = "  ".join(c.ljust(widths[i]) for i, c in enumerate(cells))
        error = row[-1]
        chunks = _wrap(error, room) if error else []
        if indent == 4 and row is not headers:
            lines.append(head.rstrip())
            lines += [" " * indent + c for c in chunks]
            continue
        lines.append(
            (head + "  " + (chunks[0] if chunks else (error if row is headers else ""))).rstrip()
        )
        lines += [" " * indent + c for c in chunks[1:]]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, broken at spaces; a word (a path) longer than
    the width is broken at a ``/`` where it can be, mid-word only as a last resort."""
    out: list[str] = []
    for line in textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False):
        while len(line) > width:
            cut = line.rfind("/", 1, width)
            cut = cut if cut > width // 3 else width
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return _age(seconds)


def render_detail(d: dict[str, Any], width: int = 100, agent_running: bool | None = None) -> str:
    """``vip-agent status NAME``: one dataset, every stage with its time, executions, outputs, logs."""
    wrap = max(40, width - 12)
    attempt = d.get("attempt") or int(d.get("attempts") or 0) + 1  # older agents wrote no 'attempt'
    out = [f"#{d['id']} {d['name']}: {d['state']} (attempt {attempt})"]

    def field(label: str, value: Any) -> None:
        text = str(value) if value not in (None, "") else "-"
        chunks = _wrap(text, wrap) or ["-"]
        out.append(f"  {label + ':' if label else '':<10}{chunks[0]}")
        out.extend(" " * 12 + c for c in chunks[1:])

    field("dataset", d.get("path"))
    field("server", d.get("server"))
    field("output", d.get("output"))
    progress = progress_text(d, agent_running)
    if progress:
        field("progress", progress)
    if d.get("error"):
        for i, line in enumerate(str(d["error"]).splitlines()):
            field("error" if i == 0 else "", line.rstrip())
    out.append("stages:")
    for span in d.get("stages") or []:
        took = _duration(float(span["end"]) - float(span["start"])) if span.get("end") else "(now)"
        # mirror and extract are both "downloading" to a user: name the step where they differ
        step = span["state"] if span["state"] == span["stage"] else f"{span['state']} ({span['stage']})"
        out.append(f"  {_clock(span['start'])}  {step:<24} {took}")
    out.append("executions:" if d.get("runs") else "executions: none")
    for e in d.get("runs") or []:
        out.append(
            f"  {e.get('vip_id') or '(not launched)'}  {e['key']}  {e.get('status') or '-'}"
            f"  launched {_clock(e.get('launched'))}, ended {_clock(e.get('ended'))}"
        )
    outputs = d.get("outputs") or []
    out.append(
        f"outputs: {len(outputs)}"
        + (f", {sum(1 for o in outputs if o['downloaded'])} mirrored" if outputs else "")
    )
    for o in outputs:
        size = _size(o["size"]) if o.get("size") is not None else "? B"
        state = "mirrored" if o["downloaded"] else "not mirrored"
        if o.get("kind") == "folder":
            # the archive became a folder of the same name (VipSession's layout): say so
            out.append(f"  {o['remote']} ({size} archive, {state}) -> folder "
                       f"{str(o['extracted_to']).rstrip('/')}/ (extracted)")  # fmt: skip
        else:
            out.append(f"  {o['remote']} ({size}, {state}) -> {o['local']}")
    out.append("logs:" if d.get("logs") else "logs: none saved yet")
    out.extend(f"  {path}" for path in d.get("logs") or [])
    out.append("events:")
    for ev in d.get("events") or []:
        level = "" if ev.get("level") in (None, "info") else f"{str(ev['level']).upper()}: "
        out.append(f"  {_clock(ev['time'])}  {level}{ev['message']}")
    return "\n".join(out)


def configure(parser: argparse.ArgumentParser) -> None:
    add_state_args(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="JSON: a list, one object per dataset; with one NAME|#ID, that dataset in detail",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME|#ID",
        help="one dataset (name, or id: 3 or '#3' quoted): show it in detail; several: only these",
    )


def _bandwidth(config: Path | None) -> list[str]:
    """The bandwidth limits agent.yaml sets, as they apply now (nothing when it cannot be read)."""
    from agent.bandwidth import describe_servers
    from agent.config import default_config_path, load_config
    from agent.errors import AgentError

    path = config or (default_config_path() if default_config_path().is_file() else None)
    if path is None:
        return []
    try:
        return describe_servers(load_config(path).drops)
    except AgentError:
        return []


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    journal = queries.open_journal(state)
    if journal is None and args.state:
        # a folder named on purpose that holds no journal is a typo, not "no datasets yet"
        what = "does not exist" if not state.exists() else "holds no journal"
        raise queries.NotFound(f"the state folder {state} {what}: nothing has run there; "
                               "check the --state path")  # fmt: skip
    if len(args.names) == 1:
        if journal is None:
            raise queries.NotFound(f"no journal in {state}: nothing has run there yet")
        info = queries.detail(journal, queries.find_dataset(journal, args.names[0]))
        if args.json:
            json.dump(info, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            running = queries.agent_pid(state) is not None
            print(render_detail(info, shutil.get_terminal_size((100, 20)).columns, running))
        return 0
    records = queries.list_records(journal, args.names)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    pid = queries.agent_pid(state)
    agent = f"running (pid {pid})" if pid else "running" if pid == 0 else "NOT running"
    print(f"agent: {agent}    state: {state}")
    for drop in journal.drop_states() if journal is not None and pid is not None else []:
        if drop.state != "watching":
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(drop.since))
            print(f"drop folder {drop.path}: {drop.state.upper()} since {since}: {drop.message}")
    for held in user_pause.read(journal).rows if journal is not None else ():
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(held.since))
        print(f"paused: {held.what()}, by {held.by} ({held.via}) since {since}; "
              f"`{held.resume_command()}` resumes it")  # fmt: skip
    for line in _bandwidth(args.config):
        print(line)
    for study in pending_studies(journal.path) if journal is not None else ():
        note = f": {study['message']}" if study.get("message") else ""
        print(f"DICOM study {study['study']} pending in the spool ({study['state']}, {study['objects']} "
              f"object(s), last one {_age(study['age'])} ago){note}")  # fmt: skip
    if not records:
        print("no datasets yet")
        return 0
    print(render_table(records, shutil.get_terminal_size((120, 20)).columns, pid is not None))
    return 0
