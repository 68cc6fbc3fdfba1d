"""One module per ``vip-agent`` command (commands never import each other).

Argument helpers shared by several commands live here, not in a command.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_state_args(parser: argparse.ArgumentParser) -> None:
    """``--state`` and ``--config``: which state folder (journal) a command reads."""
    parser.add_argument("--state", type=Path, help="state folder (default: from --config, or the per-user one)")
    parser.add_argument("--config", type=Path, help="agent.yaml whose 'state' to use")


# `pause` and `resume` share their arguments and their work (commands never import each other)
def pause_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """The arguments ``pause`` and ``resume`` share."""
    parser.add_argument(
        "name", nargs="?", metavar="NAME|#ID",
        help=f"one dataset (name, or id: 3 or '#3' quoted) to {verb}",
    )  # fmt: skip
    parser.add_argument("--drop", metavar="PATH", help=f"{verb} every dataset of this drop folder")
    parser.add_argument(
        "--all", action="store_true",
        help=f"{verb} the whole agent (the default with no argument)"
        + ("; `resume --all` lifts every pause, also of drop folders and datasets" if verb == "resume" else ""),
    )  # fmt: skip
    add_state_args(parser)


def pause_command(action: str, args: argparse.Namespace) -> int:
    """``vip-agent pause|resume``: pause or resume what the arguments name; prints one sentence."""
    from agent import queries
    from agent.config import load_config
    from agent.journal import Journal
    from agent.pause import CannotPause, drop_target, request, who

    given = [x for x in (args.name, args.drop, args.all or None) if x]
    if len(given) > 1:
        raise CannotPause(f"give one of NAME|#ID, --drop PATH or --all to {action}, not several")
    state = queries.state_dir(args.state, args.config)
    journal = queries.open_journal(state)
    if journal is None and action == "pause":  # paused before the agent ever ran: it starts paused
        journal = Journal.in_state_dir(state)
    if journal is None:
        raise queries.NotFound(f"no journal in {state}: no agent has run there yet, nothing to {action}")
    dataset = drop = None
    if args.name:
        dataset = queries.find_dataset(journal, args.name)
    elif args.drop:
        configured: list[str] = []
        if args.config:
            configured = [str(d.path) for d in load_config(args.config).drops]
        drop = drop_target(journal, args.drop, configured)
    message = request(journal, action, dataset=dataset, drop=drop, by=who(), via="command line")
    pid = queries.agent_pid(state)
    then = (
        f"the running agent (pid {pid or '?'}) applies it within seconds" if pid is not None
        else "no agent is running: it applies when `vip-agent watch` starts"
    )
    print(f"{message}; {then}")
    return 0
