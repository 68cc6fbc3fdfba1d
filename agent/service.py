"""Render the systemd units and the launchd plist that run ``vip-agent watch``.

The Python templates here are the single source: ``systemd/vip-agent.service``,
``systemd/user/vip-agent.service`` and ``launchd/fr.insalyon.creatis.vip-agent.plist``
in the repository are these renderings with default paths (a test keeps them
equal; ``python -m agent.service DIR`` writes them again). ``vip-agent
install-service`` renders them with this machine's paths.
"""

from __future__ import annotations

import os
import plistlib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

#: systemd unit name (system and user units share it)
UNIT_NAME = "vip-agent.service"
#: launchd label, reverse-DNS of the VIP team
LAUNCHD_LABEL = "fr.insalyon.creatis.vip-agent"
#: dedicated account of the system service
SERVICE_USER = "vip-agent"

SYSTEM_EXECUTABLE = "/usr/local/bin/vip-agent"
SYSTEM_CONFIG = "/etc/vip-agent/agent.yaml"
SYSTEM_KEY_FILE = "/etc/vip-agent/api-key"
#: the shipped system unit's writable data tree (drop and output folders below it)
SYSTEM_DATA_ROOT = "/srv/vip-agent"
#: StateDirectory=vip-agent gives this to the system service
SYSTEM_STATE = "/var/lib/vip-agent"

#: prefixes ProtectHome= hides from a system service
_HOME_PREFIXES = ("/home", "/root", "/run/user")
#: prefixes PrivateTmp= replaces with the service's own
_TMP_PREFIXES = ("/tmp", "/var/tmp")  # noqa: S108 - matching paths, not creating files


@dataclass
class ServiceSpec:
    """What a rendered service runs and may write."""

    #: the command that starts the agent: ``[vip-agent]`` or ``[python, -m, agent]``
    command: list[str]
    config: str
    #: folders the service writes (drop, output, state); the rest of the system is read-only
    read_write_paths: list[str] = field(default_factory=list)
    #: True: a user service (``systemctl --user``, LaunchAgent); False: system (dedicated user)
    user_mode: bool = False
    #: account the system service runs as
    service_user: str = SERVICE_USER
    #: systemd WatchdogSec=: the agent pings at half of it
    watchdog_sec: int = 120
    restart_sec: int = 10
    #: launchd only: where stdout/stderr go and where the job runs
    log_dir: str = ""
    working_dir: str = ""
    #: keep ``%`` specifiers (``%h``, ``%E``) as systemd specifiers instead of escaping them
    specifiers: bool = False

    def argv(self) -> list[str]:
        return [*self.command, "watch", "--config", self.config]


# --------------------------------------------------------------------------- config view


class DropFolderView(Protocol):
    """What install-service and doctor read from one drop folder (``agent.config.DropConfig``)."""

    @property
    def path(self) -> Path: ...
    @property
    def server(self) -> str: ...
    @property
    def output(self) -> Path: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def observer(self) -> str: ...
    def own_folders(self) -> list[Path]: ...


class AgentConfigView(Protocol):
    """What install-service and doctor read from ``agent.config.AgentConfig``."""

    @property
    def drops(self) -> Sequence[DropFolderView]: ...
    @property
    def state(self) -> Path: ...


def load_agent_config(path: Path) -> AgentConfigView:
    """``agent.config.load_config(path)``, imported only when needed."""
    from agent.config import load_config

    return load_config(path)


def config_write_paths(config: AgentConfigView) -> list[str]:
    """Every folder the service writes: drop folders, their outputs (and archive and
    failed folders), the state folder."""
    paths: list[Path] = []
    for drop in config.drops:
        paths.append(drop.path)
        paths.extend(drop.own_folders())
    paths.append(config.state)
    return unique_paths(paths)


# --------------------------------------------------------------------------- systemd


def _systemd_escape(arg: str, *, specifiers: bool = False) -> str:
    """One ExecStart= word: specifiers (%) and variables ($) escaped, quoted if needed."""
    text = arg if specifiers else arg.replace("%", "%%")
    text = text.replace("$", "$$")
    if any(c.isspace() for c in text) or any(c in text for c in "\"'\\;") or not text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _path_word(path: str, *, specifiers: bool = False) -> str:
    """One ReadWritePaths= entry; ``-`` makes a missing folder harmless at start
    (``vip-agent doctor`` reports it) instead of failing with status 226/NAMESPACE."""
    return _systemd_escape("-" + path, specifiers=specifiers)


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(h) or PurePosixPath(h) in p.parents for h in prefixes)


