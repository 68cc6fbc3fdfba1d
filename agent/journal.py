"""The durable journal: one SQLite file (WAL) that says where every dataset stands.

Every state change is committed here *before* the action it announces, so a
crash at any instant resumes at the right step. Several threads of one process
(one connection each) and other processes (``vip-agent status``) may use the
same file at once. No API key is ever written here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from agent.errors import StateFolderError

JOURNAL_NAME = "journal.sqlite3"


class Stage(str, Enum):
    """Internal stages, in order. Equal to (and stored as) their lowercase text."""

    WAITING = "waiting"
    VALIDATE = "validate"
    UPLOAD = "upload"
    LAUNCH = "launch"
    MONITOR = "monitor"
    MIRROR = "mirror"
    EXTRACT = "extract"
    CLEANUP = "cleanup"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: ended with every output it could mirror; outputs too large to download stay on VIP
    INCOMPLETE = "incomplete"

    def __str__(self) -> str:
        return self.value


STAGES = tuple(s.value for s in Stage)
FINAL_STAGES = frozenset({Stage.DONE, Stage.FAILED, Stage.CANCELLED, Stage.INCOMPLETE})

_S = Stage
#: the only stage changes :meth:`Journal.set_stage` accepts (staying in a non-final stage is
#: always allowed). Any stage before ``done`` may fail or be cancelled; every final stage may
#: be run again (``validate``: retry, rerun); ``failed`` and ``incomplete`` may be cancelled
#: (the server is cleaned).
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    _S.WAITING: frozenset({_S.VALIDATE, _S.CANCELLED, _S.FAILED}),
    _S.VALIDATE: frozenset({_S.UPLOAD, _S.FAILED, _S.CANCELLED}),
    _S.UPLOAD: frozenset({_S.LAUNCH, _S.FAILED, _S.CANCELLED}),
    _S.LAUNCH: frozenset({_S.MONITOR, _S.FAILED, _S.CANCELLED}),
    _S.MONITOR: frozenset({_S.MIRROR, _S.FAILED, _S.CANCELLED}),
    _S.MIRROR: frozenset({_S.EXTRACT, _S.CLEANUP, _S.FAILED, _S.CANCELLED, _S.INCOMPLETE}),
    _S.EXTRACT: frozenset({_S.CLEANUP, _S.FAILED, _S.CANCELLED, _S.INCOMPLETE}),
    _S.CLEANUP: frozenset({_S.DONE, _S.FAILED, _S.CANCELLED, _S.INCOMPLETE}),
    _S.DONE: frozenset({_S.VALIDATE}),  # `vip-agent rerun`
    _S.FAILED: frozenset({_S.VALIDATE, _S.CANCELLED}),
    _S.CANCELLED: frozenset({_S.VALIDATE}),
    # retry fetches what was left on VIP (mirror); cancel --discard deletes it (cleanup)
    _S.INCOMPLETE: frozenset({_S.VALIDATE, _S.CANCELLED, _S.MIRROR, _S.CLEANUP}),
}
#: SQL list of the stages the runner still works on (for ``stage IN (...)``)
ACTIVE_STAGES_SQL = "(" + ",".join(
    f"'{s.value}'" for s in Stage if s not in FINAL_STAGES and s is not Stage.WAITING
) + ")"
#: SQL condition of the datasets a scheduler must hold: in progress, or asked to cancel
#: (indexed: the scheduler looks for them every few seconds, among every dataset ever run)
LIVE_SQL = f"stage IN {ACTIVE_STAGES_SQL} OR cancel_requested=1"
#: for SQL: ``stage NOT IN {FINAL_SQL}``
FINAL_SQL = "(" + ",".join(f"'{s.value}'" for s in sorted(FINAL_STAGES)) + ")"
#: final stages a dataset may be retried (or run again) from
RETRYABLE_STAGES = frozenset({_S.FAILED, _S.CANCELLED, _S.INCOMPLETE})

#: internal stage -> public state shown by ``vip-agent status``
PUBLIC_STATE = {
    "waiting": "waiting",
    "validate": "validating",
    "upload": "uploading",
    "launch": "queued",
    "monitor": "running",
    "mirror": "downloading",
    "extract": "downloading",
    "cleanup": "cleaning",
    "done": "done",
    "incomplete": "incomplete",
    "failed": "failed",
    "cancelled": "cancelled",
}


#: how the scheduler's reason starts for a dataset held back before its upload
#: (``upload_ahead``): such a dataset, at stage ``upload``, shows as ``queued``
UPLOAD_HELD = "waiting to upload: "


class IllegalTransition(RuntimeError):
    """A stage change the table forbids: a bug in vip-agent, never a user mistake."""


class JournalError(StateFolderError):
    """The journal cannot be opened (folder missing or read-only) or is from a newer release."""


class JournalWriteError(JournalError):
    """The journal cannot be written now (disk full, folder read-only, I/O error).

    Nothing was written. The agent waits and tries again: it recovers by itself once the
    state folder is writable again.
    """


class JournalLost(JournalError):
    """The journal file was deleted, replaced or damaged under a running agent."""


#: seconds a lease lives without a heartbeat: how long an owner on another host (or one
#: whose start cannot be checked) counts as alive after its last sign of life
LEASE_TTL = 60.0
#: how often a live owner renews its leases
LEASE_BEAT = 10.0

_HOST = socket.gethostname()


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


#: sqlite3 messages of a journal that cannot be written now (nothing the agent did wrong)
_WRITE_FAILURES = (
    ("disk is full", "the disk holding it is full"),
    ("readonly", "it is read-only"),
    ("read-only", "it is read-only"),
    ("disk i/o error", "the disk reports an I/O error"),
    ("unable to open", "it cannot be opened (deleted, or its folder is gone)"),
)


def check_transition(old: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`TRANSITIONS`."""
    try:
        src, dst = Stage(old), Stage(new)
    except ValueError:
        raise IllegalTransition(f"unknown stage in {old!r} -> {new!r}") from None
    if src == dst and src not in FINAL_STAGES:
        return
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(f"illegal stage change {src.value} -> {dst.value}")


