"""What ``vip-agent doctor`` (and ``init``, after writing agent.yaml) checks: that the agent can
run here, and how to fix what cannot.

Each check prints ``OK``, ``WARN`` or ``FAIL`` and, when not OK, what to do.
Exit status: 0 when nothing failed (warnings allowed unless ``--strict``), 1 otherwise.
The API key is never printed: only where it was found.

Run it as the account the service uses, e.g. ``sudo -u vip-agent vip-agent doctor
--config /etc/vip-agent/agent.yaml``; docs/operations.md shows how to give it the
service's systemd credential too.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agent import service
from agent.credentials import (
    DEFAULT_SERVER,
    Credential,
    find_api_key,
    keyring_backend_name,
    keyring_problem,
    normalise_server_url,
    read_keyring,
    redact,
)
from agent.credentials import environ as secret_environ
from agent.dicom.checks import check_dicom
from agent.errors import AgentError

OK, WARN, FAIL = "OK", "WARN", "FAIL"
#: warn below this much free space where outputs and state are written
DEFAULT_MIN_FREE_GB = 5.0
#: file systems where inotify/FSEvents miss changes made by other machines
NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
        "gpfs", "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "fuse.rclone", "fuse.ceph",
        "davfs", "fuse.davfs2",
    }
)
_INOTIFY = Path("/proc/sys/fs/inotify")
_SERVICE_KEY_HINT = (
    "the service reads {key} as a systemd credential, which this shell does not have. Check with "
    "the service's own account and credential:\n"
    "  sudo systemd-run --pipe --wait -p User=vip-agent "
    "-p LoadCredential=vip-api-key:{key} vip-agent doctor --config {config}"
)


@dataclass
class Check:
    """One line of the report."""

    status: str
    title: str
    fix: str = ""


class Report:
    """Collects checks and prints each as soon as it is known (some take seconds)."""

    def __init__(self, out: TextIO | None = None, *, secrets: Iterable[str] = ()) -> None:
        self.out = out if out is not None else sys.stdout
        self.checks: list[Check] = []
        self._secrets = set(secrets)

    def hide(self, secret: str) -> None:
        """Never print ``secret`` (defence in depth: no check prints a key on purpose)."""
        self._secrets.add(secret)

    def add(self, status: str, title: str, fix: str = "") -> Check:
        check = Check(status, redact(title, *self._secrets), redact(fix, *self._secrets))
        self.checks.append(check)
        print(f"{check.status:<5} {check.title}", file=self.out)
        if check.fix:
            for i, line in enumerate(check.fix.splitlines()):
                print(f"      {'fix: ' if i == 0 else '     '}{line}", file=self.out)
        self.out.flush()
        return check

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)


# --------------------------------------------------------------------------- checks


def _default_config_candidates() -> list[Path]:
    """Where ``vip-agent watch`` looks without --config, then the system service's file."""
    from agent.config import default_config_path

    first = default_config_path()
    system = Path("/Library/Application Support/vip-agent/agent.yaml" if sys.platform == "darwin"
                  else service.SYSTEM_CONFIG)
    return list(dict.fromkeys([first, system]))


def check_config(
    report: Report, path: Path | None, *, server_given: bool
) -> tuple[service.AgentConfigView | None, Path | None]:
    """Load agent.yaml; returns the config (or None) and its path."""
    if path is None:
        path = next((p for p in _default_config_candidates() if p.exists()), None)
        if path is None:
            names = " or ".join(str(p) for p in _default_config_candidates())
            status = WARN if server_given else FAIL
            report.add(status, f"config: none found ({names})",
                       "pass --config PATH, or create agent.yaml (docs/operations.md)")
            return None, None
    if not path.exists():
        report.add(FAIL, f"config {path}: does not exist", "create it or pass the right --config PATH")
        return None, path
    try:
        config = service.load_agent_config(path)
    except AgentError as err:
        report.add(FAIL, f"config {path}: not valid: {err}", err.detail or "correct agent.yaml")
        return None, path
    except OSError as exc:
        report.add(FAIL, f"config {path}: cannot be read ({exc.strerror})",
                   "give the service account read access to it")
        return None, path
    n = len(config.drops)
    report.add(OK if n else WARN, f"config {path}: {n} drop folder{'s' if n != 1 else ''}",
               "" if n else "add at least one drop folder")
    return config, path


