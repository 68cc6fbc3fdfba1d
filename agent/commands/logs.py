"""``vip-agent logs NAME|#ID [--follow]``: the saved stdout/stderr of a dataset's executions.

The agent saves each execution's logs under ``<output>/logs/<variant>-r<n>/``
when it ends. ``--follow`` prints the dataset's journal events as they happen
and each log file as soon as it is saved, until the dataset has finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agent import queries
from agent.commands import add_state_args


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", metavar="NAME|#ID", help="dataset name, or its id from `vip-agent status` (3, or '#3' quoted: a shell drops #...)"
    )
    add_state_args(parser)
    parser.add_argument(
        "-f", "--follow", action="store_true",
        help="print events and logs as they come until the dataset has finished",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)


def _show(path: str) -> bool:
    """Print one log file; False if it is gone (a retry replaced the folder meanwhile)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False
    print(f"==> {path} <==")
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    sys.stdout.flush()
    return True


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    journal, ds = queries.open_dataset(state, args.name)
    shown: set[str] = set()
    last_event = 0
    if args.follow:
        last_event = max((ev.id for ev in journal.events(ds.id)), default=0)
    while True:
        ds = journal.get(ds.id)
        if args.follow:
            for ev in journal.events(ds.id):
                if ev.id > last_event:
                    level = "" if ev.level == "info" else f"{ev.level.upper()}: "
                    stamp = time.strftime("%H:%M:%S", time.localtime(ev.time))
                    print(f"{stamp} {level}{ev.message}", flush=True)
                    last_event = ev.id
        for path in queries.log_files(ds):
            if path not in shown and _show(path):
                shown.add(path)
        if not args.follow or ds.final:
            break
        time.sleep(args.interval)
    if not shown:
        launched = [e.vip_id for e in journal.executions(ds.id) if e.vip_id]
        why = (
            "its executions have not ended yet" if launched and not ds.final
            else "nothing was launched" if not launched
            else f"none were saved in {ds.output_dir}"
        )  # fmt: skip
        print(f"#{ds.id} {ds.name} ({ds.state}): no execution logs: {why}", file=sys.stderr)
    return 0
