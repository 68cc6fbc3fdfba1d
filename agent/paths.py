"""Where vip-agent keeps its state by default."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_SERVER = "https://vip.creatis.insa-lyon.fr"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the per-user state folder.

    ``$XDG_STATE_HOME/vip-agent`` (``~/.local/state/vip-agent``) on Linux and macOS,
    ``%LOCALAPPDATA%\\vip-agent\\state`` on Windows.
    """
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        # systemd may pass several, colon-separated: the first is ours
        return Path(systemd.split(":")[0])
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "vip-agent" / "state"
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "vip-agent"
