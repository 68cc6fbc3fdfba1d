"""One agent per state folder: an advisory lock on ``<state>/agent.lock``.

Two ``vip-agent watch`` processes on one journal would step the same datasets
twice; the lock prevents it, and tells ``status`` and ``cancel`` whether an
agent is running (and its pid). The OS drops the lock when the process dies,
so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

from agent.errors import StateFolderError

LOCK_NAME = "agent.lock"


class AgentLock:
    """Non-blocking exclusive lock of a state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> bool:
        """Take the lock; False if another process holds it."""
        if self._fh is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while held
        except OSError as err:
            raise StateFolderError(
                f"cannot use the state folder {self.path.parent}: {err.strerror or err}; fix its "
                "permissions or give another --state (or `state:` in agent.yaml)",
                detail=str(err),
            ) from None
        try:
            _lock(fh)
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            try:
                self._fh.seek(0)
                self._fh.truncate()
                _unlock(self._fh)
            finally:
                self._fh.close()
                self._fh = None

    def held_by_other(self) -> int | None:
        """The pid of another process holding the lock, 0 if unknown, None if free."""
        if self._fh is not None or not self.path.exists():
            return None
        if self.acquire():
            self.release()
            return None
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def __enter__(self) -> AgentLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fh: IO[str]) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(fh: IO[str]) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(fh: IO[str]) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fh: IO[str]) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
