"""``vip-agent rerun NAME|#ID``: run a finished dataset (done, failed, cancelled) again.

A new attempt with the dataset's current content (its job.yaml may have been
fixed), into a new output folder; the previous attempt's outputs stay.
"""

from __future__ import annotations

import argparse

from agent import actions, queries
from agent.commands import add_state_args


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="dataset name, or its id from `vip-agent status` (3, or '#3' quoted: a shell drops #...)")
    add_state_args(parser)


def main(args: argparse.Namespace) -> int:
    state = queries.state_dir(args.state, args.config)
    journal, ds = queries.open_dataset(state, args.name)
    ds = actions.rerun(journal, ds)
    print(f"#{ds.id} {ds.name}: queued again (attempt {ds.attempt}); "
          f"{queries.who_takes_it(state)}")
    return 0
