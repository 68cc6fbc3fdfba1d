"""Is a drop folder still the folder being watched? (removed, renamed, replaced, unmounted)

An observer keeps watching the folder it started on: if the drop folder is removed,
renamed away, replaced by another folder of the same name, or its file system is
unmounted, no event ever says so and new datasets would wait for the next rescan.
:class:`Presence` compares the path's identity (device, inode) with the one watched,
a ``stat`` every few seconds, and says what changed, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: seconds between two looks at every drop folder
PRESENCE_INTERVAL = 2.0

WATCHING = "watching"
MISSING = "missing"


@dataclass(frozen=True)
class Change:
    """What happened to a drop folder since the last look."""

    state: str  # WATCHING (back, or replaced: watch it again) | MISSING (stop watching)
    message: str


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not os.path.isdir(path):
        return None
    return st.st_dev, st.st_ino


def _mounted_on(path: Path) -> bool:
    """Whether ``path`` is the root of a file system (its parent is on another device)."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


class Presence:
    """Tracks one drop folder; :meth:`look` returns a :class:`Change` when it changed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.identity = _identity(self.path)
        self.was_mount = _mounted_on(self.path)
        self.state = WATCHING if self.identity is not None else MISSING

    def look(self) -> Change | None:
        now = _identity(self.path)
        if self.state == MISSING:
            if now is None or (self.was_mount and not _mounted_on(self.path)):
                return None  # still gone (or only the empty mount point is there)
            self.identity, self.state = now, WATCHING
            return Change(WATCHING, f"the drop folder {self.path} is back; watching it again")
        if now is None:
            self.state = MISSING
            return Change(
                MISSING,
                f"the drop folder {self.path} has disappeared (removed, renamed or unmounted); "
                "its datasets wait, and it is watched again as soon as it is back",
            )
        if self.was_mount and not _mounted_on(self.path):
            self.state = MISSING
            return Change(
                MISSING,
                f"the file system of the drop folder {self.path} was unmounted; its datasets "
                "wait, and it is watched again as soon as it is mounted",
            )
        if now != self.identity:
            self.identity = now
            self.was_mount = _mounted_on(self.path)
            return Change(
                WATCHING,
                f"the drop folder {self.path} was replaced by another folder of the same name "
                "(renamed, recreated or remounted); watching the new one",
            )
        return None
