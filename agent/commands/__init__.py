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
