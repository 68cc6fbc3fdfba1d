"""Journal leases (one owner per dataset), identity and write failures, on a real SQLite file.

Owners that are dead are real dead processes (a child that exited and was reaped), a reused
pid is this very process recorded with another start time, and another host's owner lives
only as long as its heartbeat.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.journal import (
    LEASE_TTL,
    Journal,
    JournalLost,
    JournalWriteError,
    Owner,
    process_start,
)


def add(journal: Journal, name: str = "d", stage: str = "validate") -> int:
    return journal.add_dataset(name=name, path=f"/x/{name}", server="http://s:1", output_root="/o",
                               stage=stage)  # fmt: skip


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def other_process() -> Iterator[Owner]:
    """A live process other than this one, as the owner it would be (a `vip-agent run`)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        me = Owner.this_process("run")
        yield replace(me, pid=child.pid, started=process_start(child.pid))
    finally:
        child.kill()
        child.wait()


def test_a_live_owner_keeps_its_dataset_and_a_second_take_is_refused(
    tmp_path: Path, other_process: Owner
) -> None:
    journal = Journal.in_state_dir(tmp_path)
    ds = add(journal)
    service, run = Owner.this_process("service"), other_process
    assert journal.take_lease(ds, run) is None
    assert journal.take_lease(ds, run) is None  # taking one's own lease again is fine
    held = journal.take_lease(ds, service)
    assert held is not None and held.owner.token == run.token
    assert held.owner.describe() == f"vip-agent run (pid {run.pid})"
    assert journal.holds_lease(ds, run) and not journal.holds_lease(ds, service)
    journal.release_lease(ds, service)  # not its lease: nothing happens
    assert journal.holds_lease(ds, run)
    journal.release_lease(ds, run)
    assert journal.take_lease(ds, service) is None and journal.holds_lease(ds, service)


def test_a_dead_owner_loses_its_lease_at_once(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    ds = add(journal)
    gone = replace(Owner.this_process("run"), pid=dead_pid())
    assert journal.take_lease(ds, gone) is None
    # its heartbeat has not expired, but the process is gone: a SIGKILLed run blocks nothing
    lease = journal.lease(ds)
    assert lease is not None and lease.expires > time.time() and not lease.alive()
    service = Owner.this_process("service")
    assert journal.take_lease(ds, service) is None and journal.holds_lease(ds, service)


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="no process start times here")
def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    ds = add(journal)
    # a live pid (ours) recorded with another start: the owner died and its pid was reused
    ghost = replace(Owner.this_process("run"), started=f"{process_start(os.getpid())}0")
    assert journal.take_lease(ds, ghost) is None
    assert journal.take_lease(ds, Owner.this_process("service")) is None


def test_another_hosts_owner_lives_until_its_heartbeat_expires(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    ds = add(journal)
    remote = replace(Owner.this_process("run"), host="other-pc", pid=1, started=None)
    assert journal.take_lease(ds, remote) is None
    held = journal.take_lease(ds, Owner.this_process("service"))
    assert held is not None and "on other-pc" in held.owner.describe()
    assert journal.renew_leases(remote) == 1
    # its heartbeat stops: the lease expires after LEASE_TTL
    with sqlite3.connect(journal.path) as db:
        db.execute("UPDATE leases SET expires=?", (time.time() - 1,))
    assert journal.take_lease(ds, Owner.this_process("service")) is None
    assert LEASE_TTL >= 30  # long enough for a busy machine's heartbeat


def test_a_dataset_recorded_by_an_owner_is_leased_in_the_same_write(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    run = Owner.this_process("run")
    journal.owner = run
    ds = add(journal)
    lease = journal.lease(ds)
    assert lease is not None and lease.owner.token == run.token


def test_a_service_restarted_in_the_same_process_takes_its_datasets_back(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    ds = add(journal)
    assert journal.take_lease(ds, Owner.this_process("service")) is None
    again = Owner.this_process("service")  # a new scheduler of the same process
    assert journal.take_lease(ds, again) is None and journal.holds_lease(ds, again)


def test_only_one_of_many_racing_owners_wins(tmp_path: Path) -> None:
    Journal.in_state_dir(tmp_path)  # created and migrated once
    ds = add(Journal.in_state_dir(tmp_path))
    # as many live processes (their pids differ: the same process would take its own lease)
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
                for _ in range(4)]  # fmt: skip
    me = Owner.this_process("run")
    owners = [replace(me, pid=c.pid, started=process_start(c.pid), token=f"t{c.pid}")
              for c in children]  # fmt: skip
    results: dict[str, bool] = {}
    barrier = threading.Barrier(len(owners))

    def take(owner: Owner) -> None:
        journal = Journal.in_state_dir(tmp_path)
        barrier.wait()
        results[owner.token] = journal.take_lease(ds, owner) is None

    threads = [threading.Thread(target=take, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in children:
        c.kill()
        c.wait()
    assert sum(results.values()) == 1


def test_the_journal_has_an_id_and_an_agent_id_kept_across_opens(tmp_path: Path) -> None:
    first = Journal.in_state_dir(tmp_path)
    again = Journal.in_state_dir(tmp_path)
    assert len(first.journal_id) == 32 and first.journal_id == again.journal_id
    assert len(first.agent_id()) == 8 and first.agent_id() == again.agent_id()
    other = Journal.in_state_dir(tmp_path / "other")
    assert other.journal_id != first.journal_id and other.agent_id() != first.agent_id()


def test_a_journal_deleted_replaced_or_emptied_is_noticed(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path / "a")
    add(journal)
    assert journal.changed_under_us() is None
    # replaced by another journal (a copy, a restore under a running agent)
    other = Journal.in_state_dir(tmp_path / "b")
    add(other)
    other.close()
    os.replace(other.path, journal.path)
    assert "replaced" in (journal.changed_under_us() or "")
    journal = Journal.in_state_dir(tmp_path / "c")
    add(journal)
    os.truncate(journal.path, 0)
    assert "emptied" in (journal.changed_under_us() or "")
    journal = Journal.in_state_dir(tmp_path / "d")
    journal.path.unlink()
    assert "deleted" in (journal.changed_under_us() or "")


def test_a_damaged_journal_is_refused_with_one_line(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    for i in range(300):
        add(journal, f"d{i}")
    with sqlite3.connect(journal.path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal.close()
    raw = bytearray(journal.path.read_bytes())
    page = 4096
    raw[page * 2: page * 4] = b"\xff" * (page * 2)  # two pages of datasets overwritten
    journal.path.write_bytes(bytes(raw))
    with pytest.raises(JournalLost) as caught:
        Journal.in_state_dir(tmp_path).check_integrity()
    assert "damaged" in caught.value.message and "\n" not in caught.value.message


def test_a_write_on_a_read_only_journal_is_a_typed_error(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    ds = add(journal)
    journal.close()
    ro = Journal(journal.path)
    ro._local.db = sqlite3.connect(f"file:{journal.path}?mode=ro", uri=True, isolation_level=None)
    with pytest.raises(JournalWriteError) as caught:
        ro.update(ds, error="x")
    assert "read-only" in caught.value.message and "waits" in caught.value.message
    ro.close()
    assert Journal(journal.path).get(ds).error is None  # nothing was written
