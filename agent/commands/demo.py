"""``vip-agent demo``: the main job on an embedded local VIP, no key and no network needed.

Starts ``agent.localvip`` on a free loopback port and the drop-folder service
(``vip-agent watch``'s) on an empty drop folder, then drops the example datasets
(``examples/drop``, shipped in the package: :mod:`agent.bundled`) into it as an
instrument would. Each is detected, waited for
until complete, validated, uploaded, run, mirrored, extracted and cleaned from
the server. Prints where the outputs are as its last line. The journal is the
agent's usual one, so ``vip-agent status`` shows the demo datasets afterwards
(or the demo's own, if a running agent holds the usual one).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import time
from pathlib import Path

from agent import settings
from agent.bundled import examples_dir
from agent.errors import AgentError
from agent.journal import Journal, Stage


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", type=Path, default=Path("vip-agent-demo"),
        help="folder for the demo's drop folder, outputs and server storage "
             "(default ./vip-agent-demo; each run gets its own subfolder)",
    )
    parser.add_argument("--state", type=Path, default=None,
                        help="state folder (default: the agent's usual one)")
    parser.add_argument("--examples", type=Path, default=None,
                        help="drop folder to copy datasets from (default: examples/drop)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds a dataset must stay unchanged before it is taken")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up after this many seconds")


def main(args: argparse.Namespace) -> int:
    from agent.backend import open_backend
    from agent.config import config_from_args
    from agent.daemon import AlreadyRunning, WatchService
    from agent.localvip import LocalVip

    source = args.examples or examples_dir() / "drop"
    work = (args.workdir / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    drop, outputs, storage = work / "drop", work / "outputs", work / "server"
    for folder in (drop, outputs, storage):
        folder.mkdir(parents=True)
    datasets = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    key = secrets.token_urlsafe(24)
    with LocalVip(storage, api_keys=[key]) as server:
        say(f"embedded VIP server at {server.url} (storage {storage})")
        client = open_backend(server.url, key)

        def service_for(state: Path) -> WatchService:
            config = config_from_args(drop, server=server.url, output=outputs, state=state,
                                      settle=args.settle)
            return WatchService(config, client_for=lambda _url: client,
                                runner_options={"poll_min": 0.2, "poll_max": 2.0})

        state = settings.state_dir(args.state)  # --state, VIP_AGENT_STATE, agent.yaml's, default
        service = service_for(state)
        try:
            service.start()
        except AlreadyRunning:
            state = work / "state"
            say(f"a running agent holds {service.config.state}; the demo uses {state}")
            service = service_for(state)
            service.start()
        journal = Journal.in_state_dir(state)
        say(f"watching {drop}")
        try:
            # an instrument drops the datasets: the folder's job.yaml first, then each one
            if (source / "job.yaml").is_file():
                shutil.copy2(source / "job.yaml", drop / "job.yaml")
            for path in datasets:
                shutil.copytree(path, drop / path.name)
                say(f"dropped {path.name}/")
            failed = follow(journal, drop, len(datasets), args.timeout)
        finally:
            service.stop()
            # the embedded server dies with the demo: leave nothing for a later agent to chase
            for ds in journal.find():
                if ds.drop_dir == str(drop) and not ds.final:
                    journal.set_stage(ds.id, Stage.CANCELLED, message="demo stopped")
    say(f"{len(datasets) - failed} of {len(datasets)} dataset(s) done")
    print(outputs)
    return 0 if failed == 0 else 1


def follow(journal: Journal, drop: Path, expected: int, timeout: float) -> int:
    """Print the demo datasets' events until all are final; returns how many failed."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        mine = [d for d in journal.find() if d.drop_dir == str(drop)]
        for ds in mine:
            for ev in journal.events(ds.id):
                if ev.id not in seen:
                    seen.add(ev.id)
                    say(f"  {Path(ds.path).name}: {ev.message}")
        final = [d for d in mine if d.final]
        if len(final) >= expected and len(final) == len(mine):
            for ds in final:
                verdict = ds.output_dir if ds.stage == "done" else f"{ds.stage.upper()}: {ds.error}"
                say(f"{Path(ds.path).name}: {verdict}")
            return sum(1 for d in final if d.stage != "done")
        if time.monotonic() > deadline:
            raise AgentError(
                f"the demo did not finish within {timeout:.0f} s",
                detail=", ".join(f"{d.name}={d.state}" for d in mine),
            )
        time.sleep(0.2)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
