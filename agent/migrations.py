"""The journal's schema as a list of forward steps (``PRAGMA user_version``): a release
appends a step, never edits one."""

from __future__ import annotations

from dataclasses import dataclass


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
    Migration(9, "index of the DICOM hand-overs by study (read for every study in status and the loop)", (
        "CREATE INDEX IF NOT EXISTS dicom_handovers_study ON dicom_handovers(study_uid, wave)",
    )),
]
#: the schema version this code writes; a journal above it is refused
SCHEMA_VERSION = max(m.version for m in MIGRATIONS)
