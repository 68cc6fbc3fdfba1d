"""``vip-agent doctor``: check that the agent can run here, and say how to fix what cannot.

The checks live in :mod:`agent.doctor` (``init`` runs them too). Exit status: 0 when
nothing failed (warnings allowed unless ``--strict``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.credentials import DEFAULT_SERVER
from agent.doctor import DEFAULT_MIN_FREE_GB, diagnose, summary


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="agent.yaml to check (default: the user's, else /etc/vip-agent/agent.yaml)")
    parser.add_argument("--server", default=None,
                        help=f"check this VIP server instead of the configured ones (default {DEFAULT_SERVER})")
    parser.add_argument("--min-free-gb", type=float, default=DEFAULT_MIN_FREE_GB,
                        help=f"warn when less free space than this (default {DEFAULT_MIN_FREE_GB:g})")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    # `vip-agent init` without a key yet: a key still to be given is a warning, not a failure
    parser.add_argument("--key-later", action="store_true", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    report = diagnose(config_path=args.config, server=args.server, out=sys.stdout,
                      min_free_gb=args.min_free_gb, key_later=args.key_later)  # fmt: skip
    return summary(report, strict=args.strict)