def _folder_roles(config: service.AgentConfigView) -> list[tuple[str, Path]]:
    roles: list[tuple[str, Path]] = []
    for drop in config.drops:
        roles.append(("drop folder", Path(drop.path)))
        roles.append(("output folder", Path(drop.output)))
    roles.append(("state folder", Path(config.state)))
    return list(dict.fromkeys(roles))  # same folder named twice: check it once


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def check_folders(report: Report, roles: list[tuple[str, Path]]) -> None:
    """Every folder exists, is a folder, and this account can write in it."""
    for role, path in roles:
        if not path.exists():
            parent = _nearest_existing(path)
            creatable = role != "drop folder" and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
            # a folder created at run time is outside the service sandbox's ReadWritePaths
            report.add(WARN if creatable else FAIL, f"{role} {path}: does not exist",
                       f"mkdir -p {path}   (then let the agent's account write in it; run "
                       "install-service again so the service may write there)")
        elif not path.is_dir():
            report.add(FAIL, f"{role} {path}: is not a folder", "point the configuration at a folder")
        elif not os.access(path, os.W_OK | os.X_OK) or not os.access(path, os.R_OK):
            report.add(FAIL, f"{role} {path}: this account cannot read and write in it",
                       f"give the agent's account write access (e.g. chgrp vip-data {path} && chmod g+rwxs {path})")
        else:
            report.add(OK, f"{role} {path}: exists, writable")


def check_watched_drops(report: Report, state: Path, mine: Iterable[Path] | None = None) -> None:
    """What a running agent sees of its drop folders (one that disappeared under it); with
    ``mine``, only those drop folders (the ones of the configuration being checked)."""
    from agent.journal import JOURNAL_NAME, Journal
    from agent.watch.lock import AgentLock

    check_claims(report, state, mine or [])
    if not (state / JOURNAL_NAME).is_file() or AgentLock(state).held_by_other() is None:
        return
    try:
        drops = Journal(state / JOURNAL_NAME).drop_states()
    except AgentError:
        return
    wanted = None if mine is None else {Path(p) for p in mine}
    for drop in drops:
        if wanted is not None and Path(drop.path) not in wanted:
            continue  # another configuration's folder, watched by the agent on this state
        if drop.state == "watching":
            report.add(OK, f"drop folder {drop.path}: watched by the running agent ({drop.message})")
        elif drop.state == "claimed":
            pass  # said by check_claims
        else:
            report.add(FAIL, f"drop folder {drop.path}: the running agent reports it {drop.state}: "
                             f"{drop.message}", "put the folder back (or mount it): it is watched again "
                                                "within seconds")  # fmt: skip


def check_claims(report: Report, state: Path, drops: Iterable[Path]) -> None:
    """A drop folder another live agent claimed (``.vip-agent-claim``): this one takes nothing
    from it."""
    from agent.journal import JOURNAL_NAME, Journal
    from agent.watch.claim import read_claim

    mine = None
    if (state / JOURNAL_NAME).is_file():
        try:
            mine = Journal(state / JOURNAL_NAME).agent_id()
        except AgentError:
            pass
    for drop in drops:
        claim = read_claim(drop)
        if claim is None or not claim.alive() or (claim.agent_id == mine and claim.state == str(state)):
            continue
        report.add(WARN, f"drop folder {drop}: claimed by another vip-agent: {claim.describe()}; "
                         "this agent takes none of its datasets while that one runs",
                   "stop one of the two agents, or remove the folder from one of the two "
                   "configurations")  # fmt: skip


def check_disk(report: Report, paths: Iterable[Path], min_free_bytes: float) -> None:
    """Free space where outputs and state are written, once per file system."""
    seen: set[int] = set()
    for path in paths:
        try:
            dev = path.stat().st_dev
        except OSError:
            continue  # reported by check_folders
        if dev in seen:
            continue
        seen.add(dev)
        usage = shutil.disk_usage(path)
        free_gb = usage.free / 1024**3
        if usage.free < min_free_bytes:
            report.add(WARN, f"disk space at {path}: {free_gb:.1f} GiB free",
                       f"free space or move outputs elsewhere; under {min_free_bytes / 1024**3:g} GiB "
                       "downloads may fail")
        else:
            report.add(OK, f"disk space at {path}: {free_gb:.1f} GiB free")


