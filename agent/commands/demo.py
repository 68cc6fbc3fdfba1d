"""``vip-agent demo``: the whole loop on an embedded local VIP, no key and no network needed.

Starts ``agent.localvip`` on a free loopback port, copies the example drop folder
(``examples/drop``) into a fresh work folder, runs every dataset in it from
validation to a clean server, and prints where the mirrored, extracted outputs
are (last line). The journal is the normal one, so ``vip-agent status`` shows
the demo datasets afterwards.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import time
from pathlib import Path

from agent import dataset as dataset_mod
from agent.errors import AgentError
from agent.journal import Journal
from agent.paths import default_state_dir
from agent.runner import Runner, admit


def examples_dir() -> Path:
    """The example drop folder: in a source checkout, or installed beside the package."""
    here = Path(__file__).resolve().parents[2] / "examples" / "drop"
    if here.is_dir():
        return here
    raise AgentError(
        "the example datasets (examples/drop) were not found",
        detail=f"looked in {here}; run the demo from a source checkout",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", type=Path, default=Path("vip-agent-demo"),
        help="folder for the demo's drop folder, outputs and server storage "
             "(default ./vip-agent-demo; each run gets its own subfolder)",
    )
    parser.add_argument("--state", type=Path, default=None,
                        help="state folder (default: the agent's usual one)")
    parser.add_argument("--examples", type=Path, default=None,
                        help="drop folder to copy (default: examples/drop)")


def main(args: argparse.Namespace) -> int:
    from agent.localvip import LocalVip
    from agent.vip.client import VipClient

    source = args.examples or examples_dir()
    work = (args.workdir / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    drop, outputs, storage = work / "drop", work / "outputs", work / "server"
    shutil.copytree(source, drop)
    storage.mkdir(parents=True)
    journal = Journal.in_state_dir(args.state or default_state_dir())
    key = secrets.token_urlsafe(24)
    template = drop / "job.yaml"
    with LocalVip(storage, api_keys=[key]) as server:
        print(f"embedded VIP server at {server.url} (storage {storage})", file=sys.stderr)
        client = VipClient(server.url, key)
        runner = Runner(journal, lambda _url: client, poll_min=0.2, poll_max=2.0)
        datasets = sorted(p for p in drop.iterdir() if p.is_dir() and not p.name.startswith("."))
        admitted: list[int] = []
        try:
            failed = _run_all(journal, runner, server.url, datasets, drop, outputs, template,
                              admitted)
        finally:
            # the embedded server dies with the demo: never leave a dataset for a later
            # `vip-agent watch` to chase on a server that is gone
            for dataset_id in admitted:
                if not journal.get(dataset_id).final:
                    journal.set_stage(dataset_id, "cancelled", message="demo interrupted")
    print(f"{len(datasets) - failed} of {len(datasets)} dataset(s) done", file=sys.stderr)
    print(outputs)
    return 0 if failed == 0 else 1


def _run_all(
    journal: Journal,
    runner: Runner,
    server_url: str,
    datasets: list[Path],
    drop: Path,
    outputs: Path,
    template: Path,
    admitted: list[int],
) -> int:
    failed = 0
    for path in datasets:
        scan = dataset_mod.scan(path)
        dataset_id = admit(
            journal, path, server=server_url, output_root=outputs,
            fingerprint=scan.fingerprint, name=path.name, drop_dir=drop,
            template=template if template.is_file() else None,
        )
        admitted.append(dataset_id)
        print(f"--- {path.name}: {len(scan.files)} file(s)", file=sys.stderr)
        outcome = runner.run(dataset_id)
        ds = journal.get(dataset_id)
        for ev in journal.events(dataset_id):
            print(f"    {ev.message}", file=sys.stderr)
        if outcome.stage != "done":
            failed += 1
            print(f"    FAILED: {ds.error}", file=sys.stderr)
        else:
            print(f"    done: {ds.output_dir}", file=sys.stderr)
    return failed
