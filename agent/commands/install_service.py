"""``vip-agent install-service``: write a systemd unit or a launchd plist for ``vip-agent watch``.

The unit gets this machine's paths: the running ``vip-agent`` executable, the
configuration file, and the folders named in it as the only writable places.
An existing, different file is never replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import os
import shlex
import sys
import tempfile
from pathlib import Path

from agent import service
from agent.errors import AgentError, ConfigError
from agent.paths import default_config_path

EXIT_OK, EXIT_EXISTS, EXIT_USAGE = 0, 1, 2


def configure(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--user", action="store_true",
                      help="a service of your own user (systemctl --user, LaunchAgent); default unless root")
    mode.add_argument("--system", action="store_true",
                      help="a system service running as a dedicated account (default as root)")
    parser.add_argument("--launchd", action="store_true",
                        help="write a launchd plist even when not on macOS")
    parser.add_argument("--config", type=Path, default=None,
                        help="agent.yaml the service runs with (default depends on --user/--system)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="write the file here instead of the system's unit folder")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print the file instead of writing it")
    parser.add_argument("--force", action="store_true", help="replace an existing, different file")
    parser.add_argument("--executable", default=None,
                        help="vip-agent executable the service starts (default: this one)")
    parser.add_argument("--run-as", default=None,
                        help="account of a system service (default vip-agent; launchd: the invoking user)")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_config(launchd: bool, user_mode: bool) -> Path:
    """Where the service's agent.yaml lives by default: the one ``vip-agent watch``
    reads without ``--config`` for a user service, a system-wide one otherwise."""
    if user_mode:
        return default_config_path()
    if launchd:
        return Path("/Library/Application Support/vip-agent/agent.yaml")
    return Path(service.SYSTEM_CONFIG)


def default_target_dir(launchd: bool, user_mode: bool) -> Path:
    if launchd:
        return Path.home() / "Library" / "LaunchAgents" if user_mode else Path("/Library/LaunchDaemons")
    if user_mode:
        xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(xdg) / "systemd" / "user"
    return Path("/etc/systemd/system")


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _writable_paths(config_path: Path) -> tuple[list[str], str | None]:
    """Folders from the config, or a warning saying why there are none."""
    if not config_path.exists():
        return [], f"{config_path} does not exist yet"
    try:
        config = service.load_agent_config(config_path)
    except AgentError as err:
        return [], f"{config_path} is not valid: {err}"
    return service.config_write_paths(config), None


def _next_steps(target: Path, launchd: bool, user_mode: bool, spec: service.ServiceSpec) -> list[str]:
    if launchd:
        domain = "gui/$(id -u)" if user_mode else "system"
        sudo = "" if user_mode else "sudo "
        return [
            f"{sudo}launchctl bootstrap {domain} {shlex.quote(str(target))}",
            f"{sudo}launchctl kickstart -k {domain}/{service.LAUNCHD_LABEL}",
        ]
    name = service.UNIT_NAME.removesuffix(".service")
    if user_mode:
        return [
            "systemctl --user daemon-reload && systemctl --user enable --now " + name,
            "loginctl enable-linger $USER   # keep it running when you are logged out",
        ]
    return [
        f"sudo useradd --system --home-dir {service.SYSTEM_STATE} --shell /usr/sbin/nologin "
        f"{spec.service_user}   # once",
        f"sudo install -m 0600 -o root /dev/stdin {service.SYSTEM_KEY_FILE}   # paste the key, then Ctrl-D",
        f"sudo systemctl daemon-reload && sudo systemctl enable --now {name}",
    ]


def main(args: argparse.Namespace) -> int:
    launchd = bool(args.launchd) or sys.platform == "darwin"
    user_mode = bool(args.user) or (not args.system and not _is_root())
    config_path = (args.config or default_config(launchd, user_mode)).expanduser().absolute()
    command = [os.path.abspath(args.executable)] if args.executable else service.agent_command()

    rw_paths, why_not = _writable_paths(config_path)
    if why_not is not None:
        print(f"warning: {why_not}; the unit lists no drop or output folder as writable. "
              "Run install-service again once agent.yaml is ready.", file=sys.stderr)
        if not launchd and not user_mode:
            rw_paths = [service.SYSTEM_DATA_ROOT, service.SYSTEM_STATE]

    if launchd:
        spec = service.ServiceSpec(
            command=command,
            config=str(config_path),
            read_write_paths=rw_paths,
            user_mode=user_mode,
            service_user=args.run_as or os.environ.get("SUDO_USER") or getpass.getuser(),
            # launchd means macOS: its per-user log folder (platformdirs' user_log_dir there)
            log_dir=str(Path.home() / "Library" / "Logs" / "vip-agent") if user_mode else "/Library/Logs/vip-agent",
            working_dir=str(config_path.parent),
        )
        data = service.render_launchd_plist(spec)
        filename = f"{service.LAUNCHD_LABEL}.plist"
    else:
        spec = service.ServiceSpec(
            command=command,
            config=str(config_path),
            read_write_paths=rw_paths,
            user_mode=user_mode,
            service_user=args.run_as or service.SERVICE_USER,
        )
        data = service.render_systemd_unit(spec).encode()
        filename = service.UNIT_NAME
        real = os.path.realpath(command[0])
        if not user_mode and any(real.startswith(h + "/") for h in ("/root", "/home")):
            print(f"warning: {real} is inside a home folder; the {spec.service_user} account may not "
                  "be allowed to run it. Install vip-agent in a shared virtualenv such as /opt/vip-agent "
                  "(docs/operations.md).", file=sys.stderr)

    if args.print_only:
        sys.stdout.write(data.decode())
        return EXIT_OK

    target_dir = (args.output_dir or default_target_dir(launchd, user_mode)).expanduser()
    target = target_dir / filename
    if target.exists():
        old = target.read_bytes()
        if old == data:
            print(f"{target} is already up to date.")
            return EXIT_OK
        if not args.force:
            diff = difflib.unified_diff(
                old.decode(errors="replace").splitlines(keepends=True),
                data.decode().splitlines(keepends=True),
                fromfile=str(target), tofile="new",
            )
            sys.stderr.writelines(diff)
            print(f"vip-agent: {target} exists and differs (diff above); "
                  "pass --force to replace it.", file=sys.stderr)
            return EXIT_EXISTS
    try:
        _write_atomically(target, data)
    except PermissionError:
        raise ConfigError(
            f"cannot write {target}: permission denied",
            detail="run with sudo for --system, or use --user or --output-dir",
        ) from None
    if launchd and spec.log_dir:
        try:
            Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"warning: cannot create the log folder {spec.log_dir}: {exc}", file=sys.stderr)

    print(f"wrote {target}")
    print(f"  runs: {' '.join(shlex.quote(a) for a in spec.argv())}")
    if rw_paths and not launchd:
        print(f"  writable: {' '.join(rw_paths)}")
    print("Next:")
    for step in _next_steps(target, launchd, user_mode, spec):
        print(f"  {step}")
    return EXIT_OK