@dataclass(frozen=True)
class Migration:
    """One forward step of the journal's schema: ``PRAGMA user_version`` becomes ``version``.

    Steps run in order, each in the same transaction as the version bump, so a crash
    mid-migration leaves the journal at the previous version. To change the schema,
    append a step (never edit a released one): e.g.
    ``Migration(2, "files.group", ("ALTER TABLE files ADD COLUMN grp INTEGER",))``.
    """

    version: int
    description: str
    statements: tuple[str, ...]


#: the schema of release 0.1.0 (which set no user_version: such a journal is at 0)
_SCHEMA_0_1_0 = (
    """
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    drop_dir TEXT,
    fingerprint TEXT,
    stage TEXT NOT NULL,
    paused TEXT,
    error TEXT,
    error_detail TEXT,
    server TEXT NOT NULL,
    output_root TEXT NOT NULL,
    template TEXT,
    options TEXT NOT NULL DEFAULT '{}',
    job TEXT,
    session TEXT,
    remote_root TEXT,
    output_dir TEXT,
    progress TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL
)
""",
    """
CREATE INDEX IF NOT EXISTS datasets_path ON datasets(path, fingerprint)
""",
    """
CREATE TABLE IF NOT EXISTS files (
    dataset_id INTEGER NOT NULL REFERENCES datasets(id),
    rel TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    remote TEXT,
    uploaded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset_id, rel)
)
""",
    """
CREATE TABLE IF NOT EXISTS executions (
    dataset_id INTEGER NOT NULL REFERENCES datasets(id),
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    variant TEXT NOT NULL,
    run INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    vip_id TEXT,
    status TEXT,
    jobs TEXT,
    launched REAL,
    ended REAL,
    results_dir TEXT,
    logs_saved INTEGER NOT NULL DEFAULT 0,
    cleaned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset_id, key)
)
""",
    """
CREATE TABLE IF NOT EXISTS outputs (
    dataset_id INTEGER NOT NULL REFERENCES datasets(id),
    remote TEXT NOT NULL,
    exec_key TEXT NOT NULL,
    size INTEGER,
    local TEXT NOT NULL,
    downloaded INTEGER NOT NULL DEFAULT 0,
    extracted INTEGER NOT NULL DEFAULT 0,
    extracted_to TEXT,
    PRIMARY KEY (dataset_id, remote)
)
""",
    """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER,
    time REAL NOT NULL,
    level TEXT NOT NULL,
    stage TEXT,
    message TEXT NOT NULL
)
""",
    """
CREATE INDEX IF NOT EXISTS events_dataset ON events(dataset_id, id)
""",
)

