"""The server's own durable state: ``<root>/.localvip/state.sqlite3`` (WAL).

Holds users (API keys only as SHA-256 hashes), executions, jobs and returned
files, so executions survive a restart. One connection shared by all threads,
serialised by a lock (the server's writes are tiny).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    email TEXT PRIMARY KEY, folder TEXT NOT NULL, key_sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS executions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL, user TEXT NOT NULL, name TEXT NOT NULL, pipeline TEXT NOT NULL,
    status TEXT NOT NULL, inputs TEXT NOT NULL, results_dir TEXT NOT NULL, stamp_dir TEXT NOT NULL,
    start_ms INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    exec_id TEXT NOT NULL, job INTEGER NOT NULL, status TEXT NOT NULL,
    exit_code INTEGER NOT NULL DEFAULT 0, exit_message TEXT, inputs TEXT NOT NULL,
    PRIMARY KEY (exec_id, job));
CREATE TABLE IF NOT EXISTS outputs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    exec_id TEXT NOT NULL, job INTEGER NOT NULL, output_id TEXT NOT NULL, path TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS outputs_exec ON outputs (exec_id);
"""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class ExecRow:
    id: str
    user: str
    name: str
    pipeline: str
    status: str
    inputs: dict[str, list[str]]
    results_dir: str
    stamp_dir: str
    start_ms: int
    deleted: bool


@dataclass
class JobRow:
    job: int
    status: str
    exit_code: int
    exit_message: str | None
    inputs: dict[str, list[str]]


class State:
    """Thread-safe access to the state database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # -- users -----------------------------------------------------------------
    def set_user(self, email: str, folder: str, key: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO users(email, folder, key_sha256) VALUES (?,?,?) "
                "ON CONFLICT(email) DO UPDATE SET folder=excluded.folder, key_sha256=excluded.key_sha256",
                (email, folder, key_hash(key)),
            )

    # -- executions ------------------------------------------------------------
    def add_execution(self, row: ExecRow, jobs: list[dict[str, list[str]]]) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO executions(id, user, name, pipeline, status, inputs, results_dir, stamp_dir,"
                " start_ms, deleted) VALUES (?,?,?,?,?,?,?,?,?,0)",
                (row.id, row.user, row.name, row.pipeline, row.status, json.dumps(row.inputs),
                 row.results_dir, row.stamp_dir, row.start_ms),
            )
            db.executemany(
                "INSERT INTO jobs(exec_id, job, status, inputs) VALUES (?,?,?,?)",
                [(row.id, n, "QUEUED", json.dumps(v)) for n, v in enumerate(jobs)],
            )

    def exists_id(self, exec_id: str) -> bool:
        return bool(self.query("SELECT 1 FROM executions WHERE id=?", (exec_id,)))

    def execution(self, exec_id: str) -> ExecRow | None:
        rows = self.query(
            "SELECT id, user, name, pipeline, status, inputs, results_dir, stamp_dir, start_ms, deleted"
            " FROM executions WHERE id=?",
            (exec_id,),
        )
        return _exec(rows[0]) if rows else None

    def executions(self, user: str, limit: int) -> list[ExecRow]:
        rows = self.query(
            "SELECT id, user, name, pipeline, status, inputs, results_dir, stamp_dir, start_ms, deleted"
            " FROM executions WHERE user=? AND deleted=0 ORDER BY start_ms DESC, seq DESC LIMIT ?",
            (user, limit),
        )
        return [_exec(r) for r in rows]

    def count(self, user: str) -> int:
        return int(self.query("SELECT COUNT(*) FROM executions WHERE user=? AND deleted=0", (user,))[0][0])

    def running(self, user: str | None = None) -> int:
        if user is None:
            return int(self.query("SELECT COUNT(*) FROM executions WHERE status='Running'")[0][0])
        return int(
            self.query("SELECT COUNT(*) FROM executions WHERE status='Running' AND user=?", (user,))[0][0]
        )

    def running_ids(self) -> list[str]:
        return [r[0] for r in self.query("SELECT id FROM executions WHERE status='Running'")]

    def set_status(self, exec_id: str, status: str, *, only_if: str | None = None) -> bool:
        with self.tx() as db:
            if only_if is None:
                cur = db.execute("UPDATE executions SET status=? WHERE id=?", (status, exec_id))
            else:
                cur = db.execute(
                    "UPDATE executions SET status=? WHERE id=? AND status=?", (status, exec_id, only_if)
                )
            return cur.rowcount > 0

    def rename(self, exec_id: str, name: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE executions SET name=? WHERE id=?", (name, exec_id))

    def mark_deleted(self, exec_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE executions SET deleted=1 WHERE id=?", (exec_id,))

    # -- jobs ------------------------------------------------------------------
    def jobs(self, exec_id: str) -> list[JobRow]:
        rows = self.query(
            "SELECT job, status, exit_code, exit_message, inputs FROM jobs WHERE exec_id=? ORDER BY job",
            (exec_id,),
        )
        return [JobRow(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def set_job(self, exec_id: str, job: int, status: str, exit_code: int = 0,
                exit_message: str | None = None) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE jobs SET status=?, exit_code=?, exit_message=? WHERE exec_id=? AND job=?",
                (status, exit_code, exit_message, exec_id, job),
            )

    def add_output(self, exec_id: str, job: int, output_id: str, path: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO outputs(exec_id, job, output_id, path) VALUES (?,?,?,?)",
                (exec_id, job, output_id, path),
            )

    def outputs(self, exec_id: str) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self.query("SELECT output_id, path FROM outputs WHERE exec_id=? ORDER BY seq", (exec_id,))
        ]


def _exec(r: tuple[Any, ...]) -> ExecRow:
    return ExecRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], int(r[8]), bool(r[9]))
