"""``vip-agent dicom explain PATH`` and ``vip-agent dicom status``.

``explain`` reads DICOM files (a file or a folder, recursively) and prints, for each
series, which route of agent.yaml takes it and why each rule before it does not.
``status`` shows the DICOM node (address, counters) and the studies still in the
spool (pending, unrouted or refused), with counts and age; it reads the state
folder only, so it works whether or not ``watch`` runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import queries
from agent.commands import add_state_args
from agent.config import default_config_path, load_config
from agent.dicom.routing import choose, group_series, waiting_for
from agent.dicom.status import pending_studies, read_status, spool_summary
from agent.errors import AgentError, ConfigError
from agent.journal import JOURNAL_NAME

try:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from agent.dicom.spool import header

    MISSING = ""
except ImportError as _err:  # the `dicom` extra is not installed: main() says so
    MISSING = str(_err)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dicom_command", metavar="SUBCOMMAND", required=True)
    explain = sub.add_parser("explain", help="which route takes each series of DICOM files, and why")
    explain.add_argument("path", type=Path, help="a DICOM file or a folder of them")
    explain.add_argument("--config", type=Path, help="agent.yaml (default: the per-user one)")
    status = sub.add_parser("status", help="the DICOM node and the studies pending in its spool")
    add_state_args(status)
    status.add_argument("--json", action="store_true", help="print JSON")


@dataclass(frozen=True)
class _Object:
    series_uid: str
    info: dict[str, Any]
    study_uid: str


def _read(path: Path) -> list[_Object]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        out.append(_Object(str(ds.SeriesInstanceUID), header(ds), str(ds.StudyInstanceUID)))
    return out


def explain(args: argparse.Namespace) -> int:
    source = args.config or default_config_path()
    config = load_config(source)
    if config.dicom is None:
        raise ConfigError(f"{source}: has no 'dicom:' block (see docs/dicom.md)", detail="key dicom")
    if not args.path.exists():
        raise AgentError(f"{args.path}: no such file or folder")
    objects = _read(args.path)
    if not objects:
        raise AgentError(f"{args.path}: no DICOM file with study and series UIDs found")
    routes = config.dicom.routes
    studies: dict[str, list[_Object]] = {}
    for obj in objects:
        studies.setdefault(obj.study_uid, []).append(obj)
    for n, (_uid, members) in enumerate(studies.items(), 1):
        series = group_series(members)
        print(f"study {n} ({len(members)} object(s), {len(series)} series)")
        taken: dict[int, list[Any]] = {}
        for s in series:
            route, reasons = choose(routes, s)
            target = f"-> {route.label} (drop {route.drop}, per {route.per})" if route else "-> no route: kept in the spool"
            print(f"  {s.label()} {target}")
            for reason in reasons:
                print(f"      {reason}")
            if route is not None:
                taken.setdefault(route.index, []).append(s)
        for idx, mine in taken.items():
            why = waiting_for(routes[idx], series, mine)
            if why:
                print(f"  {routes[idx].label} would wait: {why}")
    return 0


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _spool_line(spool: dict[str, Any]) -> str:
    """The spool's size, its oldest handed-over study and what retention deleted (dicom.keep)."""
    line = f"  spool: {spool['objects']} object(s), {_bytes(spool['bytes'])}"
    if spool["handed_studies"]:
        line += (f"; {spool['handed_studies']} handed-over stud{'y' if spool['handed_studies'] == 1 else 'ies'}"
                 f" kept, oldest handed over {_age(spool['oldest_handed_age'])} ago")  # fmt: skip
    if spool["purged_studies"]:
        line += (f"; deleted after hand-over: {spool['purged_studies']} stud"
                 f"{'y' if spool['purged_studies'] == 1 else 'ies'}, {_bytes(spool['purged_bytes'])}")  # fmt: skip
    return line


def status(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    node = read_status(state)
    pending = pending_studies(state / JOURNAL_NAME)
    running = queries.agent_pid(state) is not None
    spool = spool_summary(state / JOURNAL_NAME)
    if args.json:
        print(json.dumps({"node": node, "running": running, "pending": pending, "spool": spool}, indent=2))
        return 0
    if node is None:
        print(f"no DICOM node has run with the state folder {state}")
    else:
        c = node.get("counters", {})
        where = f"{node.get('ae_title')} on {node.get('host')}:{node.get('port')}"
        live = "listening" if running and node.get("listening") else "not running"
        print(f"DICOM node {where}: {live}")
        print(f"  associations {c.get('associations', 0)} (open {node.get('open_associations', 0)}, "
              f"rejected {c.get('rejected', 0)}), objects {c.get('objects', 0)}, bytes {c.get('bytes', 0)}, "
              f"duplicates {c.get('duplicates', 0)}, refused {c.get('refusals', 0)}, late {c.get('late', 0)}")  # fmt: skip
        prep = node.get("deidentify")
        if running and prep:
            print(f"  de-identification ahead: {prep['workers']} worker(s), {prep['waiting']} object(s) waiting, "
                  f"{prep['prepared']} prepared")  # fmt: skip
    if spool is not None and (spool["objects"] or spool["purged_objects"]):
        print(_spool_line(spool))
    if not pending:
        print("no study pending in the spool")
        return 0
    print(f"{len(pending)} stud{'y' if len(pending) == 1 else 'ies'} in the spool:")
    waiting = ((node or {}).get("waiting") or {}) if running else {}
    for p in pending:
        reason = p.get("message") if p["state"] != "pending" else waiting.get(p["study"])
        note = f": {reason}" if reason else ""
        print(f"  {p['study']}  {p['state']:<8} {p['objects']} object(s), last {_age(p['age'])} ago{note}")
    return 0


def main(args: argparse.Namespace) -> int:
    if MISSING:
        raise AgentError("vip-agent dicom needs the DICOM extra: pip install 'vip-agent[dicom]'", detail=MISSING)
    if args.dicom_command == "explain":
        return explain(args)
    return status(args)
