"""Where vip-agent keeps its configuration, state and logs by default.

Per-user folders come from ``platformdirs``: on Linux the XDG ones
(``~/.config/vip-agent``, ``~/.local/state/vip-agent``, ``~/.local/state/vip-agent/log``),
on macOS ``~/Library/Application Support/vip-agent`` and ``~/Library/Logs/vip-agent``.
Version 0.1 used the XDG folders on every system: when the new folder holds no
``agent.yaml``/journal and the old one does, the old one is used, so an upgrade
loses nothing. Under systemd, ``$CONFIGURATION_DIRECTORY``, ``$STATE_DIRECTORY``
and ``$LOGS_DIRECTORY`` come first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from platformdirs.api import PlatformDirsABC

DEFAULT_SERVER = "https://vip.creatis.insa-lyon.fr"
APP = "vip-agent"
CONFIG_NAME = "agent.yaml"
#: the journal's file name (agent.journal.JOURNAL_NAME): its presence marks a used state folder
JOURNAL_FILE = "journal.sqlite3"


def platform_dirs() -> PlatformDirsABC:
    """platformdirs for the running system, chosen when called (not at import), so a test can
    simulate another system by setting ``sys.platform`` and ``HOME``."""
    if sys.platform == "darwin":
        from platformdirs.macos import MacOS as Dirs
    elif sys.platform == "win32":
        from platformdirs.windows import Windows as Dirs
    else:
        from platformdirs.unix import Unix as Dirs
    return Dirs(APP, appauthor=False)


def _systemd(variable: str) -> Path | None:
    value = os.environ.get(variable)
    # systemd may pass several, colon-separated: the first is ours
    return Path(value.split(":")[0]) if value else None


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return (Path(value) if value else Path.home() / fallback) / APP


def legacy_config_dir() -> Path:
    """Where 0.1 looked on every system: ``$XDG_CONFIG_HOME/vip-agent``."""
    return _xdg("XDG_CONFIG_HOME", ".config")


def legacy_state_dirs() -> list[Path]:
    """Where 0.1 kept the journal: ``$XDG_STATE_HOME/vip-agent`` (Windows: ``%LOCALAPPDATA%``)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return [Path(base) / APP / "state"]
    return [_xdg("XDG_STATE_HOME", ".local/state")]


def _current_or_legacy(new: Path, old: list[Path], marker: str) -> Path:
    if (new / marker).exists():
        return new
    return next((d for d in old if d != new and (d / marker).exists()), new)


def user_config_dir() -> Path:
    return _current_or_legacy(Path(platform_dirs().user_config_dir), [legacy_config_dir()], CONFIG_NAME)


def default_config_path() -> Path:
    """``$CONFIGURATION_DIRECTORY/agent.yaml`` under systemd, else the per-user one."""
    systemd = _systemd("CONFIGURATION_DIRECTORY")
    return (systemd or user_config_dir()) / CONFIG_NAME


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the per-user state folder (0.1's if it holds the journal)."""
    systemd = _systemd("STATE_DIRECTORY")
    if systemd is not None:
        return systemd
    return _current_or_legacy(Path(platform_dirs().user_state_dir), legacy_state_dirs(), JOURNAL_FILE)


def default_log_dir() -> Path:
    """``$LOGS_DIRECTORY`` under systemd, else the per-user log folder (macOS: ``~/Library/Logs/vip-agent``)."""
    return _systemd("LOGS_DIRECTORY") or Path(platform_dirs().user_log_dir)
