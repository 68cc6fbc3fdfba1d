"""``vip-agent pause [NAME|#ID|--drop PATH|--all]``: hold datasets until ``vip-agent resume``.

With no argument (or ``--all``) the whole agent pauses. The pause is written to the
journal, so it holds across restarts; a running agent applies it within about 2 s. What
a paused dataset does and does not do: ``agent/pause.py`` and docs/operations.md.
"""

from __future__ import annotations

import argparse

from agent.commands import pause_arguments, pause_command


def configure(parser: argparse.ArgumentParser) -> None:
    pause_arguments(parser, "pause")


def main(args: argparse.Namespace) -> int:
    return pause_command("pause", args)