def _count_dirs(root: Path, limit: int) -> int:
    """Directories a recursive watch of ``root`` needs (one inotify watch each), up to ``limit``."""
    count = 0
    for _dirpath, _dirnames, _files in os.walk(root):
        count += 1
        if count >= limit:
            break
    return count


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def check_inotify(report: Report, drops: list[Path], *, proc: Path = _INOTIFY) -> None:
    """Linux only: enough inotify watches and instances for the drop folders."""
    max_watches = _read_int(proc / "max_user_watches")
    if max_watches is None:
        return  # not Linux (FSEvents and others have no such limit)
    max_instances = _read_int(proc / "max_user_instances")
    existing = [d for d in drops if d.is_dir()]
    needed = sum(_count_dirs(d, max_watches + 1) for d in existing)
    fix = (
        "raise the limit: echo fs.inotify.max_user_watches=524288 | "
        "sudo tee /etc/sysctl.d/90-vip-agent.conf && sudo sysctl --system"
    )
    if needed > max_watches:
        report.add(FAIL, f"inotify: the drop folders hold {needed}+ folders, more than the limit "
                   f"of {max_watches} watches", fix)
    elif needed > max_watches // 2:
        report.add(WARN, f"inotify: {needed} of {max_watches} watches needed; other programs use "
                   "watches too", fix)
    elif max_instances is not None and len(existing) > max_instances:
        report.add(FAIL, f"inotify: {len(existing)} drop folders but only {max_instances} inotify "
                   "instances allowed",
                   "echo fs.inotify.max_user_instances=1024 | sudo tee -a "
                   "/etc/sysctl.d/90-vip-agent.conf && sudo sysctl --system")
    else:
        report.add(OK, f"inotify: {needed} of {max_watches} watches needed")


def _unescape_mount(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The file system type holding ``path`` (Linux), or None when unknown."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        mount_point = _unescape_mount(fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    return best_type


def check_observer(report: Report, config: service.AgentConfigView | None) -> None:
    """Which watchdog observer runs here, and whether a drop folder is on a network share."""
    try:
        from watchdog.observers import Observer
    except ImportError as exc:  # pragma: no cover - watchdog is a dependency
        report.add(FAIL, f"file watching: watchdog cannot be imported ({exc})", "reinstall vip-agent")
        return
    name = getattr(Observer, "__name__", str(Observer))
    if "Polling" in name:
        report.add(WARN, f"file watching: {name} (no native file events on this system)",
                   "the agent polls folders: slower and more disk reads, but it works")
    else:
        report.add(OK, f"file watching: native events ({name})")
    if config is None:
        return
    for drop in config.drops:
        path = Path(drop.path)
        fstype = filesystem_type(path) if path.exists() else None
        if fstype not in NETWORK_FS:
            continue
        if drop.observer == "native":
            report.add(WARN, f"drop folder {path} is on a network share ({fstype}): native events "
                       "miss files written by other machines",
                       "set `observer: polling` (or `auto`) for this drop folder in agent.yaml")
        else:  # auto polls network shares
            report.add(OK, f"drop folder {path} is on a network share ({fstype}): polled")


def check_server(report: Report, server: str, *, timeout: float = 10) -> bool:
    """``GET /rest/platform`` (public, no key sent): True when VIP answered."""
    import requests

    url = server.rstrip("/") + "/rest/platform"
    try:
        response = requests.get(url, timeout=timeout, allow_redirects=False,
                                headers={"User-Agent": "vip-agent doctor"})
    except requests.exceptions.SSLError as exc:
        report.add(FAIL, f"server {server}: TLS failed ({type(exc).__name__})",
                   "a proxy re-signing HTTPS? point REQUESTS_CA_BUNDLE at its CA certificate")
        return False
    except requests.RequestException as exc:
        report.add(FAIL, f"server {server}: cannot connect ({type(exc).__name__})",
                   "check the URL, the network, and HTTPS_PROXY if this site needs a proxy")
        return False
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict):
        report.add(OK, f"server {server}: reachable (GET /rest/platform answered)")
        return True
    report.add(FAIL, f"server {server}: GET /rest/platform gave HTTP {response.status_code}"
               f"{'' if isinstance(body, dict) else ' without JSON'}",
               "is this a VIP portal URL? (no /rest suffix) A proxy page may be in the way")
    return False


def check_key(
    report: Report,
    server: str,
    key_file: Path | None,
    *,
    reachable: bool,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
    key_later: bool = False,
) -> Credential | None:
    """Where the key comes from (never the key) and whether VIP accepts it; the credential
    found (None when there is none)."""
    try:
        credential = find_api_key(server, key_file=key_file, env=env)
    except AgentError as err:
        fix = err.message
        system_key = Path(service.SYSTEM_KEY_FILE)
        if not (secret_environ() if env is None else env).get("CREDENTIALS_DIRECTORY") and system_key.exists():
            fix += "\n" + _SERVICE_KEY_HINT.format(
                key=system_key, config=config_path or service.SYSTEM_CONFIG
            )
        if key_later and key_file is None:
            report.add(WARN, f"API key for {server}: none stored yet",
                       f"`vip-agent login --server {server}`, or name a key file (chmod 600) with "
                       "key_file: in agent.yaml (docs/operations.md)")
            return None
        report.add(FAIL, f"API key for {server}: not usable", fix)
        return None
    report.hide(credential.key)
    report.add(OK, f"API key for {server}: found ({credential.source})")
    if not reachable:
        report.add(WARN, f"API key for {server}: not checked, the server is unreachable",
                   "run doctor again once the server answers")
        return credential
    from agent.credentials import verify_key
    from agent.vip.errors import AuthError, VipError

    try:
        verify_key(server, credential.key)
    except AuthError:
        report.add(FAIL, f"API key for {server}: refused by the server ({credential.source})",
                   f"get a new key from My Account on the portal, then `vip-agent login --server {server}` "
                   "(or replace the key where it was found)")
    except VipError as err:
        report.add(WARN, f"API key for {server}: could not be checked ({err.message})",
                   "run doctor again later")
    else:
        report.add(OK, f"API key for {server}: accepted by the server")
    return credential


