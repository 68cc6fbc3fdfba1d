"""``vip-agent watch``: run the drop-folder service (:mod:`agent.daemon`) in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

from agent import settings
from agent.config import (
    AgentConfig,
    HttpSettings,
    config_from_args,
    default_config_path,
    load_config,
    parse_listen,
)
from agent.daemon import WatchService
from agent.errors import ConfigError
from agent.logs import setup_logging


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("drop", nargs="*", help="drop folder(s) to watch (or use --config)")
    parser.add_argument("--config", type=Path, help=f"agent.yaml (default {default_config_path()})")
    parser.add_argument("--server", help="VIP portal URL (without --config)")
    parser.add_argument("--output", type=Path, help="folder receiving the results (without --config)")
    parser.add_argument("--state", type=Path, help="state folder holding the journal")
    parser.add_argument("--settle", type=float, help="quiet seconds before a dataset counts as complete")
    parser.add_argument("--rule", choices=("settle", "marker", "manifest"), help="readiness rule")
    parser.add_argument("--marker", help="marker file name for --rule marker (default READY)")
    parser.add_argument("--files", metavar="PATTERN", help="one dataset per file matching PATTERN")
    parser.add_argument("--observer", choices=("auto", "native", "polling"))
    parser.add_argument("--log-format", choices=("text", "json"), default=None)
    parser.add_argument(
        "--http", metavar="[HOST:]PORT", type=_listen,
        help="serve the status page, its JSON API and /metrics (host 127.0.0.1 unless given; "
        "port 0 picks a free one; the URL goes to <state>/http-url)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT, e.g. 127.0.0.1:8490, not {text!r}") from None


def _with_http(config: AgentConfig, listen: tuple[str, int] | None) -> AgentConfig:
    if listen is None:
        return config
    base = config.http or HttpSettings()
    return replace(config, http=replace(base, host=listen[0], port=listen[1]))


def build_config(args: argparse.Namespace) -> AgentConfig:
    """The configuration from ``--config``/the default file, or from the arguments."""
    if args.drop and args.config:
        raise ConfigError("give either a drop folder or --config, not both")
    if args.drop:
        return _with_http(config_from_args(
            args.drop, server=args.server, output=args.output, state=args.state,
            settle=args.settle, rule=args.rule, marker=args.marker, observer=args.observer,
            datasets="files" if args.files else None, pattern=args.files,
            log_format=args.log_format or "text",
        ), getattr(args, "http", None))  # fmt: skip
    path = settings.find_config(args.config)  # the same agent.yaml every command reads
    if path is None:
        raise ConfigError(
            f"nothing to watch: give a drop folder (vip-agent watch DROP --server URL --output DIR) "
            f"or a configuration file (--config, default {default_config_path()})"
        )
    config = load_config(path, settle=args.settle)
    state = args.state or os.environ.get(settings.ENV_STATE)  # flags, then the environment
    if state:
        config = replace(config, state=Path(state).expanduser().resolve())
    if args.log_format:
        config = replace(config, log_format=args.log_format)
    return _with_http(config, getattr(args, "http", None))


def main(args: argparse.Namespace) -> int:
    config = build_config(args)
    redact = setup_logging(config.log_format, level=logging.DEBUG if args.verbose else logging.INFO)
    from agent.notify import Notifier

    service = WatchService(config, redact=redact)
    notifier = Notifier(alive=service.alive)
    notifier.start()
    try:
        return service.run(notifier=notifier)
    finally:
        notifier.stop()
