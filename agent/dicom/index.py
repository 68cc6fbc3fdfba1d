"""The spool's index in the journal (tables ``dicom_objects``, ``dicom_studies``,
``dicom_handovers``, created by journal migration 8).

The spooled files are the truth: an object is fsynced and renamed into the spool
before it is indexed, and :meth:`DicomIndex.missing` lets the node index at
start-up any file a crash left unindexed. So this connection commits with
``synchronous=NORMAL`` (WAL: durable across a crash of the process, one fsync fewer
per object than the journal's FULL).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.journalfile import connect

#: study states: collecting objects / handed over / waiting for a route / refused at hand-over
PENDING, HANDED, UNROUTED, REFUSED = "pending", "handed", "unrouted", "refused"
#: object states (``purged``: handed over, its file deleted by the spool's retention; the row
#: stays so that a resend is still a duplicate and the study's late objects stay late)
SPOOLED, IGNORED, PURGED = "spooled", "ignored", "purged"


@dataclass(frozen=True)
class ObjectRow:
    sop_uid: str
    study_uid: str
    series_uid: str
    path: str
    size: int
    received: float
    wave: int
    state: str
    info: dict[str, Any]


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    pseudonym: str
    secret: str
    first: float
    last: float
    objects: int
    duplicates: int
    late: int
    wave: int
    state: str
    message: str | None


@dataclass(frozen=True)
class Stored:
    """What :meth:`DicomIndex.add` did with one object."""

    duplicate: bool
    #: the study had been handed over: this object is late (its wave says what happens)
    late: bool
    wave: int
    ignored: bool


class DicomIndex:
    """Thread-safe access to the DICOM tables of one journal file."""

    def __init__(self, journal_path: Path) -> None:
        self.path = Path(journal_path)
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # NORMAL: the index is rebuilt from the spool at start (docs/dicom.md)
            db = connect(self.path, synchronous="NORMAL", any_thread=True)
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- objects ---------------------------------------------------------------------
    def known(self, sop_uid: str) -> bool:
        row = self._db().execute("SELECT 1 FROM dicom_objects WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return row is not None

    def add(self, sop_uid: str, study_uid: str, series_uid: str, path: str, size: int,
            info: dict[str, Any], late_policy: str, now: float | None = None) -> Stored:  # fmt: skip
        """Index one spooled object; a SOPInstanceUID already indexed is a duplicate, and so is
        an object without a ``path`` (a resend that was not written)."""
        with self._write() as db:
            return self._add(db, sop_uid, study_uid, series_uid, path, size, info, late_policy, now)

    def add_many(self, objects: list[tuple[str, str, str, str, int, dict[str, Any]]],
                 late_policy: str) -> list[Stored]:  # fmt: skip
        """:meth:`add` for several objects (sop, study, series, path, size, info) in order, in
        one transaction (one journal commit instead of one per object)."""
        with self._write() as db:
            return [self._add(db, *obj, late_policy, None) for obj in objects]

    def _add(self, db: sqlite3.Connection, sop_uid: str, study_uid: str, series_uid: str, path: str, size: int,
             info: dict[str, Any], late_policy: str, now: float | None) -> Stored:  # fmt: skip
        now = time.time() if now is None else now
        # path "": a resend whose first copy is indexed, or still on its way to the index
        if not path or db.execute("SELECT 1 FROM dicom_objects WHERE sop_uid = ?", (sop_uid,)).fetchone():
            db.execute("UPDATE dicom_studies SET duplicates = duplicates + 1 WHERE study_uid = ?",
                       (study_uid,))  # fmt: skip
            return Stored(True, False, 0, False)
        study = db.execute("SELECT state, wave FROM dicom_studies WHERE study_uid = ?",
                           (study_uid,)).fetchone()  # fmt: skip
        late = ignored = False
        if study is None:
            wave = 0
            db.execute(
                "INSERT INTO dicom_studies (study_uid, pseudonym, secret, first, last, state)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (study_uid, secrets.token_hex(4), secrets.token_hex(16), now, now, PENDING),
            )
        else:
            wave = int(study["wave"])
            if study["state"] == HANDED:
                late = True
                if late_policy == "ignore":
                    ignored = True
                else:
                    wave += 1
                    db.execute("UPDATE dicom_studies SET wave = ?, state = ?, message = NULL"
                               " WHERE study_uid = ?", (wave, PENDING, study_uid))  # fmt: skip
            elif study["state"] in (UNROUTED, REFUSED):
                # new objects may complete what was missing: look again
                db.execute("UPDATE dicom_studies SET state = ? WHERE study_uid = ?", (PENDING, study_uid))
        db.execute(
            "INSERT INTO dicom_objects (sop_uid, study_uid, series_uid, path, size, received,"
            " wave, state, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sop_uid, study_uid, series_uid, path, size, now, wave,
             IGNORED if ignored else SPOOLED, json.dumps(info)),
        )  # fmt: skip
        db.execute(
            "UPDATE dicom_studies SET objects = objects + 1, late = late + ?,"
            " last = CASE WHEN ? THEN last ELSE ? END WHERE study_uid = ?",
            (1 if late else 0, 1 if ignored else 0, now, study_uid),
        )
        return Stored(False, late, wave, ignored)

    def objects(self, study_uid: str, wave: int | None = None) -> list[ObjectRow]:
        """The study's spooled objects (of one wave, or all), in series/instance order."""
        sql = "SELECT * FROM dicom_objects WHERE study_uid = ? AND state = ?"
        params: list[Any] = [study_uid, SPOOLED]
        if wave is not None:
            sql += " AND wave = ?"
            params.append(wave)
        rows = [self._object(r) for r in self._db().execute(sql, params)]
        return sorted(rows, key=lambda o: (o.info.get("SeriesNumber") or 0, o.series_uid,
                                           o.info.get("InstanceNumber") or 0, o.sop_uid))  # fmt: skip

    def paths(self) -> set[str]:
        return {r[0] for r in self._db().execute("SELECT path FROM dicom_objects")}

    # -- studies ---------------------------------------------------------------------
    def study(self, study_uid: str) -> StudyRow | None:
        row = self._db().execute("SELECT * FROM dicom_studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return self._study(row) if row is not None else None

    def studies(self, *states: str) -> list[StudyRow]:
        if states:
            marks = ", ".join("?" for _ in states)
            rows = self._db().execute(f"SELECT * FROM dicom_studies WHERE state IN ({marks}) ORDER BY first",
                                      states)  # fmt: skip
        else:
            rows = self._db().execute("SELECT * FROM dicom_studies ORDER BY first")
        return [self._study(r) for r in rows]

    def set_state(self, study_uid: str, state: str, message: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE dicom_studies SET state = ?, message = ? WHERE study_uid = ?",
                       (state, message, study_uid))  # fmt: skip

    def finish(self, study_uid: str, taken: set[str], late_policy: str, message: str) -> int:
        """Mark a study handed over; objects that arrived DURING the hand-over (not in ``taken``)
        are late ones: a new wave (``new``/``rerun``) or ignored. Returns how many there were."""
        with self._write() as db:
            row = db.execute("SELECT wave FROM dicom_studies WHERE study_uid = ?", (study_uid,)).fetchone()
            wave = int(row["wave"])
            extra = [r[0] for r in db.execute(
                "SELECT sop_uid FROM dicom_objects WHERE study_uid = ? AND wave = ? AND state = ?",
                (study_uid, wave, SPOOLED)) if r[0] not in taken]  # fmt: skip
            if not extra:
                db.execute("UPDATE dicom_studies SET state = ?, message = ? WHERE study_uid = ?",
                           (HANDED, message, study_uid))  # fmt: skip
                return 0
            marks = ", ".join("?" for _ in extra)
            if late_policy == "ignore":
                db.execute(f"UPDATE dicom_objects SET state = ? WHERE sop_uid IN ({marks})", (IGNORED, *extra))
                db.execute("UPDATE dicom_studies SET state = ?, message = ?, late = late + ? WHERE study_uid = ?",
                           (HANDED, message, len(extra), study_uid))  # fmt: skip
            else:
                db.execute(f"UPDATE dicom_objects SET wave = ? WHERE sop_uid IN ({marks})", (wave + 1, *extra))
                db.execute("UPDATE dicom_studies SET state = ?, message = ?, wave = ?, late = late + ?"
                           " WHERE study_uid = ?", (PENDING, message, wave + 1, len(extra), study_uid))  # fmt: skip
            return len(extra)

    def handed(self, study_uid: str, wave: int, route: str, dataset: str, drop_dir: str,
               objects: int, outcome: str, message: str | None = None) -> None:  # fmt: skip
        with self._write() as db:
            db.execute(
                "INSERT INTO dicom_handovers (study_uid, wave, route, dataset, drop_dir, objects, at,"
                " outcome, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study_uid, wave, route, dataset, drop_dir, objects, time.time(), outcome, message),
            )

    def handovers(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM dicom_handovers", ()  # type: tuple[str, tuple[str, ...]]
        if study_uid is not None:
            sql, params = sql + " WHERE study_uid = ?", (study_uid,)
        return [dict(r) for r in self._db().execute(sql + " ORDER BY id", params)]

    def counts(self) -> dict[str, int]:
        """Studies per state."""
        rows = self._db().execute("SELECT state, COUNT(*) FROM dicom_studies GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}

    # -- retention (agent/dicom/retention.py) ---------------------------------------------
    def handed_studies(self) -> list[tuple[StudyRow, float]]:
        """Handed-over studies with objects still in the spool, each with the later of its last
        hand-over and its last object (``time.time()``), oldest first."""
        rows = self._db().execute(
            "SELECT s.*, MAX(COALESCE((SELECT MAX(h.at) FROM dicom_handovers h WHERE h.study_uid = s.study_uid"
            " AND h.outcome = 'handed'), 0), COALESCE((SELECT MAX(o.received) FROM dicom_objects o"
            " WHERE o.study_uid = s.study_uid), 0)) AS since FROM dicom_studies s WHERE s.state = ? AND EXISTS"
            " (SELECT 1 FROM dicom_objects o WHERE o.study_uid = s.study_uid AND o.state IN (?, ?))"
            " ORDER BY since", (HANDED, SPOOLED, IGNORED))  # fmt: skip
        return [(self._study(r), float(r["since"])) for r in rows]

    def held(self, study_uid: str) -> list[ObjectRow]:
        """The study's objects whose files are in the spool (spooled or ignored), every wave."""
        rows = self._db().execute("SELECT * FROM dicom_objects WHERE study_uid = ? AND state IN (?, ?)",
                                  (study_uid, SPOOLED, IGNORED))  # fmt: skip
        return [self._object(r) for r in rows]

    def handed_routes(self, study_uid: str) -> set[tuple[int, str]]:
        """(wave, route label) of every dataset of the study handed over."""
        rows = self._db().execute("SELECT DISTINCT wave, route FROM dicom_handovers WHERE study_uid = ?"
                                  " AND outcome = 'handed'", (study_uid,))  # fmt: skip
        return {(int(r[0]), str(r[1])) for r in rows}

    def purge(self, study_uid: str, sop_uids: set[str]) -> list[ObjectRow]:
        """Mark these objects purged if their study is still handed over (a late object may
        have made it pending since it was chosen); the rows marked, whose files the caller
        deletes, then calls :meth:`forget_paths`."""
        with self._write() as db:
            row = db.execute("SELECT state FROM dicom_studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None or row["state"] != HANDED:
                return []
            rows = [self._object(r) for r in db.execute(
                "SELECT * FROM dicom_objects WHERE study_uid = ? AND state IN (?, ?)", (study_uid, SPOOLED, IGNORED))
                if r["sop_uid"] in sop_uids]  # fmt: skip
            db.executemany("UPDATE dicom_objects SET state = ? WHERE sop_uid = ?", [(PURGED, r.sop_uid) for r in rows])
        return rows

    def forget_paths(self, sop_uids: list[str]) -> None:
        """Purged objects whose files are gone: no path left to delete."""
        with self._write() as db:
            db.executemany("UPDATE dicom_objects SET path = '' WHERE sop_uid = ? AND state = ?",
                           [(sop, PURGED) for sop in sop_uids])  # fmt: skip

    def purged_leftovers(self) -> list[tuple[str, str, str]]:
        """(sop_uid, study_uid, path) of purged objects whose file a stop may have left undeleted."""
        rows = self._db().execute("SELECT sop_uid, study_uid, path FROM dicom_objects WHERE state = ?"
                                  " AND path != ''", (PURGED,))  # fmt: skip
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def spool_summary(self) -> dict[str, Any]:
        """What the spool holds (objects, bytes) and what retention deleted so far."""
        db = self._db()
        held = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM dicom_objects WHERE state IN (?, ?)",
                          (SPOOLED, IGNORED)).fetchone()  # fmt: skip
        gone = db.execute("SELECT COUNT(DISTINCT study_uid), COUNT(*), COALESCE(SUM(size), 0) FROM dicom_objects"
                          " WHERE state = ?", (PURGED,)).fetchone()  # fmt: skip
        handed = self.handed_studies()
        return {
            "objects": int(held[0]), "bytes": int(held[1]),
            "handed_studies": len(handed), "oldest_handed": handed[0][1] if handed else None,
            "purged_studies": int(gone[0]), "purged_objects": int(gone[1]), "purged_bytes": int(gone[2]),
        }  # fmt: skip

    @staticmethod
    def _object(row: sqlite3.Row) -> ObjectRow:
        return ObjectRow(row["sop_uid"], row["study_uid"], row["series_uid"], row["path"], int(row["size"]),
                         float(row["received"]), int(row["wave"]), row["state"], json.loads(row["info"]))  # fmt: skip

    @staticmethod
    def _study(row: sqlite3.Row) -> StudyRow:
        return StudyRow(row["study_uid"], row["pseudonym"], row["secret"], float(row["first"]),
                        float(row["last"]), int(row["objects"]), int(row["duplicates"]), int(row["late"]),
                        int(row["wave"]), row["state"], row["message"])  # fmt: skip
