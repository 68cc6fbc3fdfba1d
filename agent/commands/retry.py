"""``vip-agent retry NAME``: run a failed or cancelled dataset again.

The dataset goes back to stage ``validate`` (attempts + 1) with its current
content; a running agent notices within a few seconds (it polls the journal),
otherwise the next ``vip-agent watch`` takes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.commands.status import add_state_args, agent_pid, find_dataset, open_journal, state_dir
from agent.errors import AgentError
from agent.journal import RETRYABLE_STAGES
from agent.watch.after import error_file
from agent.watch.readiness import current_fingerprint


class CannotRetry(AgentError):
    exit_code = 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="dataset name (or #id from `vip-agent status`)")
    add_state_args(parser)


def main(args: argparse.Namespace) -> int:
    state = state_dir(args)
    journal = open_journal(state)
    if journal is None:
        raise CannotRetry(f"no journal in {state}: nothing has run there yet")
    ds = find_dataset(journal, args.name)
    if ds.stage not in RETRYABLE_STAGES:
        raise CannotRetry(
            f"{ds.name} is {ds.state}; only a failed, incomplete or cancelled dataset can be "
            "retried"
        )
    path = Path(ds.path)
    fingerprint = current_fingerprint(path)
    if fingerprint is None:
        raise CannotRetry(f"{ds.name}: the dataset {path} no longer exists; drop it again instead")
    report = error_file(path)
    if report.exists():
        report.unlink()
    # the content may have been fixed: take it as it is now
    journal.reset_for_retry(ds.id, fingerprint=fingerprint)
    pid = agent_pid(state)
    if pid is not None:
        print(f"{ds.name}: queued again; the running agent (pid {pid or '?'}) takes it within seconds")
    else:
        print(f"{ds.name}: queued again; no agent is running: start `vip-agent watch` to run it")
    return 0
