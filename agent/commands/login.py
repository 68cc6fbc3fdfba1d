"""``vip-agent login``: check an API key against VIP and store it in the OS keyring.

The key is read without echo (or from standard input with ``--stdin``), never
from the command line, where ``ps`` and shell history would show it.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from agent.credentials import (
    DEFAULT_SERVER,
    ENV_VAR,
    keyring_backend_name,
    normalise_server_url,
    redact,
    store_api_key,
    verify_key,
)
from agent.errors import AgentError, CredentialError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CREDENTIAL = 0, 1, 2, 3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help=f"VIP portal URL (default {DEFAULT_SERVER})")
    parser.add_argument("--stdin", action="store_true",
                        help="read the key from standard input (first line) instead of prompting")
    parser.add_argument("--no-check", action="store_true",
                        help="store the key without asking the server (when it is unreachable)")


def _read_key(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().strip()
    return getpass.getpass("VIP API key (input hidden; see My Account on the VIP portal): ").strip()


def main(args: argparse.Namespace) -> int:
    server = normalise_server_url(args.server)
    if not server.startswith(("http://", "https://")):
        print(f"vip-agent: {args.server!r} is not an http(s) URL", file=sys.stderr)
        return EXIT_USAGE
    try:
        key = _read_key(args.stdin)
    except (EOFError, KeyboardInterrupt):
        print("vip-agent: no key given", file=sys.stderr)
        return EXIT_USAGE
    if not key:
        print("vip-agent: no key given (empty input)", file=sys.stderr)
        return EXIT_USAGE

    if not args.no_check:
        from agent.vip.errors import AuthError, VipError

        try:
            verify_key(server, key)
        except AuthError as err:
            print(f"vip-agent: {server} refused this API key; nothing was stored. "
                  "Copy the key again from My Account on the VIP portal.", file=sys.stderr)
            if err.detail:
                print(f"  detail: {redact(err.detail, key)}", file=sys.stderr)
            return EXIT_CREDENTIAL
        except VipError as err:
            print(f"vip-agent: cannot check the key with {server}: {redact(err.message, key)}; "
                  "nothing was stored. Retry later, or pass --no-check to store it anyway.",
                  file=sys.stderr)
            if err.detail:
                print(f"  detail: {redact(err.detail, key)}", file=sys.stderr)
            return EXIT_ERROR

    try:
        where = store_api_key(server, key)
    except CredentialError as err:
        print(f"vip-agent: the key is valid but could not be stored: {redact(err.message, key)}",
              file=sys.stderr)
        if err.detail:
            print(f"  detail: {redact(err.detail, key)}", file=sys.stderr)
        return EXIT_CREDENTIAL
    except AgentError as err:  # pragma: no cover - store_api_key raises CredentialError
        print(f"vip-agent: {redact(err.message, key)}", file=sys.stderr)
        return EXIT_ERROR

    checked = "accepted by the server and " if not args.no_check else ""
    print(f"API key {checked}stored in the OS keyring ({keyring_backend_name()}) as {where}.")
    print(f"vip-agent finds it for {server} unless a systemd credential, a key file or "
          f"{ENV_VAR} comes first. Remove it with `vip-agent logout --server {server}`.")
    del key
    return EXIT_OK

