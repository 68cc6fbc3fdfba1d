"""Processes on this machine: whether a pid is alive, and what tells a process from a later
one given the same pid. The one place the agent asks (leases, claims, temporary files, the
DICOM node's pid file)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["pid_alive", "process_start"]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


_BOOT = _boot_id()


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (Linux), else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()


def process_start(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: boot id and start time
    (Linux); None where the system does not say (the owner's heartbeat is then relied on)."""
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return f"{_BOOT}:{fields[19]}"  # field 22 of stat: start time in clock ticks since boot


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie is dead)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - os.kill would terminate it there
        return True  # unknown: the owner's heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except OSError:
        return False
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))
