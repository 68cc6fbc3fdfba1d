"""The journal as a file: what goes wrong with it (its errors), and which file it is (an id
stored inside, checked with the file's device/inode, so a journal deleted, replaced or emptied
under a running agent is noticed), and SQLite's integrity check at start."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from agent.errors import StateFolderError


class JournalError(StateFolderError):
    """The journal cannot be opened (folder missing or read-only) or is from a newer release."""


class JournalWriteError(JournalError):
    """The journal cannot be written now (disk full, folder read-only, I/O error).

    Nothing was written. The agent waits and tries again: it recovers by itself once the
    state folder is writable again.
    """


class JournalLost(JournalError):
    """The journal file was deleted, replaced or damaged under a running agent."""


#: sqlite3 messages of a journal that cannot be written now (nothing the agent did wrong)
_WRITE_FAILURES = (
    ("disk is full", "the disk holding it is full"),
    ("readonly", "it is read-only"),
    ("read-only", "it is read-only"),
    ("disk i/o error", "the disk reports an I/O error"),
    ("unable to open", "it cannot be opened (deleted, or its folder is gone)"),
)


def connect(path: Path, *, synchronous: str = "FULL", any_thread: bool = False) -> sqlite3.Connection:
    """A connection to the journal file, as every part of the agent opens it: WAL, a 30 s busy
    timeout, no memory-mapped reads (a file truncated under us must be an error, not SIGBUS).

    ``synchronous``: ``FULL`` (a committed step survives power loss) for the journal's own
    tables; ``NORMAL`` for an index that is rebuilt at start (the DICOM spool's).
    """
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=not any_thread)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA busy_timeout=30000")
    db.execute("PRAGMA mmap_size=0")
    return db


class IdentityStore:
    """The ``meta`` table and the file's identity (mixed into the Journal)."""

    path: Path
    identity: tuple[int, int, str]

    def _db(self) -> sqlite3.Connection:  # pragma: no cover - provided by the Journal
        raise NotImplementedError

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table (``journal_id``, ``agent_id``)."""
        row = self._db().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else None

    @property
    def journal_id(self) -> str:
        """The id stored inside this journal when it was created (a copy keeps it)."""
        return self.identity[2]

    def agent_id(self) -> str:
        """The id of the agent of this state folder (8 hex digits, made once with the journal)."""
        return self.meta("agent_id") or "0" * 8

    def check_integrity(self) -> None:
        """Raise :class:`JournalLost` unless SQLite's ``quick_check`` finds the file sound."""
        try:
            rows = [str(r[0]) for r in self._db().execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as err:
            rows = [str(err)]
        if rows != ["ok"]:
            raise JournalLost(
                f"the journal {self.path} is damaged ({rows[0]}); restore a backup of it "
                "(docs/operations.md: Restoring the journal) or move it aside to start afresh",
                detail="; ".join(rows),
            )

    def changed_under_us(self) -> str | None:
        """Why the file at :attr:`path` is no longer the journal this handle opened, or None.

        Deleted, replaced by another file (another inode, or another id inside), or
        truncated: the agent must stop rather than go on against a file nobody sees.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"the journal {self.path} was deleted while the agent was running"
        except OSError as err:
            return f"the journal {self.path} cannot be looked at any more ({err.strerror or err})"
        if (st.st_dev, st.st_ino) != self.identity[:2]:
            return f"the journal {self.path} was replaced by another file while the agent was running"
        if st.st_size < 512:
            return f"the journal {self.path} was emptied ({st.st_size} bytes) while the agent was running"
        try:
            other = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            try:
                row = other.execute("SELECT value FROM meta WHERE key='journal_id'").fetchone()
            finally:
                other.close()
        except sqlite3.Error as err:
            return f"the journal {self.path} was damaged while the agent was running ({err})"
        if row is None or str(row[0]) != self.journal_id:
            return f"the journal {self.path} was overwritten by another journal while the agent was running"
        return None