MIGRATIONS: list[Migration] = [
    Migration(1, "release 0.1.0 tables (user_version added)", _SCHEMA_0_1_0),
    Migration(2, "outputs.remote_deleted: a mirrored output already deleted on VIP", (
        "ALTER TABLE outputs ADD COLUMN remote_deleted INTEGER NOT NULL DEFAULT 0",
    )),
    Migration(3, "drops: what the running agent sees of each drop folder", (
        "CREATE TABLE IF NOT EXISTS drops (path TEXT PRIMARY KEY, state TEXT NOT NULL,"
        " message TEXT, since REAL NOT NULL)",
    )),
    Migration(4, "indexes of the datasets in progress (looked for every 2 s by the scheduler)", (
        # without them that look scans every dataset ever run: 3.5 ms per look at 10,000,
        # most of an idle agent's CPU
        "CREATE INDEX IF NOT EXISTS datasets_stage ON datasets(stage)",
        "CREATE INDEX IF NOT EXISTS datasets_cancel ON datasets(cancel_requested)"
        " WHERE cancel_requested = 1",
    )),
    Migration(5, "index of the finished executions by end (how long a pipeline runs)", (
        "CREATE INDEX IF NOT EXISTS executions_finished ON executions(ended)"
        " WHERE status = 'Finished'",
    )),
    Migration(6, "meta (journal id, agent id) and leases (one owner per dataset)", (
        # the journal's own identity (a file replaced under a running agent is noticed) and
        # the agent id of this state folder (folded into remote session names)
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('journal_id', lower(hex(randomblob(16))))",
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('agent_id', lower(hex(randomblob(4))))",
        # the one process driving each dataset; a dead owner's lease is taken over
        "CREATE TABLE IF NOT EXISTS leases (dataset_id INTEGER PRIMARY KEY, token TEXT NOT NULL,"
        " role TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL, started TEXT,"
        " beat REAL NOT NULL, expires REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS leases_token ON leases(token)",
    )),
    Migration(7, "pauses: what a user paused (the agent, a drop folder, a dataset), by whom, when", (
        # scope 'all' (target ''), 'drop' (the drop folder's path) or 'dataset' (its id);
        # kept across restarts until `vip-agent resume` (agent/pause.py)
        "CREATE TABLE IF NOT EXISTS pauses (scope TEXT NOT NULL, target TEXT NOT NULL,"
        " by TEXT NOT NULL, via TEXT NOT NULL, since REAL NOT NULL, PRIMARY KEY (scope, target))",
    )),
    Migration(8, "dicom_*: the DICOM node's spool index, studies and hand-overs (agent/dicom)", (
        "CREATE TABLE IF NOT EXISTS dicom_objects (sop_uid TEXT PRIMARY KEY,"
        " study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, path TEXT NOT NULL,"
        " size INTEGER NOT NULL, received REAL NOT NULL, wave INTEGER NOT NULL DEFAULT 0,"
        " state TEXT NOT NULL DEFAULT 'spooled', info TEXT NOT NULL DEFAULT '{}')",
        "CREATE INDEX IF NOT EXISTS dicom_objects_study ON dicom_objects(study_uid, wave)",
        "CREATE TABLE IF NOT EXISTS dicom_studies (study_uid TEXT PRIMARY KEY,"
        " pseudonym TEXT NOT NULL, secret TEXT NOT NULL, first REAL NOT NULL, last REAL NOT NULL,"
        " objects INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0,"
        " late INTEGER NOT NULL DEFAULT 0, wave INTEGER NOT NULL DEFAULT 0,"
        " state TEXT NOT NULL DEFAULT 'pending', message TEXT)",
        "CREATE TABLE IF NOT EXISTS dicom_handovers (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " study_uid TEXT NOT NULL, wave INTEGER NOT NULL, route TEXT NOT NULL,"
        " dataset TEXT NOT NULL, drop_dir TEXT NOT NULL, objects INTEGER NOT NULL,"
        " at REAL NOT NULL, outcome TEXT NOT NULL, message TEXT)",
    )),
]
#: the schema version this code writes; a journal above it is refused
SCHEMA_VERSION = max(m.version for m in MIGRATIONS)

