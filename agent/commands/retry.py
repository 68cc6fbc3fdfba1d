"""``vip-agent retry NAME|#ID``: run a failed or cancelled dataset again (``--again``: any finished one).

The dataset goes back to stage ``validate`` (attempts + 1) with its current
content; a running agent notices within a few seconds (it polls the journal),
otherwise the next ``vip-agent watch`` takes it.
"""

from __future__ import annotations

import argparse

from agent import actions, queries
from agent.commands import add_state_args


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="dataset name, or #ID as `vip-agent status` shows it")
    add_state_args(parser)
    parser.add_argument(
        "--again", action="store_true",
        help="also a dataset that is done: run it again as a new attempt (same as `vip-agent rerun`)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    journal = queries.open_journal(state)
    if journal is None:
        raise actions.CannotRetry(f"no journal in {state}: nothing has run there yet")
    ds = queries.find_dataset(journal, args.name)
    ds = actions.rerun(journal, ds) if getattr(args, "again", False) else actions.retry(journal, ds)
    pid = queries.agent_pid(state)
    who = f"#{ds.id} {ds.name}"
    if pid is not None:
        print(f"{who}: queued again (attempt {ds.attempts + 1}); the running agent "
              f"(pid {pid or '?'}) takes it within seconds")  # fmt: skip
    else:
        print(f"{who}: queued again (attempt {ds.attempts + 1}); no agent is running: "
              "start `vip-agent watch` to run it")  # fmt: skip
    return 0
