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
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.journalfile import (
    _WRITE_FAILURES,
    IdentityStore,
    JournalError,
    JournalLost,
    JournalWriteError,
    connect,
)
from agent.migrations import MIGRATIONS, SCHEMA_VERSION, Migration
from agent.owners import LEASE_BEAT, LEASE_TTL, Lease, LeaseStore, Owner
from agent.procs import pid_alive, process_start
from agent.records import (
    Dataset,
    DropState,
    Event,
    Execution,
    FileRow,
    Output,
    _decode,
    _encode,
)
from agent.stages import (
    ACTIVE_STAGES_SQL,
    FINAL_SQL,
    FINAL_STAGES,
    LIVE_SQL,
    PUBLIC_STATE,
    RETRYABLE_STAGES,
    STAGES,
    TRANSITIONS,
    UPLOAD_HELD,
    IllegalTransition,
    Stage,
    check_transition,
)

JOURNAL_NAME = "journal.sqlite3"

# the journal's vocabulary, importable from here as before the split into stages/records/...
__all__ = [
    "ACTIVE_STAGES_SQL",
    "Dataset",
    "DropState",
    "Event",
    "Execution",
    "FINAL_SQL",
    "FINAL_STAGES",
    "FileRow",
    "IllegalTransition",
    "JOURNAL_NAME",
    "Journal",
    "JournalError",
    "JournalLost",
    "JournalWriteError",
    "LEASE_BEAT",
    "LEASE_TTL",
    "LIVE_SQL",
    "Lease",
    "MIGRATIONS",
    "Migration",
    "Output",
    "Owner",
    "PUBLIC_STATE",
    "RETRYABLE_STAGES",
    "SCHEMA_VERSION",
    "STAGES",
    "Stage",
    "TRANSITIONS",
    "UPLOAD_HELD",
    "check_transition",
    "pid_alive",
    "process_start",
]


@dataclass
class Journal(LeaseStore, IdentityStore):
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
            db = connect(self.path)  # FULL: a committed step survives power loss
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
