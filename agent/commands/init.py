"""``vip-agent init``: a first agent.yaml, its folders, the API key, then ``doctor``.

Asks for each value (Enter keeps the default shown) on a terminal; with
``--non-interactive`` (or without a terminal) takes the flags and defaults.
Never replaces an existing agent.yaml without ``--force`` (the old one is then
kept as a ``.bak`` file).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from agent.config import DEFAULT_SETTLE, default_config_path
from agent.credentials import find_api_key, normalise_server_url, redact, store_api_key, verify_key
from agent.errors import AgentError, CredentialError
from agent.initconfig import InitChoices, render, write_config
from agent.paths import DEFAULT_SERVER, default_state_dir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"where to write agent.yaml (default {default_config_path()})",
    )
    parser.add_argument(
        "--drop",
        type=Path,
        default=None,
        help="drop folder the instrument writes datasets to (default ~/vip-agent/drop)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder receiving the results (default ~/vip-agent/results)",
    )
    parser.add_argument("--server", default=None, help=f"VIP portal URL (default {DEFAULT_SERVER})")
    parser.add_argument(
        "--rule",
        choices=("settle", "marker", "manifest"),
        default=None,
        help="when a dataset counts as complete (default settle)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help=f"seconds without change for --rule settle (default {DEFAULT_SETTLE:g})",
    )
    parser.add_argument(
        "--marker", default=None, help="marker file name for --rule marker (default READY)"
    )
    parser.add_argument(
        "--max-running",
        type=int,
        default=None,
        help="executions running at once on VIP (default 1)",
    )
    parser.add_argument(
        "--state", type=Path, default=None, help="state folder (default: the per-user one)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing agent.yaml (the old one is kept as agent.yaml.bak-TIME)",
    )
    parser.add_argument(
        "-y",
        "--non-interactive",
        action="store_true",
        help="ask nothing: flags and defaults only (scripted installs)",
    )
    parser.add_argument(
        "--no-doctor", action="store_true", help="do not run `vip-agent doctor` at the end"
    )


def _ask(question: str, default: str) -> str:
    answer = input(f"{question} [{default}]: ").strip()
    return answer or default


def _choices(args: argparse.Namespace, interactive: bool) -> InitChoices:
    home = Path.home() / "vip-agent"
    values = {
        "drop": str(args.drop or home / "drop"),
        "output": str(args.output or home / "results"),
        "server": args.server or DEFAULT_SERVER,
        "rule": args.rule or "settle",
        "settle": f"{args.settle if args.settle is not None else DEFAULT_SETTLE:g}",
        "marker": args.marker or "READY",
        "max_running": str(args.max_running or 1),
    }
    if interactive:
        print("vip-agent init: press Enter to keep the value in brackets.")
        values["drop"] = _ask(
            "Drop folder (the instrument writes one folder per dataset here)", values["drop"]
        )
        values["output"] = _ask("Output folder (results are mirrored here)", values["output"])
        values["server"] = _ask("VIP portal URL", values["server"])
        values["rule"] = _ask(
            "When is a dataset complete: settle, marker or manifest", values["rule"]
        )
        if values["rule"] == "settle":
            values["settle"] = _ask(
                "Seconds without change before a dataset is taken", values["settle"]
            )
        if values["rule"] == "marker":
            values["marker"] = _ask("Marker file the instrument writes last", values["marker"])
        values["max_running"] = _ask("Executions running at once on VIP", values["max_running"])
    if values["rule"] not in ("settle", "marker", "manifest"):
        raise AgentError(f"the rule must be settle, marker or manifest, not {values['rule']!r}")
    try:
        settle, max_running = float(values["settle"]), int(values["max_running"])
    except ValueError as err:
        raise AgentError(f"not a number: {err}") from None
    server = normalise_server_url(values["server"])
    if not server.startswith(("http://", "https://")):
        raise AgentError(f"the VIP portal URL must start with http:// or https://, not {server!r}")
    return InitChoices(
        drop=Path(values["drop"]).expanduser().resolve(),
        output=Path(values["output"]).expanduser().resolve(),
        server=server, rule=values["rule"], settle_seconds=settle, marker=values["marker"],
        max_running=max_running, state=args.state.expanduser().resolve() if args.state else None,
    )  # fmt: skip


def _offer_login(server: str, interactive: bool) -> bool:
    """Say where the key was found; if nowhere, offer to store one (interactive) or say how.
    True when a key is there at the end."""
    try:
        cred = find_api_key(server)
    except CredentialError:
        pass
    else:
        print(f"API key for {server}: found ({cred.source})")
        return True
    if not interactive:
        print(f"no API key for {server} yet: run `vip-agent login --server {server}` "
              "(or see docs/operations.md for key files and systemd credentials)")  # fmt: skip
        return False
    if _ask(f"No API key found for {server}. Log in now (y/n)?", "y").lower() not in ("y", "yes"):
        print(f"later: `vip-agent login --server {server}`")
        return False
    key = getpass.getpass("VIP API key (input hidden; see My Account on the VIP portal): ").strip()
    if not key:
        print(f"no key given; later: `vip-agent login --server {server}`")
        return False
    from agent.vip.errors import AuthError, VipError

    try:
        verify_key(server, key)
    except AuthError:
        print(
            f"{server} refused this key; nothing was stored. Later: `vip-agent login --server {server}`"
        )
        return False
    except VipError as err:
        print(f"could not check the key ({redact(err.message, key)}); nothing was stored. "
              f"Later: `vip-agent login --server {server}`")  # fmt: skip
        return False
    try:
        where = store_api_key(server, key)
    except CredentialError as err:  # no usable keyring (a headless PC): say the other ways
        print(f"the key is valid but could not be stored: {redact(err.message, key)}")
        return False
    print(f"API key accepted and stored in the OS keyring as {where}")
    return True


def main(args: argparse.Namespace) -> int:
    interactive = not args.non_interactive and sys.stdin.isatty()
    path = (args.config or default_config_path()).expanduser().resolve()
    if path.exists() and not args.force:  # before asking anything
        write_config(path, "", force=False)
    choices = _choices(args, interactive)
    for folder in (choices.drop, choices.output, choices.state or default_state_dir()):
        folder.mkdir(parents=True, exist_ok=True)
        print(f"folder ready: {folder}")
    backup = write_config(path, render(choices), force=args.force)
    if backup is not None:
        print(f"the previous configuration is kept as {backup}")
    print(f"wrote {path}")
    has_key = _offer_login(choices.server, interactive)
    if args.no_doctor:
        return 0
    print(f"\nvip-agent doctor --config {path}", flush=True)
    # in this process, not a child: the API key never goes into a child's environment
    from agent.doctor import diagnose, summary

    sys.stdout.flush()
    # a key still to be given (a scripted install logs in later) is a warning, not a failure
    report = diagnose(config_path=path, server=None, out=sys.stdout, key_later=not has_key)
    returncode = summary(report, strict=False)
    if returncode == 0 and not has_key:
        print(f"\n{path} is written; once the API key is given (`vip-agent login --server "
              f"{choices.server}`), `vip-agent watch --config {path}` runs it")  # fmt: skip
    elif returncode == 0:
        print(f"\nready: `vip-agent watch --config {path}` runs it now; "
              "`vip-agent install-service --user` makes it a service")  # fmt: skip
    else:
        print(
            f"\n{path} is written; fix what doctor reports above, then run `vip-agent doctor` again"
        )
    return returncode
