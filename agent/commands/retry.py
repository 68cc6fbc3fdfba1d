"""``vip-agent retry NAME|#ID``: run a failed or cancelled dataset again (``--again``: any finished one).

The dataset goes back to stage ``validate`` (attempts + 1) with its current
content; a running agent notices within a few seconds (it polls the journal),
otherwise the next ``vip-agent watch`` takes it. An ``incomplete`` dataset goes
back to ``mirror`` instead: only the outputs left on VIP are fetched, then VIP is
cleaned (``vip-agent run DATASET`` does it at once when no agent runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent import actions, queries
from agent.commands import add_state_args
from agent.journal import Dataset, Journal
from agent.leftovers import left_on_vip


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="dataset name, or its id from `vip-agent status` (3, or '#3' quoted: a shell drops #...)")
    add_state_args(parser)
    parser.add_argument(
        "--again", action="store_true",
        help="also a dataset that is done: run it again as a new attempt (same as `vip-agent rerun`)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    journal, ds = queries.open_dataset(state, args.name)
    if ds.stage == "incomplete" and not getattr(args, "again", False):
        return _fetch_left(journal, ds, state)
    ds = actions.rerun(journal, ds) if getattr(args, "again", False) else actions.retry(journal, ds)
    print(f"#{ds.id} {ds.name}: queued again (attempt {ds.attempt}); "
          f"{queries.who_takes_it(state)}")
    return 0


def _fetch_left(journal: Journal, ds: Dataset, state: Path) -> int:
    """An incomplete dataset: only what was left on VIP is fetched."""
    count = len(left_on_vip(journal, ds.id))
    ds = actions.retry(journal, ds)
    then = queries.who_takes_it(
        state, f"`vip-agent run {ds.path}` fetches them now (or start `vip-agent watch`)"
    )
    print(f"#{ds.id} {ds.name}: queued to fetch the {count} output file(s) left on VIP; {then}")
    return 0
