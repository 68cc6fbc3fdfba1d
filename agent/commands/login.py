"""``vip-agent login``: check an API key against VIP and store it in the OS keyring.

The key is read without echo (or from standard input with ``--stdin``), never
from the command line, where ``ps`` and shell history would show it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from pathlib import Path

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
from agent.paths import default_config_path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CREDENTIAL = 0, 1, 2, 3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help=f"VIP portal URL (default {DEFAULT_SERVER})")
    parser.add_argument("--stdin", action="store_true",
                        help="read the key from standard input (first line) instead of prompting")
    parser.add_argument("--no-check", action="store_true",
                        help="store the key without asking the server (when it is unreachable)")
    parser.add_argument("--key-file", type=Path, default=None, metavar="PATH",
                        help="store the key in this file (mode 600) instead of the OS keyring, for "
                             "a PC without one; then name it with key_file: in agent.yaml")


def _read_key(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        # a piped key: read it as --stdin does (getpass would warn that it cannot hide input)
        return sys.stdin.readline().strip()
    return getpass.getpass("VIP API key (input hidden; see My Account on the VIP portal): ").strip()


def default_key_file() -> Path:
    """Where ``--key-file`` is suggested: beside the per-user agent.yaml."""
    return default_config_path().parent / "api-key"


def write_key_file(path: Path, key: str) -> Path:
    """Write ``key`` to ``path`` readable by this user only (as key_file: requires); atomic."""
    path = path.expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def main(args: argparse.Namespace) -> int:
    server = normalise_server_url(args.server)
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

    if args.key_file is not None:
        try:
            path = write_key_file(args.key_file, key)
        except OSError as err:
            print(f"vip-agent: cannot write the key file {args.key_file}: {err.strerror}",
                  file=sys.stderr)
            return EXIT_CREDENTIAL
        checked = "accepted by the server and " if not args.no_check else ""
        print(f"API key {checked}stored in the key file {path} (mode 600, readable by you only).")
        print(f"Name it in agent.yaml, under defaults: or a drop folder:  key_file: {path}")
        del key
        return EXIT_OK
    try:
        where = store_api_key(server, key)
    except CredentialError as err:
        print(f"vip-agent: the key is valid but could not be stored: {redact(err.message, key)}",
              file=sys.stderr)
        if err.detail:
            print(f"  detail: {redact(err.detail, key)}", file=sys.stderr)
        print(f"The simplest way here: keep it in a key file readable by you only,\n"
              f"  vip-agent login --server {server} --key-file {default_key_file()}\n"
              "then add that path as key_file: in agent.yaml.", file=sys.stderr)  # fmt: skip
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