def check_keyring(report: Report, server: str, *, not_needed: str | None = None) -> None:
    """Whether a keyring backend is usable and answers in time. ``not_needed`` names where
    every key comes from when none comes from the keyring: a missing keyring is then fine."""
    problem = keyring_problem()
    if problem is not None and not_needed:
        report.add(OK, f"keyring: not needed (the key comes from {not_needed}; {problem})")
        return
    if problem is not None:
        report.add(WARN, f"keyring: {problem}",
                   "fine when the key comes from a systemd credential, a key file or VIP_API_KEY; "
                   "otherwise `pip install keyrings.alt` or run a Secret Service (docs/operations.md)")
        return
    try:
        read_keyring(server, timeout=5)
    except AgentError as err:
        report.add(WARN, f"keyring: {keyring_backend_name()} does not answer: {err.detail or err.message}",
                   "unlock it, or give the key another way (docs/operations.md)")
        return
    report.add(OK, f"keyring: {keyring_backend_name()} usable")


# --------------------------------------------------------------------------- driver


def diagnose(
    *,
    config_path: Path | None,
    server: str | None,
    out: TextIO | None = None,
    min_free_gb: float = DEFAULT_MIN_FREE_GB,
    env: Mapping[str, str] | None = None,
    key_later: bool = False,
) -> Report:
    """Run every check; the report holds the results (already printed to ``out``)."""
    report = Report(out)
    # a mistyped --server is refused before anything is checked or sent
    wanted = normalise_server_url(server) if server is not None else None
    config, path = check_config(report, config_path, server_given=server is not None)

    targets: list[tuple[str, Path | None]] = []
    if config is not None:
        roles = _folder_roles(config)
        check_folders(report, roles)
        check_disk(report, [p for r, p in roles if r != "drop folder"] or [p for _r, p in roles],
                   min_free_gb * 1024**3)
        check_inotify(report, [p for r, p in roles if r == "drop folder"])
        check_watched_drops(report, Path(config.state), [Path(d.path) for d in config.drops])
        for status, title, fix in check_dicom(getattr(config, "dicom", None), Path(config.state)):
            report.add(status, title, fix)
        for drop in config.drops:
            targets.append((normalise_server_url(drop.server), drop.key_file))
    check_observer(report, config)

    if wanted is not None:
        key_file = next((k for s, k in targets if s == wanted), None)
        targets = [(wanted, key_file)]
    elif not targets and path is not None:
        # an agent.yaml that does not load names no server: probing the public VIP instead
        # would check a server the user never chose
        report.add(WARN, "server and API key: not checked (correct the configuration first, "
                   "or name a server with --server)")
        return report
    elif not targets:
        targets = [(normalise_server_url(DEFAULT_SERVER), None)]
    seen: set[tuple[str, Path | None]] = set()
    reachable: dict[str, bool] = {}
    sources: list[str | None] = []
    for url, key_file in targets:
        if (url, key_file) in seen:
            continue
        seen.add((url, key_file))
        if url not in reachable:
            reachable[url] = check_server(report, url)
        found = check_key(report, url, key_file, reachable=reachable[url], env=env,
                          config_path=path, key_later=key_later)  # fmt: skip
        sources.append(found.source if found is not None else None)
    # a key file or a systemd credential is how a service gets its key: no keyring needed
    # (the environment variable is not: it is usually a shell's stopgap for the keyring)
    keyring_free = all(s is not None and s.startswith(("key file", "systemd")) for s in sources)
    check_keyring(report, targets[0][0], not_needed=", ".join(dict.fromkeys(
        s for s in sources if s)) if keyring_free else None)  # fmt: skip
    return report


def summary(report: Report, *, strict: bool) -> int:
    """Print the closing count; the exit status (1 on a failure, or a warning when strict)."""
    fails, warns = report.count(FAIL), report.count(WARN)
    print(f"doctor: {report.count(OK)} OK, {warns} WARN, {fails} FAIL", file=report.out)
    return 1 if fails or (strict and warns) else 0