_JSON_COLUMNS = frozenset({"options", "job", "progress", "inputs", "jobs"})


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and value is not None and not isinstance(value, str):
        return json.dumps(value, sort_keys=True)
    return value


def _decode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and isinstance(value, str):
        return json.loads(value)
    return value


@dataclass
class Dataset:
    """A row of ``datasets``, JSON columns decoded."""

    id: int
    name: str
    path: str
    drop_dir: str | None
    fingerprint: str | None
    stage: Stage
    paused: str | None
    error: str | None
    error_detail: str | None
    server: str
    output_root: str
    template: str | None
    options: dict[str, Any]
    job: dict[str, Any] | None
    session: str | None
    remote_root: str | None
    output_dir: str | None
    progress: dict[str, Any] | None
    attempts: int
    cancel_requested: int
    created: float
    updated: float
    finished: float | None

    @property
    def attempt(self) -> int:
        """This attempt's number, counted from 1: ``attempts`` counts the runs before it
        (each ``retry``/``rerun``). The one number every surface shows (docs/operations.md,
        "Attempts and output folders")."""
        return self.attempts + 1

    @property
    def state(self) -> str:
        """The public state (``vip-agent status``)."""
        if self.paused and self.stage not in FINAL_STAGES:
            return "paused"
        if self.stage == "upload" and (self.error or "").startswith(UPLOAD_HELD):
            return "queued"  # held back by the scheduler: nothing sent yet
        return PUBLIC_STATE[self.stage]

    @property
    def final(self) -> bool:
        return self.stage in FINAL_STAGES


@dataclass
class Execution:
    dataset_id: int
    key: str
    name: str
    variant: str
    run: int
    inputs: dict[str, Any]
    vip_id: str | None
    status: str | None
    jobs: dict[str, Any] | None
    launched: float | None
    ended: float | None
    results_dir: str | None
    logs_saved: int
    cleaned: int


@dataclass
class FileRow:
    dataset_id: int
    rel: str
    size: int
    mtime_ns: int
    sha256: str | None
    remote: str | None
    uploaded: int


@dataclass
class Output:
    dataset_id: int
    remote: str
    exec_key: str
    size: int | None
    local: str
    downloaded: int
    extracted: int
    extracted_to: str | None
    #: the server's copy was deleted (mirrored outputs of an ``incomplete`` dataset)
    remote_deleted: int = 0


@dataclass
class Event:
    id: int
    dataset_id: int | None
    time: float
    level: str
    stage: str | None
    message: str


@dataclass
class DropState:
    """What the running agent sees of one drop folder (``watching``, ``missing``)."""

    path: str
    state: str
    message: str | None
    since: float


