"""``vip-agent cancel NAME``: stop a dataset, kill its execution, clean the server.

The request is recorded in the journal (``cancel_requested``). If an agent is
running, it does the work (it polls the journal and wakes the dataset) and this
command waits for the result. If none is running, this command takes the state
folder's lock itself (so an agent starting meanwhile cannot step the same
dataset) and drives the runner until the dataset is ``cancelled``. A dataset
still ``waiting`` for its files has nothing remote: it is cancelled at once.

An ``incomplete`` dataset (outputs left on VIP) is already finished: ``--discard``
deletes what was left on VIP, with its execution, and it ends ``cancelled``.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from agent.commands.status import add_state_args, agent_pid, find_dataset, open_journal, state_dir
from agent.config import load_config
from agent.errors import AgentError, CredentialError
from agent.journal import Journal
from agent.leftovers import left_on_vip
from agent.watch.lock import AgentLock


class CannotCancel(AgentError):
    exit_code = 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="dataset name (or #id from `vip-agent status`)")
    add_state_args(parser)
    parser.add_argument(
        "--wait", type=float, default=120.0,
        help="seconds to wait for the kill and the clean-up (default 120)",
    )  # fmt: skip
    parser.add_argument(
        "--discard", action="store_true",
        help="for an incomplete dataset: delete the outputs left on VIP (see LEFT_ON_VIP.txt)",
    )  # fmt: skip


def _wait_final(journal: Journal, dataset_id: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ds = journal.get(dataset_id)
        if ds.final:
            return ds.stage
        time.sleep(0.2)
    return None


def _cancel_here(journal: Journal, dataset_id: int, key_file: Path | None, timeout: float) -> str | None:
    """Drive the runner ourselves until the dataset is final (no agent is running)."""
    from agent.commands.watch import ClientProvider
    from agent.runner import Runner
    from agent.vip.errors import AuthError

    ds = journal.get(dataset_id)
    provider = ClientProvider({ds.server: key_file})
    stop = threading.Event()
    runner = Runner(journal, provider, stop_event=stop)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            outcome = runner.step(dataset_id)
            if outcome.final:
                return str(outcome.stage)
            if outcome.retry_after:
                stop.wait(min(outcome.retry_after, max(0.0, deadline - time.monotonic())))
    except AuthError as err:
        raise CredentialError(
            f"the cancel is recorded, but {ds.server} refused the API key ({err.message}); "
            "the agent finishes it when it runs with a working key",
            detail=err.detail,
        ) from None
    return None


def main(args: argparse.Namespace) -> int:
    state = state_dir(args)
    journal = open_journal(state)
    if journal is None:
        raise CannotCancel(f"no journal in {state}: nothing has run there yet")
    ds = find_dataset(journal, args.name)
    if ds.stage == "incomplete":
        left = left_on_vip(journal, ds.id)
        if not args.discard:
            print(
                f"{ds.name} is incomplete: {len(left)} output file(s) are still on VIP (see "
                f"LEFT_ON_VIP.txt in {ds.output_dir}). `vip-agent retry {ds.name}` fetches them "
                f"once the limit allows; `vip-agent cancel {ds.name} --discard` deletes them"
            )
            return 1
        journal.update(ds.id, options={**ds.options, "discard": True})
        journal.reopen(
            ds.id, "cleanup", cancel=True,
            message=f"discard requested by the user: deleting the {len(left)} output file(s) "
                    "left on VIP",
        )  # fmt: skip
        ds = journal.get(ds.id)
    if ds.final:
        print(f"{ds.name} is already {ds.state}")
        return 0
    if ds.stage == "waiting":
        journal.set_stage(ds.id, "cancelled", message="cancelled by the user before it was complete")
        print(f"{ds.name}: cancelled (it was still waiting for its files; nothing was sent)")
        return 0
    if not ds.cancel_requested:
        journal.update(ds.id, cancel_requested=1)
        journal.event(ds.id, "cancel requested by the user", level="warning")
    pid = agent_pid(state)
    if pid is not None:
        print(f"{ds.name}: cancel requested; the running agent (pid {pid or '?'}) is stopping it...")
        stage = _wait_final(journal, ds.id, args.wait)
    else:
        lock = AgentLock(state)
        if not lock.acquire():  # an agent started just now: it will do it
            stage = _wait_final(journal, ds.id, args.wait)
        else:
            try:
                key_file = None
                if args.config:
                    drop = load_config(args.config).drop_for(ds.drop_dir)
                    key_file = drop.key_file if drop else None
                print(f"{ds.name}: no agent is running; cancelling it here...")
                stage = _cancel_here(journal, ds.id, key_file, args.wait)
            finally:
                lock.release()
    if stage is None:
        print(
            f"{ds.name}: the cancel is recorded but not finished after {args.wait:g} s; "
            "the agent completes it (see `vip-agent status`)"
        )
        return 1
    final = journal.get(ds.id)
    print(f"{final.name}: {final.state}" + (f" ({final.error})" if final.error else ""))
    return 0 if stage == "cancelled" else 1