_COMMON_HARDENING = """\
# Hardening. `systemd-analyze security vip-agent` scores it; see docs/operations.md.
NoNewPrivileges=yes
LockPersonality=yes
# Python needs no writable+executable memory; remove this line only if a native
# extension dies with SIGSYS or "cannot allocate ffi closure".
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
"""


def render_systemd_unit(spec: ServiceSpec) -> str:
    """The unit file text for ``spec`` (system or user)."""
    exec_start = " ".join(_systemd_escape(a, specifiers=spec.specifiers) for a in spec.argv())
    rw = " ".join(_path_word(p, specifiers=spec.specifiers) for p in spec.read_write_paths)
    lines: list[str] = []
    add = lines.append
    add("# vip-agent: watch drop folders and run every complete dataset on VIP.")
    add("# Generated by `vip-agent install-service`; see docs/operations.md.")
    add("[Unit]")
    add("Description=vip-agent: run VIP pipelines on datasets dropped in a folder")
    add("Wants=network-online.target")
    add("After=network-online.target")
    add("# give up after 5 failed starts in 10 minutes (e.g. a refused key) instead of looping")
    add("StartLimitIntervalSec=600")
    add("StartLimitBurst=5")
    add("")
    add("[Service]")
    add("Type=notify")
    add("NotifyAccess=main")
    add(f"ExecStart={exec_start}")
    add("# the watcher rereads agent.yaml on SIGHUP (`systemctl reload vip-agent`)")
    add("ExecReload=/bin/kill -HUP $MAINPID")
    add(f"WatchdogSec={spec.watchdog_sec}")
    add("# READY=1 comes after the start-up scan of the drop folders")
    add("TimeoutStartSec=300")
    add("TimeoutStopSec=120")
    add("Restart=on-failure")
    add(f"RestartSec={spec.restart_sec}")
    add("Environment=PYTHONUNBUFFERED=1")
    add("StandardOutput=journal")
    add("StandardError=journal")
    add("SyslogIdentifier=vip-agent")
    add("UMask=0027")
    add("StateDirectory=vip-agent")
    add("StateDirectoryMode=0750")
    if spec.user_mode:
        add("# The API key: `vip-agent login` (keyring, needs an unlocked session), a key file")
        add("# named by key_file: in agent.yaml (chmod 600), or a credential:")
        add("#LoadCredential=vip-api-key:%E/vip-agent/api-key")
        add("")
        add(_COMMON_HARDENING.rstrip("\n"))
        add("# ProtectSystem=/ProtectHome= are left out: in a user manager they need")
        add("# unprivileged user namespaces, and the drop folder usually lives in $HOME.")
        add("")
        add("[Install]")
        add("WantedBy=default.target")
    else:
        add(f"User={spec.service_user}")
        add("# lab users drop data through a shared group; add it here, e.g.:")
        add("#SupplementaryGroups=vip-data")
        add("ConfigurationDirectory=vip-agent")
        add("# The API key, readable only by this service under $CREDENTIALS_DIRECTORY.")
        add(f"LoadCredential=vip-api-key:{SYSTEM_KEY_FILE}")
        add("# Encrypted at rest instead (TPM2 or host key):")
        add(f"#   systemd-creds encrypt --name=vip-api-key - {SYSTEM_KEY_FILE}.cred")
        add(f"#LoadCredentialEncrypted=vip-api-key:{SYSTEM_KEY_FILE}.cred")
        add("")
        add(_COMMON_HARDENING.rstrip("\n"))
        add("ProtectSystem=strict")
        add("# drop, output and state folders: the only places it writes")
        add(f"ReadWritePaths={rw}" if rw else "#ReadWritePaths=")
        # a venv or a drop folder under /home would be hidden by ProtectHome=yes
        home_used = any(_under(p, _HOME_PREFIXES) for p in [*spec.read_write_paths, *spec.command[:1]])
        add(f"ProtectHome={'read-only' if home_used else 'yes'}")
        if any(_under(p, _TMP_PREFIXES) for p in spec.read_write_paths):
            add("# a folder of the agent is under /tmp: a private /tmp would hide it")
            add("PrivateTmp=no")
        else:
            add("PrivateTmp=yes")
        add("PrivateMounts=yes")
        add("PrivateDevices=yes")
        add("DevicePolicy=closed")
        add("ProtectKernelTunables=yes")
        add("ProtectKernelModules=yes")
        add("ProtectKernelLogs=yes")
        add("ProtectControlGroups=yes")
        add("ProtectClock=yes")
        add("ProtectHostname=yes")
        add("ProtectProc=invisible")
        add("ProcSubset=pid")
        add("RemoveIPC=yes")
        add("CapabilityBoundingSet=")
        add("AmbientCapabilities=")
        add("")
        add("[Install]")
        add("WantedBy=multi-user.target")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- launchd