@dataclass
class Journal:
    """The journal file. Thread-safe: each thread gets its own connection."""

    path: Path
    _local: threading.local = field(default_factory=threading.local, repr=False)
    #: the process driving the datasets this handle records (``vip-agent run``): a dataset it
    #: adds is leased to it in the same transaction, so no service takes it meanwhile
    owner: Owner | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._migrate()
            st = os.stat(self.path)
            #: what this handle opened: (device, inode) and the id stored inside
            self.identity = (st.st_dev, st.st_ino, self.meta("journal_id") or "")
        except sqlite3.Error as err:
            self.close()
            raise self._unusable(err) from None
        except OSError as err:
            raise self._unusable(err) from None

    def _unusable(self, err: BaseException) -> JournalError:
        folder = self.path.parent
        if not folder.is_dir():
            why = "does not exist and cannot be created"
        elif not os.access(folder, os.W_OK | os.X_OK) or (
            self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK)
        ):
            why = "is not writable by this user"
        else:
            why = "holds a journal that cannot be opened"
        return JournalError(
            f"the state folder {folder} {why}; fix its permissions or give another --state "
            "(or `state:` in agent.yaml)",
            detail=f"{self.path}: {err}",
        )

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, or refuse one from a newer release."""
        # looked at before _db() switches the file to WAL: a refused journal stays as it was
        peek = sqlite3.connect(self.path, timeout=30)
        try:
            version = int(peek.execute("PRAGMA user_version").fetchone()[0])
        finally:
            peek.close()
        if version == SCHEMA_VERSION:
            return
        self._refuse_newer(version)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            # another process may have migrated it while we waited for the lock
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            self._refuse_newer(version)
            for step in MIGRATIONS:
                if step.version > version:
                    for statement in step.statements:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {int(step.version)}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            self.close()
            raise JournalError(
                f"the journal {self.path} was written by a newer vip-agent (journal version "
                f"{version}; this vip-agent knows up to {SCHEMA_VERSION}). Upgrade vip-agent, "
                "or use another state folder (--state); the journal was not changed",
                detail=f"PRAGMA user_version = {version}",
            )

    @classmethod
    def in_state_dir(cls, state_dir: Path | str) -> Journal:
        return cls(Path(state_dir) / JOURNAL_NAME)

    # -- connections -----------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed step survives power loss, not only a crash
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            # no memory-mapped reads: a file truncated under us must be an error, not SIGBUS
            db.execute("PRAGMA mmap_size=0")
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            raise self._write_error(err) from None

    def _write_error(self, err: sqlite3.OperationalError) -> Exception:
        """A typed :class:`JournalWriteError` for a journal that cannot be written now."""
        text = str(err).lower()
        for words, why in _WRITE_FAILURES:
            if words in text:
                return JournalWriteError(
                    f"cannot write the journal {self.path}: {why}. Nothing is lost: the service "
                    "waits and goes on by itself once the state folder is writable again "
                    "(`vip-agent run` stops; run it again then to resume)",
                    detail=str(err),
                )
        return err  # locked past the busy timeout, a bug: not a disk problem

    # -- identity and integrity ----------------------------------------------------
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

    # -- leases: one owner per dataset -------------------------------------------------
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

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- datasets --------------------------------------------------------------
    def add_dataset(
        self,
        *,
        name: str,
        path: str | Path,
        server: str,
        output_root: str | Path,
        fingerprint: str | None = None,
        drop_dir: str | Path | None = None,
        template: str | Path | None = None,
        options: dict[str, Any] | None = None,
        stage: str = "validate",
        error: str | None = None,
        error_detail: str | None = None,
    ) -> int:
        """Record a new dataset; returns its id."""
        stage = Stage(stage).value
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO datasets (name, path, drop_dir, fingerprint, stage, error,"
                " error_detail, server, output_root, template, options, created, updated,"
                " finished) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    str(path),
                    str(drop_dir) if drop_dir is not None else None,
                    fingerprint,
                    stage,
                    error,
                    error_detail,
                    server,
                    str(output_root),
                    str(template) if template is not None else None,
                    json.dumps(options or {}, sort_keys=True),
                    now,
                    now,
                    now if stage in FINAL_STAGES else None,
                ),
            )
            dataset_id = int(cur.lastrowid or 0)
            db.execute(
                "INSERT INTO events (dataset_id, time, level, stage, message) VALUES (?,?,?,?,?)",
                (dataset_id, now, "info", stage, f"dataset {name} recorded"),
            )
            if self.owner is not None:
                self._insert_lease(db, dataset_id, self.owner, now)
        return dataset_id

    def get(self, dataset_id: int) -> Dataset:
        row = self._db().execute("SELECT * FROM datasets WHERE id=?", (dataset_id,)).fetchone()
        if row is None:
            raise KeyError(f"no dataset with id {dataset_id}")
        return self._dataset(row)

    def datasets(self, *, where: str = "", params: Iterable[Any] = ()) -> list[Dataset]:
        """All datasets (optionally filtered by an SQL ``where`` clause), oldest first."""
        sql = "SELECT * FROM datasets" + (f" WHERE {where}" if where else "") + " ORDER BY id"
        return [self._dataset(r) for r in self._db().execute(sql, tuple(params))]

    def find(
        self, *, path: str | Path | None = None, fingerprint: str | None = None, name: str | None = None
    ) -> list[Dataset]:
        """Datasets matching every given field, oldest first."""
        clauses, params = [], []
        for column, value in (("path", path), ("fingerprint", fingerprint), ("name", name)):
            if value is not None:
                clauses.append(f"{column}=?")
                params.append(str(value))
        return self.datasets(where=" AND ".join(clauses), params=params)

    def latest_runs(self, drop_dir: str) -> dict[str, tuple[str, str | None, float]]:
        """Path -> (stage, fingerprint, updated) of the latest run of each dataset of a drop folder.

        One light query for a start-up scan (no JSON decoding of whole rows).
        """
        rows = self._db().execute(
            "SELECT path, stage, fingerprint, updated FROM datasets WHERE drop_dir=? ORDER BY id",
            (drop_dir,),
        )
        return {r[0]: (r[1], r[2], float(r[3])) for r in rows}

    def update(self, dataset_id: int, **fields: Any) -> None:
        """Set columns of a dataset (JSON columns take dicts)."""
        if not fields:
            return
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._write() as db:
            db.execute(
                f"UPDATE datasets SET {cols} WHERE id=?",
                (*(_encode(k, v) for k, v in fields.items()), dataset_id),
            )

    def set_stage(
        self,
        dataset_id: int,
        stage: str,
        *,
        message: str | None = None,
        error: str | None = None,
        detail: str | None = None,
        level: str | None = None,
    ) -> None:
        """Move a dataset to ``stage`` and record why, in one transaction.

        Raises :class:`IllegalTransition` (nothing written) for a change
        :data:`TRANSITIONS` does not allow, and :class:`KeyError` for an unknown id.
        """
        stage = Stage(stage)
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT stage FROM datasets WHERE id=?", (dataset_id,)).fetchone()
            if row is None:
                raise KeyError(f"no dataset with id {dataset_id}")
            check_transition(row["stage"], stage)
            db.execute(
                "UPDATE datasets SET stage=?, error=?, error_detail=?, updated=?,"
                " finished=CASE WHEN ? THEN ? ELSE NULL END WHERE id=?",
                (stage.value, error, detail, now, stage in FINAL_STAGES, now, dataset_id),
            )
            text = message or (error if error else f"stage {stage.value}")
            db.execute(
                "INSERT INTO events (dataset_id, time, level, stage, message) VALUES (?,?,?,?,?)",
                (dataset_id, now, level or ("error" if error else "info"), stage.value, text),
            )

    def reset_for_retry(self, dataset_id: int, *, fingerprint: str | None = None) -> int:
        """Send a final dataset back to ``validate`` as a new attempt; returns its number.

        The old plan (files, executions, outputs) is forgotten so the new attempt gets
        fresh session and execution names, and a fresh output folder: a retry never
        adopts the failed execution nor writes over the failed attempt's outputs.
        """
        now = time.time()
        with self._write() as db:
            row = db.execute(
                "SELECT attempts, stage FROM datasets WHERE id=?", (dataset_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no dataset with id {dataset_id}")
            check_transition(row["stage"], Stage.VALIDATE)
            attempt = int(row["attempts"]) + 1
            for table in ("files", "executions", "outputs"):
                db.execute(f"DELETE FROM {table} WHERE dataset_id=?", (dataset_id,))
            db.execute(
                "UPDATE datasets SET stage='validate', attempts=?, cancel_requested=0, paused=NULL,"
                " error=NULL, error_detail=NULL, progress=NULL, job=NULL, session=NULL,"
                " remote_root=NULL, output_dir=NULL, finished=NULL, updated=?,"
                " fingerprint=COALESCE(?, fingerprint) WHERE id=?",
                (attempt, now, fingerprint, dataset_id),
            )
            db.execute(
                "INSERT INTO events (dataset_id, time, level, stage, message) VALUES (?,?,?,?,?)",
                (dataset_id, now, "info", "validate", f"retry requested (attempt {attempt + 1})"),
            )
        return attempt

    def reopen(self, dataset_id: int, stage: str, *, message: str, cancel: bool = False) -> None:
        """Send an ``incomplete`` dataset back to ``stage``, keeping its plan and outputs.

        ``mirror`` fetches what was left on VIP (``retry``); ``cleanup`` with ``cancel``
        deletes it (``cancel --discard``). Other final stages go through ``reset_for_retry``.
        """
        stage = Stage(stage)
        check_transition(Stage.INCOMPLETE, stage)
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE datasets SET stage=?, cancel_requested=?, error=NULL, error_detail=NULL,"
                " progress=NULL, finished=NULL, updated=? WHERE id=? AND stage='incomplete'",
                (stage.value, 1 if cancel else 0, now, dataset_id),
            )
            if cur.rowcount != 1:
                raise ValueError(f"dataset {dataset_id} is not incomplete")
            db.execute(
                "INSERT INTO events (dataset_id, time, level, stage, message) VALUES (?,?,?,?,?)",
                (dataset_id, now, "info", stage.value, message),
            )

    # -- events ----------------------------------------------------------------
    def event(self, dataset_id: int | None, message: str, *, level: str = "info") -> None:
        with self._write() as db:
            stage = None
            if dataset_id is not None:
                row = db.execute("SELECT stage FROM datasets WHERE id=?", (dataset_id,)).fetchone()
                stage = row["stage"] if row else None
            db.execute(
                "INSERT INTO events (dataset_id, time, level, stage, message) VALUES (?,?,?,?,?)",
                (dataset_id, time.time(), level, stage, message),
            )

    def has_event(self, dataset_id: int, message: str) -> bool:
        """Whether the dataset's history holds an event with exactly this message."""
        row = self._db().execute(
            "SELECT 1 FROM events WHERE dataset_id=? AND message=? LIMIT 1", (dataset_id, message)
        ).fetchone()
        return row is not None

    def events(self, dataset_id: int | None = None, *, limit: int = 1000) -> list[Event]:
        if dataset_id is None:
            rows = self._db().execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._db().execute(
                "SELECT * FROM events WHERE dataset_id=? ORDER BY id DESC LIMIT ?",
                (dataset_id, limit),
            )
        return [Event(**dict(r)) for r in reversed(list(rows))]

    # -- files -----------------------------------------------------------------
    def set_files(self, dataset_id: int, entries: Iterable[tuple[str, int, int, str]]) -> None:
        """Record the dataset's files as (rel, size, mtime_ns, remote), replacing any list."""
        with self._write() as db:
            db.execute("DELETE FROM files WHERE dataset_id=?", (dataset_id,))
            db.executemany(
                "INSERT INTO files (dataset_id, rel, size, mtime_ns, remote) VALUES (?,?,?,?,?)",
                [(dataset_id, rel, size, mtime, remote) for rel, size, mtime, remote in entries],
            )

    def files(self, dataset_id: int) -> list[FileRow]:
        rows = self._db().execute(
            "SELECT * FROM files WHERE dataset_id=? ORDER BY rel", (dataset_id,)
        )
        return [FileRow(**dict(r)) for r in rows]

    def mark_uploaded(self, dataset_id: int, rel: str, sha256: str) -> None:
        self.mark_uploaded_many(dataset_id, [(rel, sha256)])

    def mark_uploaded_many(self, dataset_id: int, done: Iterable[tuple[str, str | None]]) -> None:
        """Mark files sent, as (rel, sha256), in one transaction (a group commit)."""
        with self._write() as db:
            db.executemany(
                "UPDATE files SET uploaded=1, sha256=COALESCE(?, sha256) WHERE dataset_id=? AND rel=?",
                [(sha256, dataset_id, rel) for rel, sha256 in done],
            )

    def unmark_uploaded(self, dataset_id: int, rels: Iterable[str]) -> None:
        """Mark files to send again (the server does not have them at the right size)."""
        with self._write() as db:
            db.executemany(
                "UPDATE files SET uploaded=0 WHERE dataset_id=? AND rel=?",
                [(dataset_id, rel) for rel in rels],
            )

    # -- executions ------------------------------------------------------------
    def add_execution(
        self, dataset_id: int, *, key: str, name: str, variant: str, run: int, inputs: dict[str, Any]
    ) -> None:
        """Plan an execution (idempotent: an existing key is kept as it is)."""
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO executions (dataset_id, key, name, variant, run, inputs)"
                " VALUES (?,?,?,?,?,?)",
                (dataset_id, key, name, variant, run, json.dumps(inputs, sort_keys=True)),
            )

    def executions(self, dataset_id: int) -> list[Execution]:
        rows = self._db().execute(
            "SELECT * FROM executions WHERE dataset_id=? ORDER BY variant, run", (dataset_id,)
        )
        return [Execution(**{k: _decode(k, r[k]) for k in r.keys()}) for r in rows]

    def update_execution(self, dataset_id: int, key: str, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._write() as db:
            db.execute(
                f"UPDATE executions SET {cols} WHERE dataset_id=? AND key=?",
                (*(_encode(k, v) for k, v in fields.items()), dataset_id, key),
            )

    def running_executions(self, server: str | None = None) -> int:
        """How many executions the journal believes are running (on one server)."""
        sql = (
            "SELECT COUNT(*) FROM executions e JOIN datasets d ON d.id = e.dataset_id"
            # anything not known to have ended may still run (Unknown, odd words included)
            " WHERE e.vip_id IS NOT NULL AND (e.status IS NULL OR e.status NOT IN"
            " ('Finished', 'InitializationFailed', 'ExecutionFailed', 'Killed', 'Lost'))"
        )
        params: tuple[Any, ...] = ()
        if server is not None:
            sql += " AND d.server = ?"
            params = (server,)
        return int(self._db().execute(sql, params).fetchone()[0])

    def run_times(self, server: str, limit: int = 200) -> list[tuple[str, float]]:
        """``(pipeline, seconds)`` from launch to the end being seen, of the ``limit`` latest
        executions that finished on ``server`` (newest first)."""
        rows = self._db().execute(
            "SELECT d.job, e.launched, e.ended FROM executions e"
            " JOIN datasets d ON d.id = e.dataset_id"
            " WHERE e.status = 'Finished' AND d.server = ?"
            " AND e.launched IS NOT NULL AND e.ended IS NOT NULL"
            " ORDER BY e.ended DESC LIMIT ?",
            (server, limit),
        )
        out = []
        for job, launched, ended in rows:
            pipeline = (_decode("job", job) or {}).get("pipeline")
            if isinstance(pipeline, str):
                out.append((pipeline, float(ended) - float(launched)))
        return out

    def waiting_launches(self, server: str) -> int:
        """Datasets of ``server`` with an execution planned but not launched (waiting for a slot)."""
        sql = (
            "SELECT COUNT(*) FROM datasets d WHERE d.server = ? AND (d.stage = 'launch' OR"
            " (d.stage = 'monitor' AND EXISTS (SELECT 1 FROM executions e"
            " WHERE e.dataset_id = d.id AND e.vip_id IS NULL"
            " AND (e.status IS NULL OR e.status != 'Refused'))))"  # refused for good: not waiting
        )
        return int(self._db().execute(sql, (server,)).fetchone()[0])

    # -- outputs ---------------------------------------------------------------
    def add_output(
        self, dataset_id: int, *, remote: str, exec_key: str, size: int | None, local: str
    ) -> None:
        """Record an output to mirror (idempotent; a known output keeps its progress)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO outputs (dataset_id, remote, exec_key, size, local) VALUES (?,?,?,?,?)"
                " ON CONFLICT (dataset_id, remote) DO UPDATE SET size=excluded.size",
                (dataset_id, remote, exec_key, size, local),
            )

    def outputs(self, dataset_id: int) -> list[Output]:
        rows = self._db().execute(
            "SELECT * FROM outputs WHERE dataset_id=? ORDER BY remote", (dataset_id,)
        )
        return [Output(**dict(r)) for r in rows]

    def update_output(self, dataset_id: int, remote: str, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._write() as db:
            db.execute(
                f"UPDATE outputs SET {cols} WHERE dataset_id=? AND remote=?",
                (*fields.values(), dataset_id, remote),
            )

    # -- drop folders ----------------------------------------------------------
    def set_drop_state(self, path: str, state: str, message: str | None = None) -> None:
        """Record what the agent sees of a drop folder (kept while it stays the same)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO drops (path, state, message, since) VALUES (?,?,?,?)"
                " ON CONFLICT (path) DO UPDATE SET message=excluded.message,"
                " since=CASE WHEN drops.state = excluded.state THEN drops.since ELSE excluded.since END,"
                " state=excluded.state",
                (path, state, message, time.time()),
            )

    def clear_drop_states(self) -> None:
        """Forget every drop folder (the agent stops watching)."""
        with self._write() as db:
            db.execute("DELETE FROM drops")

    def drop_states(self) -> list[DropState]:
        rows = self._db().execute("SELECT * FROM drops ORDER BY path")
        return [DropState(**dict(r)) for r in rows]

    # -- helpers ---------------------------------------------------------------
    @staticmethod
    def _dataset(row: sqlite3.Row) -> Dataset:
        values = {k: _decode(k, row[k]) for k in row.keys()}
        values["options"] = values["options"] or {}
        values["stage"] = Stage(values["stage"])
        return Dataset(**values)
