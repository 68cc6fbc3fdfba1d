"""The journal: stage transitions, schema version and migrations, unusable state folders."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from agenthelpers import run_agent, tmpfs, write_dataset

from agent import journal as journal_mod
from agent.journal import (
    FINAL_STAGES,
    MIGRATIONS,
    SCHEMA_VERSION,
    TRANSITIONS,
    IllegalTransition,
    Journal,
    JournalError,
    Migration,
    Stage,
)

FIXTURE = Path(__file__).parent / "fixtures" / "journal-0.1.0.sqlite3"


def add(journal: Journal, stage: str = "validate", name: str = "d") -> int:
    return journal.add_dataset(name=name, path=f"/x/{name}", server="http://s:1", output_root="/o",
                               stage=stage)  # fmt: skip


# -- stages -----------------------------------------------------------------------------


def test_the_runners_paths_are_legal(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    paths = [
        ["waiting", "validate", "upload", "launch", "monitor", "mirror", "extract", "cleanup", "done"],
        ["validate", "upload", "launch", "monitor", "mirror", "cleanup", "incomplete", "validate"],
        ["validate", "upload", "launch", "monitor", "mirror", "incomplete", "cancelled", "validate"],
        ["validate", "failed", "validate", "upload", "cancelled"],
        ["waiting", "cancelled"],
        ["validate", "upload", "launch", "monitor", "mirror", "extract", "cleanup", "done", "validate"],
    ]
    for path in paths:
        i = add(journal, path[0])
        for stage in path[1:]:
            journal.set_stage(i, stage)
        assert journal.get(i).stage == path[-1]
    i = add(journal, "failed")
    journal.reset_for_retry(i)
    assert journal.get(i).stage is Stage.VALIDATE


@pytest.mark.parametrize(("start", "path", "bad"), [
    ("validate", [], "done"),              # skipping the whole run
    ("upload", [], "mirror"),              # skipping launch and monitor
    ("validate", ["upload", "launch", "monitor", "mirror", "cleanup", "done"], "upload"),  # done is done
    ("validate", ["cancelled"], "cancelled"),  # a final stage is not re-entered
    ("validate", ["upload"], "waiting"),
    ("validate", ["upload"], "nonsense"),
])  # fmt: skip
def test_illegal_transition_raises_and_writes_nothing(tmp_path: Path, start: str, path: list[str],
                                                      bad: str) -> None:  # fmt: skip
    journal = Journal.in_state_dir(tmp_path)
    i = add(journal, start)
    for stage in path:
        journal.set_stage(i, stage)
    before = (journal.get(i), len(journal.events(i)))
    with pytest.raises((IllegalTransition, ValueError)):
        journal.set_stage(i, bad)
    assert (journal.get(i), len(journal.events(i))) == before


def test_retry_only_from_a_retryable_final_stage(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    for stage in ("monitor", "upload"):
        i = add(journal, stage, name=stage)
        with pytest.raises(IllegalTransition):
            journal.reset_for_retry(i)
        assert journal.get(i).stage == stage and journal.get(i).attempts == 0
    i = add(journal, "incomplete", name="inc")
    assert journal.get(i).final and journal.get(i).state == "incomplete"
    journal.reset_for_retry(i)
    assert journal.get(i).stage == "validate"


def test_table_is_complete_and_stages_are_text() -> None:
    assert set(TRANSITIONS) == set(Stage)
    assert Stage.INCOMPLETE in FINAL_STAGES
    assert Stage.DONE == "done" and f"{Stage.DONE}" == "done" and str(Stage.MIRROR) == "mirror"
    for final in FINAL_STAGES - {Stage.INCOMPLETE}:  # never back into the middle of a run
        assert TRANSITIONS[final] <= {Stage.VALIDATE, Stage.CANCELLED}
    # an incomplete dataset fetches what was left (mirror) or discards it (cleanup)
    assert TRANSITIONS[Stage.INCOMPLETE] == {Stage.VALIDATE, Stage.CANCELLED, Stage.MIRROR,
                                             Stage.CLEANUP}  # fmt: skip


# -- schema version and migrations ------------------------------------------------------


def _raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return list(db.execute(sql))
    finally:
        db.close()


@pytest.fixture
def old_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(FIXTURE, state / "journal.sqlite3")
    return state


def test_a_0_1_0_journal_opens_with_every_dataset_intact(old_state: Path) -> None:
    path = old_state / "journal.sqlite3"
    assert _raw(path, "PRAGMA user_version") == [(0,)]
    tables = ("datasets", "files", "executions", "outputs", "events")
    before = {t: _raw(path, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}
    journal = Journal(path)
    assert _raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    after = {t: _raw(path, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}
    # migration 2 added outputs.remote_deleted (0) at the end of each row
    assert {row[-1] for row in after["outputs"]} == {0}
    after["outputs"] = [row[:-1] for row in after["outputs"]]
    assert after == before and len(before["datasets"]) == 11
    rows = journal.datasets()
    assert {d.stage for d in rows} == set(Stage) - {Stage.INCOMPLETE}
    monitor = journal.find(name="subject-monitor")[0]
    assert journal.executions(monitor.id)[0].vip_id == "workflow-4"
    assert journal.files(monitor.id)[0].rel == "data.txt"
    # the migrated journal is usable: a running dataset goes on
    journal.set_stage(monitor.id, "mirror")
    journal.close()
    Journal(path).close()  # opening again migrates nothing twice
    assert _raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_status_lists_a_0_1_0_journal(old_state: Path, tmp_path: Path) -> None:
    done = run_agent("status", "--state", str(old_state), api_key="unused", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name, state in (("subject-waiting", "waiting"), ("subject-upload", "uploading"),
                        ("subject-monitor", "running"), ("subject-done", "done"),
                        ("subject-failed", "failed"), ("subject-cancelled", "cancelled")):  # fmt: skip
        line = next(x for x in done.stdout.splitlines() if name in x)
        assert state in line, line
    assert sum("subject-" in x for x in done.stdout.splitlines()) == 11


def test_a_journal_from_a_newer_release_is_refused(old_state: Path, tmp_path: Path) -> None:
    path = old_state / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    data = path.read_bytes()
    with pytest.raises(JournalError, match="newer vip-agent"):
        Journal(path)
    done = run_agent("status", "--state", str(old_state), api_key="unused", cwd=tmp_path)
    assert done.returncode == 2
    assert "newer vip-agent" in done.stderr and "Traceback" not in done.stderr
    assert path.read_bytes() == data


def test_an_appended_migration_runs_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    path = tmp_path / "journal.sqlite3"
    i = add(Journal(path))
    step = Migration(SCHEMA_VERSION + 1, "a test column", ("ALTER TABLE datasets ADD COLUMN extra TEXT",
                                                           "UPDATE datasets SET extra = 'x'"))  # fmt: skip
    monkeypatch.setattr(journal_mod, "MIGRATIONS", [*MIGRATIONS, step])
    monkeypatch.setattr(journal_mod, "SCHEMA_VERSION", step.version)
    Journal(path).close()
    Journal(path).close()  # a second open does not run it again (it would fail: column exists)
    assert _raw(path, "PRAGMA user_version") == [(step.version,)]
    assert _raw(path, f"SELECT extra FROM datasets WHERE id={i}") == [("x",)]


# -- unusable state folders ---------------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A read-only folder: a read-only tmpfs as root (root ignores permission bits)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=1m", "cannot mount a read-only tmpfs here"):
        yield folder


def test_read_only_or_impossible_state_folder_is_exit_2(tmp_path: Path, read_only_folder: Path) -> None:
    dataset = write_dataset(tmp_path / "ds", {"a.txt": "x"}, {"pipeline": "FileStats/1.0",
                                                             "inputs": {"input_file": "a.txt"}})  # fmt: skip
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for state in (read_only_folder, blocker / "state"):
        for args in (["run", str(dataset), "--server", "http://127.0.0.1:9", "--state", str(state)],
                     ["watch", str(tmp_path), "--server", "http://127.0.0.1:9", "--state", str(state)]):  # fmt: skip
            done = run_agent(*args, api_key="k", cwd=tmp_path, timeout=30)
            assert done.returncode == 2, (args, done.stderr)
            assert "state folder" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_scheduler_s_periodic_look_uses_an_index(tmp_path: Path) -> None:
    # it runs every 2 s among every dataset ever run: a table scan cost 3.5 ms at 10,000
    from agent.journal import ACTIVE_STAGES_SQL, LIVE_SQL

    journal = Journal.in_state_dir(tmp_path / "state")
    journal.close()
    for where in (LIVE_SQL, f"stage IN {ACTIVE_STAGES_SQL}"):
        plan = _raw(tmp_path / "state" / "journal.sqlite3",
                    f"EXPLAIN QUERY PLAN SELECT * FROM datasets WHERE {where}")
        details = " | ".join(str(row[-1]) for row in plan)
        assert "SCAN datasets" not in details and "USING INDEX" in details, details
