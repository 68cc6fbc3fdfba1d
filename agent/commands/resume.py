"""``vip-agent resume [NAME|#ID|--drop PATH|--all]``: lift a pause made by ``vip-agent pause``.

With no argument (or ``--all``) every pause is lifted: the agent's, the drop folders'
and the datasets'. A dataset resumes where it stopped (a transfer from the file it was
sending); a running agent picks it up within about 2 s.
"""

from __future__ import annotations

import argparse

from agent.commands import pause_arguments, pause_command


def configure(parser: argparse.ArgumentParser) -> None:
    pause_arguments(parser, "resume")


def main(args: argparse.Namespace) -> int:
    return pause_command("resume", args)