def render_launchd_plist(spec: ServiceSpec) -> bytes:
    """The launchd property list for ``spec`` (LaunchAgent, or LaunchDaemon when not user mode)."""
    log_dir = spec.log_dir or "/Library/Logs/vip-agent"
    plist: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": spec.argv(),
        "RunAtLoad": True,
        # restart after a crash or failure, not after a clean exit (like Restart=on-failure)
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": spec.restart_sec * 3,
        # Standard, not Background: Background throttles disk and network I/O hard
        "ProcessType": "Standard",
        "ExitTimeOut": 120,
        "StandardOutPath": f"{log_dir}/vip-agent.log",
        "StandardErrorPath": f"{log_dir}/vip-agent.err.log",
        # no key here, ever: it comes from the keychain or a key file
        "EnvironmentVariables": {
            "PATH": "/usr/local/bin:/opt/homebrew/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "PYTHONUNBUFFERED": "1",
        },
        "Umask": 0o027,
    }
    if spec.working_dir:
        plist["WorkingDirectory"] = spec.working_dir
    if not spec.user_mode:
        plist["UserName"] = spec.service_user
    return plistlib.dumps(plist, sort_keys=False)


# --------------------------------------------------------------------------- defaults


def agent_command(argv0: str | None = None) -> list[str]:
    """How to start this very installation: the ``vip-agent`` script when we run
    from it or it is on PATH, else ``python -m agent`` with this interpreter."""
    import shutil

    candidate = argv0 if argv0 is not None else sys.argv[0]
    if candidate and Path(candidate).name == "vip-agent" and os.access(candidate, os.X_OK):
        return [os.path.abspath(candidate)]
    found = shutil.which("vip-agent")
    if found:
        return [os.path.abspath(found)]
    return [sys.executable, "-m", "agent"]


def default_specs() -> dict[str, tuple[str, bytes]]:
    """Repository path -> rendered content of the shipped service files."""
    system = ServiceSpec(
        command=[SYSTEM_EXECUTABLE],
        config=SYSTEM_CONFIG,
        read_write_paths=[SYSTEM_DATA_ROOT, SYSTEM_STATE],
    )
    user = ServiceSpec(
        command=["%h/.local/bin/vip-agent"],
        config="%E/vip-agent/agent.yaml",
        user_mode=True,
        specifiers=True,
    )
    home = "/Users/labuser"
    mac = ServiceSpec(
        command=[SYSTEM_EXECUTABLE],
        config=f"{home}/Library/Application Support/vip-agent/agent.yaml",
        user_mode=True,
        log_dir=f"{home}/Library/Logs/vip-agent",
        working_dir=f"{home}/Library/Application Support/vip-agent",
    )
    return {
        "systemd/vip-agent.service": ("text", render_systemd_unit(system).encode()),
        "systemd/user/vip-agent.service": ("text", render_systemd_unit(user).encode()),
        f"launchd/{LAUNCHD_LABEL}.plist": ("plist", render_launchd_plist(mac)),
    }


def write_default_files(root: Path) -> list[Path]:
    """Write the shipped service files under ``root`` (the repository)."""
    written = []
    for rel, (_kind, data) in default_specs().items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written


def unique_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Absolute paths, deduplicated, nested ones dropped (their parent covers them)."""
    absolute = sorted({os.path.abspath(os.fspath(p)) for p in paths})
    kept: list[str] = []
    for p in absolute:
        if not any(PurePosixPath(k) in PurePosixPath(p).parents for k in kept):
            kept.append(p)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.service [REPO]``: regenerate the shipped files."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    for path in write_default_files(root):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
