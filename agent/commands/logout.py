"""``vip-agent logout``: remove the API key stored in the OS keyring for a server."""

from __future__ import annotations

import argparse
import sys

from agent.credentials import (
    DEFAULT_SERVER,
    ENV_VAR,
    KEYRING_SERVICE,
    delete_api_key,
    normalise_server_url,
)
from agent.credentials import environ as secret_environ
from agent.errors import CredentialError

EXIT_OK, EXIT_USAGE, EXIT_CREDENTIAL = 0, 2, 3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help=f"VIP portal URL (default {DEFAULT_SERVER})")


def main(args: argparse.Namespace) -> int:
    server = normalise_server_url(args.server)
    try:
        removed = delete_api_key(server)
    except CredentialError as err:
        print(f"vip-agent: {err}", file=sys.stderr)
        if err.detail:
            print(f"  detail: {err.detail}", file=sys.stderr)
        return EXIT_CREDENTIAL
    if removed:
        print(f"Removed the API key for {server} from the OS keyring ({KEYRING_SERVICE}/{server}).")
    else:
        print(f"No API key was stored for {server} in the OS keyring; nothing to remove.")
    if secret_environ().get(ENV_VAR):
        print(f"note: {ENV_VAR} is still set in this environment and still provides a key.")
    return EXIT_OK
