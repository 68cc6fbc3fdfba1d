"""``vip-agent check [NAME|#ID|--all] [--json]``: finished datasets' outputs against the journal.

Reads the journal and the output folders only; changes nothing. One line per problem
(``NAME #ID: missing: ...`` / ``changed: ...``), then a summary. Exit status: 0 when
everything matches, 1 when something is missing or changed, 2 for a usage error, an
unknown dataset or a state folder without a journal.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent import queries
from agent.check import check, finished
from agent.commands import add_state_args
from agent.errors import AgentError

EXIT_MATCHES, EXIT_DIFFERS, EXIT_USAGE = 0, 1, 2


class UsageError(AgentError):
    """A dataset that cannot be named, or nothing to read."""

    exit_code = EXIT_USAGE


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", nargs="?", metavar="NAME|#ID",
        help="one dataset (name, or id: 3 or '#3' quoted); without it, every finished dataset",
    )  # fmt: skip
    parser.add_argument("--all", action="store_true", help="every finished dataset (the default)")
    add_state_args(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per dataset, in a list")


def main(args: argparse.Namespace) -> int:
    if args.name and args.all:
        raise UsageError("give a dataset NAME|#ID or --all, not both")
    state = queries.state_dir(args.state, args.config)
    journal = queries.open_journal(state)
    if journal is None:
        raise UsageError(f"no journal in {state}: nothing has run there yet")
    if args.name:
        try:
            datasets = [queries.find_dataset(journal, args.name)]
        except queries.NotFound as err:
            raise UsageError(err.message) from None
    else:
        datasets = finished(journal)
    results = check(journal, datasets)
    problems = sum(len(r.problems) for r in results)
    if args.json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_DIFFERS if problems else EXIT_MATCHES
    for r in results:
        if r.skipped:
            print(f"{r.name} #{r.id}: not checked ({r.skipped})")
        for p in r.problems:
            print(f"{r.name} #{r.id}: {p.kind}: {p.message}")
    checked = [r for r in results if not r.skipped]
    files = sum(r.files for r in checked)
    left = sum(r.left_on_vip for r in checked)
    tail = f"; {left} output(s) left on VIP by incomplete datasets (see their LEFT_ON_VIP.txt)" if left else ""
    if problems:
        bad = sum(1 for r in checked if r.problems)
        print(f"{problems} problem(s) in {bad} of {len(checked)} dataset(s) checked ({files} mirrored output(s)){tail}",
              file=sys.stderr)  # fmt: skip
        return EXIT_DIFFERS
    if not checked:
        print("nothing to check: no done or incomplete dataset", file=sys.stderr)
        return EXIT_MATCHES
    print(f"everything matches: {len(checked)} dataset(s), {files} mirrored output(s){tail}", file=sys.stderr)
    return EXIT_MATCHES
