"""``vip-agent local-server``: serve a VIP-compatible REST API on this machine.

The first stdout line is the portal base URL (REST under ``/rest/``). Without
``--api-key`` the key is ``VIP_API_KEY`` from the environment, or a generated
one printed on the second line. Serves until SIGINT/SIGTERM, then exits 0.
``--profile production`` behaves like the real VIP (docs/localvip.md); when a redirect
listener runs (``redirect_port``), its address is written to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from agent.errors import ConfigError
from agent.localvip.faults import PROFILES, FaultSpec
from agent.localvip.server import LocalVip


def default_root() -> Path:
    """``$XDG_DATA_HOME/vip-agent/localvip`` (default ``~/.local/share/vip-agent/localvip``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vip-agent" / "localvip"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default)")
    parser.add_argument(
        "--root", type=Path, default=None,
        help="storage root: /vip/Home of user@localvip is ROOT/user_localvip, server state in "
        "ROOT/.localvip (default: $XDG_DATA_HOME/vip-agent/localvip, i.e. ~/.local/share/vip-agent/localvip)",
    )
    parser.add_argument(
        "--api-key", action="append", metavar="KEY",
        help="accepted API key; repeat for more users (key N belongs to userN@localvip). "
        "Default: $VIP_API_KEY, else a generated key printed on the second stdout line",
    )
    parser.add_argument("--password", default="localvip",
                        help="password of user@localvip for POST /rest/authenticate (default 'localvip')")
    parser.add_argument("--pipelines", type=Path, default=None, metavar="DIR",
                        help="extra Boutiques descriptors (*.json) besides the built-ins")
    parser.add_argument("--max-running", type=int, default=1, metavar="N",
                        help="running executions allowed per user before error 2001 (default 1)")
    parser.add_argument("--profile", default="ideal", choices=sorted(PROFILES),
                        help="'ideal' answers at once (default); 'production' is as slow and strict as "
                        "the real VIP: 2 s staged transfers, 20 at once platform-wide (45 s wait, then "
                        "400 8000), slow /results, engine refusals, an http listener redirecting (301), "
                        "late landings, GASW job statuses (see docs/localvip.md); --faults overrides its values")
    parser.add_argument("--groups", action="append", default=[], metavar="NAME:USER1,USER2",
                        help="create the group folder '/vip/NAME (group)' readable and writable by these users "
                        "(user, user2... or their emails); repeatable")
    parser.add_argument("--faults", default=None, metavar="SPEC",
                        help="fault injection, e.g. 'error_rate=0.1,drop_rate=0.05,latency=0.2,"
                        "transfer_timeout=0.1,capacity=0.2,unknown_blip=0.3,delete_delay=2,"
                        "legacy_dates,legacy_defaults,seed=1,match=REGEX,methods=GET|PUT,times=N'; production "
                        "behaviour alone: staging_delay=S, platform_transfers=N, transfer_wait=S, results_delay=S, "
                        "launch_refusal=RATE, launch_refusal_code=2003, redirect_port=PORT, late_landing=RATE, "
                        "list_limit=N, job_statuses=RATE (default off)")
    parser.add_argument("--max-download", type=int, default=15_000_000, metavar="BYTES",
                        help="largest file served by action=content, published as maxSizeDirectTransfer "
                        "(default 15000000)")
    parser.add_argument("--delete-delay", type=float, default=0.0, metavar="S",
                        help="seconds a deleted path stays visible (VIP deletes asynchronously; default 0)")
    parser.add_argument("--stats", type=Path, default=None, metavar="FILE",
                        help="write request statistics (counts, peak requests per second, staged "
                        "transfers' peak and timeouts) to FILE as JSON when the server stops")
    parser.add_argument("--log-level", default="WARNING", help="server log level on stderr (default WARNING)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=str(args.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    keys = args.api_key or None
    generated = False
    from agent.credentials import environ  # VIP_API_KEY is taken out of os.environ at start

    if not keys and environ().get("VIP_API_KEY"):
        keys = [environ()["VIP_API_KEY"].strip()]
    if not keys:
        generated = True
    faults = FaultSpec.parse(args.faults, args.profile) if args.faults else None
    groups = parse_groups(args.groups)
    root = args.root or default_root()
    try:
        server = LocalVip(
            root, host=args.host, port=args.port, api_keys=keys, pipelines_dir=args.pipelines,
            max_running=args.max_running, faults=faults, max_download=args.max_download,
            delete_delay=args.delete_delay, password=args.password, profile=args.profile,
            groups=groups,
        )
        server.start()
    except (OSError, ValueError) as err:
        raise ConfigError(f"the local VIP server could not start: {err}", detail=str(err)) from None
    if server.redirect_url:
        print(f"localvip: {server.redirect_url} redirects (301) to {server.url}", file=sys.stderr, flush=True)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(server.url, flush=True)
    if generated:
        print(server.api_key, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        if args.stats is not None:
            _write_stats(args.stats, server.stats_snapshot())
    return 0


def _write_stats(path: Path, data: dict[str, object]) -> None:
    import json

    from agent.fsutil import write_atomic

    try:
        write_atomic(path, json.dumps(data, indent=1) + "\n")
    except OSError as err:
        print(f"localvip: could not write the statistics to {path}: {err}", file=sys.stderr)


def parse_groups(specs: list[str]) -> dict[str, list[str]]:
    """``["NAME:user1,user2", ...]`` -> ``{"NAME": ["user1", "user2"]}``."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, members = spec.rpartition(":")
        users = [m.strip() for m in members.split(",") if m.strip()]
        if not sep or not name.strip() or not users:
            raise ConfigError(f"bad --groups value {spec!r}", detail="expected NAME:user1,user2")
        groups.setdefault(name.strip(), []).extend(users)
    return groups
