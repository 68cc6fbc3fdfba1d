"""Where vip-agent keeps its state by default."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_SERVER = "https://vip.creatis.insa-lyon.fr"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the platform's per-user state folder."""
    if os.environ.get("STATE_DIRECTORY"):
        # systemd may pass several, colon-separated: the first is ours
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "vip-agent"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vip-agent"
