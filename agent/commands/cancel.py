"""``vip-agent cancel NAME|#ID``: stop a dataset, kill its execution, clean the server.

The request is recorded in the journal (``cancel_requested``). If an agent is
running, it does the work (it polls the journal and wakes the dataset) and this
command waits for the result. If none is running, this command takes the state
folder's lock itself (so an agent starting meanwhile cannot step the same
dataset) and drives the runner until the dataset is ``cancelled``. A dataset
still ``waiting`` for its files has nothing remote: it is cancelled at once.

An ``incomplete`` dataset (outputs left on VIP) has ended already: ``--discard``
deletes what was left on VIP, with its execution, and it ends ``cancelled``.
"""

from __future__ import annotations

import argparse

from agent import actions, queries, settings
from agent.commands import add_state_args
from agent.watch.lock import AgentLock


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="dataset name, or its id from `vip-agent status` (3, or '#3' quoted: a shell drops #...)")
    add_state_args(parser)
    parser.add_argument(
        "--wait", type=float, default=120.0,
        help="seconds to wait for the kill and the clean-up (default 120)",
    )  # fmt: skip
    parser.add_argument(
        "--discard", action="store_true",
        help="for an incomplete dataset: delete the outputs left on VIP (see LEFT_ON_VIP.txt)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    journal, ds = queries.open_dataset(state, args.name)
    result = actions.cancel(journal, ds, discard=args.discard)
    if result == "incomplete":
        print(
            f"{ds.name} is incomplete: output file(s) are still on VIP (see LEFT_ON_VIP.txt in "
            f"{ds.output_dir}). `vip-agent retry {ds.name}` fetches them once the limit allows; "
            f"`vip-agent cancel {ds.name} --discard` deletes them"
        )
        return 1
    if result == "final":
        print(f"{ds.name} is already {ds.state}")
        return 0
    if result == "cancelled":
        print(f"{ds.name}: cancelled (it was still waiting for its files; nothing was sent)")
        return 0
    pid = queries.agent_pid(state)
    if pid is not None:
        print(
            f"{ds.name}: cancel requested; the running agent (pid {pid or '?'}) is stopping it..."
        )
        stage = actions.wait_final(journal, ds.id, args.wait)
    else:
        lock = AgentLock(state)
        if not lock.acquire():  # an agent started just now: it will do it
            stage = actions.wait_final(journal, ds.id, args.wait)
        else:
            try:
                # the key_file: of agent.yaml (--config, else the per-user one) for its server
                config, _path = settings.load(args.config)
                drop = config.drop_for(ds.drop_dir) if config is not None else None
                key_file = drop.key_file if drop else settings.key_file_for(
                    config, settings.dataset_server(ds.server))
                print(f"{ds.name}: no agent is running; cancelling it here...")
                stage = actions.cancel_here(journal, ds.id, key_file, args.wait)
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
