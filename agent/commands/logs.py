"""``vip-agent logs NAME|#ID [--follow]``: the saved stdout/stderr of a dataset's executions.

The agent saves each execution's logs under ``<output>/logs/<variant>-r<n>/``
when it ends. ``--follow`` prints the dataset's journal events (all of them, then
new ones as they happen), the stdout/stderr of its running executions as they
grow (read from VIP, which serves them while a job runs), and each saved log file,
until the dataset has finished. What was already shown live is not printed again
when the file is saved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from agent import queries
from agent.commands import add_state_args
from agent.errors import AgentError
from agent.journal import Dataset, Journal

#: the streams a job writes, in the order they are shown
STREAMS = ("stdout", "stderr")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", metavar="NAME|#ID", help="dataset name, or its id from `vip-agent status` (3, or '#3' quoted: a shell drops #...)"
    )
    add_state_args(parser)
    parser.add_argument(
        "-f", "--follow", action="store_true",
        help="print its events, then events, running jobs' output and logs as they come, "
             "until the dataset has finished",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    #: how often running jobs' logs are read from VIP (one request per job and stream)
    parser.add_argument("--live-interval", type=float, default=5.0, help=argparse.SUPPRESS)


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    sys.stdout.flush()


def _saved_key(path: str) -> tuple[str, str | None, str] | None:
    """``(execution key, job, stream)`` of a saved log path (``<key>/job0.stdout.txt``)."""
    p = Path(path)
    parts = p.name.split(".")
    if len(parts) == 2 and parts[0] in STREAMS:
        return p.parent.name, None, parts[0]
    if len(parts) == 3 and parts[0].startswith("job") and parts[1] in STREAMS:
        return p.parent.name, parts[0][3:], parts[1]
    return None


class Live:
    """The growing stdout/stderr of a dataset's running executions, read from VIP."""

    def __init__(self, server: str, key_file: Path | None = None) -> None:
        self.server = server
        self.key_file = key_file  # the drop folder's key_file: in agent.yaml, if any
        self.backend: Any = None
        self.unavailable: str | None = None
        #: (execution key, job, stream) -> text shown so far
        self.shown: dict[tuple[str, str | None, str], str] = {}

    def _engine(self) -> Any:
        if self.backend is None and self.unavailable is None:
            from agent.backend import open_backend
            from agent.credentials import find_api_key

            try:
                credential = find_api_key(self.server, key_file=self.key_file, keyring_timeout=10.0)
                self.backend = open_backend(self.server, credential.key, timeout=20.0, retries=1)
            except AgentError as err:
                self.unavailable = err.message
                print(f"(running jobs' output is not shown: {err.message})", file=sys.stderr)
        return self.backend.engine if self.backend is not None else None

    def poll(self, journal: Journal, ds: Dataset) -> None:
        """Print what each running execution's jobs wrote since the last look."""
        running = [e for e in journal.executions(ds.id) if e.vip_id and not e.ended and not e.logs_saved]
        if not running:
            return
        engine = self._engine()
        if engine is None:
            return
        from agent.vip.errors import VipError

        for e in running:
            jobs: list[str | None] = [*sorted(e.jobs or {}, key=lambda j: (len(j), j))] or [None]
            for job in jobs:
                for stream in STREAMS:
                    try:
                        text = engine.log(str(e.vip_id), stream, job)
                    except (VipError, AgentError):
                        continue  # not readable (yet) while it runs: the saved file comes at the end
                    self.show((e.key, job, stream), text, f"{e.vip_id} ({e.key})")

    def show(self, key: tuple[str, str | None, str], text: str, where: str) -> None:
        before = self.shown.get(key)
        if before is None:
            if not text.strip():
                return
            job = f" job {key[1]}" if key[1] is not None else ""
            print(f"==> {where}{job} {key[2]} (running, from VIP) <==")
            _write(text)
        elif text.startswith(before):
            if len(text) > len(before):
                sys.stdout.write(text[len(before):])
                sys.stdout.flush()
        else:  # rewritten on the server: show it whole again
            print(f"==> {where} {key[2]} (rewritten on VIP) <==")
            _write(text)
        self.shown[key] = text

    def remainder(self, path: str, text: str) -> str | None:
        """The part of a saved log not shown live yet; None if nothing of it was shown."""
        key = _saved_key(path)
        before = self.shown.get(key) if key is not None else None
        if before is None or not text.startswith(before):
            return None
        return text[len(before):]


def _show(path: str, live: Live | None) -> bool:
    """Print one log file (what was shown live is not repeated); False if it is gone (a
    retry replaced the folder meanwhile)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False
    rest = live.remainder(path, text) if live is not None else None
    if rest is not None:
        print(f"==> {path} <== (saved; its beginning is shown above, read while it ran)")
        if rest:
            _write(rest)
        return True
    print(f"==> {path} <==")
    _write(text)
    return True


def _key_file(config: Path | None, drop: str | None) -> Path | None:
    """The ``key_file:`` agent.yaml gives the dataset's drop folder (the service's key)."""
    from agent.config import default_config_path, load_config

    path = config or (default_config_path() if default_config_path().is_file() else None)
    if path is None or drop is None:
        return None
    try:
        loaded = load_config(Path(path))
    except AgentError:
        return None
    return next((d.key_file for d in loaded.drops if str(d.path) == drop), None)


def _event_line(ev: Any) -> str:
    level = "" if ev.level == "info" else f"{ev.level.upper()}: "
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.time))
    return f"{stamp} {level}{ev.message}"


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    journal, ds = queries.open_dataset(state, args.name)
    shown: set[str] = set()
    last_event = 0
    live = Live(ds.server, _key_file(args.config, ds.drop_dir)) if args.follow else None
    next_live = 0.0
    while True:
        ds = journal.get(ds.id)
        if args.follow:  # the events first (all of them), as the README says
            for ev in journal.events(ds.id, limit=100_000):
                if ev.id > last_event:
                    print(_event_line(ev), flush=True)
                    last_event = ev.id
        for path in queries.log_files(ds):
            if path not in shown and _show(path, live):
                shown.add(path)
        if not args.follow or ds.final:
            break
        if live is not None and time.monotonic() >= next_live:
            live.poll(journal, ds)
            next_live = time.monotonic() + args.live_interval
        time.sleep(args.interval)
    if not shown and not (live is not None and live.shown):
        launched = [e.vip_id for e in journal.executions(ds.id) if e.vip_id]
        why = (
            "its executions have not ended yet" if launched and not ds.final
            else "nothing was launched" if not launched
            else f"none were saved in {ds.output_dir}"
        )  # fmt: skip
        print(f"#{ds.id} {ds.name} ({ds.state}): no execution logs: {why}", file=sys.stderr)
    return 0
