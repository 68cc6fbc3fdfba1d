"""Who drives a dataset: one owner at a time (a lease in the journal), a dead owner loses it.

An :class:`Owner` is a process (role, pid, host, process start, token); its lease lives
:data:`LEASE_TTL` seconds without a heartbeat. :class:`LeaseStore` holds the journal's lease
operations (one transaction each)."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass

from agent.procs import pid_alive, process_start

#: seconds a lease lives without a heartbeat: how long an owner on another host (or one
#: whose start cannot be checked) counts as alive after its last sign of life
LEASE_TTL = 60.0
#: how often a live owner renews its leases
LEASE_BEAT = 10.0

_HOST = socket.gethostname()


_ROLES = {"service": "the running service (vip-agent watch", "run": "vip-agent run (",
          "cancel": "vip-agent cancel ("}  # fmt: skip


@dataclass(frozen=True)
class Owner:
    """A process that drives datasets: who it is, told apart from a later one with its pid."""

    role: str  # service | run | cancel
    pid: int
    host: str
    started: str | None
    token: str

    @classmethod
    def this_process(cls, role: str) -> Owner:
        pid = os.getpid()
        return cls(role, pid, _HOST, process_start(pid), uuid.uuid4().hex)

    def describe(self) -> str:
        """``the running service (vip-agent watch, pid 123)``, ``vip-agent run (pid 9 on pc2)``."""
        head = _ROLES.get(self.role, f"vip-agent {self.role} (")
        sep = ", " if head.endswith("watch") else ""
        where = f" on {self.host}" if self.host != _HOST else ""
        return f"{head}{sep}pid {self.pid}{where})"

    def alive(self, expires: float, now: float | None = None) -> bool:
        """Whether this owner still lives, as far as this machine can tell.

        On this host: its pid exists and (where the system says) was started when the owner
        recorded it, so a reused pid is not mistaken for it; a SIGKILLed owner is dead at
        once. On another host (or without a start time here): until its heartbeat expires.
        """
        now = time.time() if now is None else now
        if self.host == _HOST:
            if not pid_alive(self.pid):
                return False
            current = process_start(self.pid)
            if self.started and current is not None:
                return current == self.started
        return expires > now


@dataclass(frozen=True)
class Lease:
    """A dataset's owner and the last sign of life it gave."""

    dataset_id: int
    owner: Owner
    beat: float
    expires: float

    def alive(self, now: float | None = None) -> bool:
        return self.owner.alive(self.expires, now)


class LeaseStore:
    """The ``leases`` table: which process drives each dataset (mixed into the Journal)."""

    def _db(self) -> sqlite3.Connection:  # pragma: no cover - provided by the Journal
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _lease(row: sqlite3.Row) -> Lease:
        owner = Owner(row["role"], int(row["pid"]), row["host"], row["started"], row["token"])
        return Lease(int(row["dataset_id"]), owner, float(row["beat"]), float(row["expires"]))

    def _insert_lease(self, db: sqlite3.Connection, dataset_id: int, owner: Owner, now: float) -> None:
        db.execute(
            "INSERT OR REPLACE INTO leases (dataset_id, token, role, pid, host, started, beat,"
            " expires) VALUES (?,?,?,?,?,?,?,?)",
            (dataset_id, owner.token, owner.role, owner.pid, owner.host, owner.started, now,
             now + LEASE_TTL),
        )  # fmt: skip

    def lease(self, dataset_id: int) -> Lease | None:
        """The dataset's lease as recorded (its owner may be dead: see :meth:`Lease.alive`)."""
        row = self._db().execute("SELECT * FROM leases WHERE dataset_id=?", (dataset_id,)).fetchone()
        return self._lease(row) if row else None

    def take_lease(self, dataset_id: int, owner: Owner) -> Lease | None:
        """Make ``owner`` the dataset's one driver; returns None when it is (now) the owner,
        else the lease of the live process that owns it (nothing written).

        A lease whose owner is dead (exited, SIGKILLed, its pid reused, its heartbeat
        expired) is taken over. One transaction: two processes never both win.
        """
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT * FROM leases WHERE dataset_id=?", (dataset_id,)).fetchone()
            if row is not None and row["token"] != owner.token:
                held = self._lease(row)
                # this very process under another name (a service restarted in-process) is no
                # other driver: its old scheduler is stopped
                same = (held.owner.pid, held.owner.host, held.owner.started) == (
                    owner.pid, owner.host, owner.started)
                if not same and held.alive(now):
                    return held
            self._insert_lease(db, dataset_id, owner, now)
        return None

    def holds_lease(self, dataset_id: int, owner: Owner) -> bool:
        row = self._db().execute(
            "SELECT 1 FROM leases WHERE dataset_id=? AND token=?", (dataset_id, owner.token)
        ).fetchone()
        return row is not None

    def renew_leases(self, owner: Owner) -> int:
        """The owner's heartbeat: push back the expiry of all its leases; how many it holds."""
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE leases SET beat=?, expires=? WHERE token=?", (now, now + LEASE_TTL, owner.token)
            )
        return int(cur.rowcount)

    def release_lease(self, dataset_id: int, owner: Owner) -> None:
        """Give a dataset up (only if ``owner`` holds it)."""
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE dataset_id=? AND token=?", (dataset_id, owner.token))
