"""Pause and resume (like Syncthing): the whole agent, one drop folder, or one dataset.

A pause is a row of the journal's ``pauses`` table (``scope`` ``all``, ``drop`` or
``dataset``; who paused it, from where, since when), kept across restarts until
``vip-agent resume``. The rule, the same for the CLI, the page and ``STATUS.json``
(docs/operations.md#pause-and-resume):

* a paused dataset starts nothing new: no validation, upload, launch, download,
  extraction or clean-up. A transfer in progress stops at its next chunk (within a
  second): files already sent or mirrored are kept, the file in flight is sent again
  from its start on resume. An execution already running on VIP keeps running and is
  still polled (harmless), so the agent sees it end, but its outputs wait.
* ``cancel`` still works on a paused dataset (a cancel is an explicit request to stop).
* new datasets are still detected and recorded; once complete they show ``paused``.
* the state ``paused`` shows in ``status`` (with who paused it and since when), the
  page, ``/metrics`` and ``STATUS.json``.

The dataset's ``paused`` column carries the text shown (the same column a refused API
key uses); :func:`sync` keeps it equal to the pauses, whoever changed them (a CLI with no
agent running, the page, the scheduler after a restart).
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError
from agent.journal import ACTIVE_STAGES_SQL, Dataset, Journal

SCOPES = ("all", "drop", "dataset")
#: every text this module writes into ``datasets.paused`` starts so (a refused key's does not)
PREFIX = "paused by "


class CannotPause(AgentError):
    """Nothing to pause or resume (a finished dataset, an unknown drop folder)."""

    exit_code = 1


@dataclass(frozen=True)
class Pause:
    """One row of ``pauses``."""

    scope: str  # all | drop | dataset
    target: str  # '' | the drop folder's path | the dataset's id
    by: str  # the user name (or "status page")
    via: str  # "command line" | "status page"
    since: float

    def what(self) -> str:
        if self.scope == "all":
            return "the whole agent"
        if self.scope == "drop":
            return f"drop folder {self.target}"
        return f"dataset #{self.target}"

    def resume_command(self) -> str:
        if self.scope == "all":
            return "vip-agent resume --all"
        if self.scope == "drop":
            return f"vip-agent resume --drop {self.target}"
        return f"vip-agent resume {self.target}"

    def reason(self) -> str:
        """The text a paused dataset shows (``status``, the page, ``STATUS.json``)."""
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.since))
        return (
            f"{PREFIX}{self.by} ({self.via}) since {stamp}: {self.what()}; "
            f"`{self.resume_command()}` resumes it"
        )

    def to_json(self) -> dict[str, object]:
        return {"scope": self.scope, "target": self.target, "by": self.by, "via": self.via,
                "since": self.since, "what": self.what()}  # fmt: skip


class Pauses:
    """A snapshot of the pauses, to ask quickly which one holds a dataset."""

    def __init__(self, rows: Iterable[Pause] = ()) -> None:
        self.rows = tuple(rows)
        self._by = {(p.scope, p.target): p for p in self.rows}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pauses) and set(self.rows) == set(other.rows)

    def __hash__(self) -> int:
        return hash(frozenset(self.rows))

    def __bool__(self) -> bool:
        return bool(self.rows)

    def holding(self, dataset_id: int, drop_dir: str | None) -> Pause | None:
        """The pause that holds a dataset: its own first, then its drop folder's, then the agent's."""
        if not self.rows:
            return None
        return (
            self._by.get(("dataset", str(dataset_id)))
            or (self._by.get(("drop", drop_dir)) if drop_dir else None)
            or self._by.get(("all", ""))
        )

    def agent(self) -> Pause | None:
        return self._by.get(("all", ""))

    def drop(self, path: str) -> Pause | None:
        return self._by.get(("drop", path))


def read(journal: Journal) -> Pauses:
    """Every pause recorded in the journal."""
    rows = journal._db().execute("SELECT scope, target, by, via, since FROM pauses ORDER BY since")
    return Pauses(Pause(r[0], r[1], r[2], r[3], float(r[4])) for r in rows)


def who() -> str:
    """The user pausing from this shell (never fails: a container may have no passwd entry)."""
    try:
        return getpass.getuser()
    except Exception:  # KeyError/OSError without a passwd entry
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown user"


def add(journal: Journal, scope: str, target: str, *, by: str, via: str) -> tuple[Pause, bool]:
    """Record a pause (the first one of a scope stays: who paused first, since when);
    returns it and whether it is new. Then :func:`sync`."""
    if scope not in SCOPES:
        raise ValueError(scope)
    with journal._write() as db:
        cur = db.execute(
            "INSERT OR IGNORE INTO pauses (scope, target, by, via, since) VALUES (?,?,?,?,?)",
            (scope, target, by, via, time.time()),
        )
        new = cur.rowcount == 1
    current = read(journal)._by[(scope, target)]
    sync(journal)
    return current, new


def remove(journal: Journal, scope: str | None, target: str = "") -> int:
    """Lift one pause (``scope`` None: every pause); the number lifted. Then :func:`sync`."""
    with journal._write() as db:
        if scope is None:
            cur = db.execute("DELETE FROM pauses")
        else:
            cur = db.execute("DELETE FROM pauses WHERE scope=? AND target=?", (scope, target))
        n = cur.rowcount
    sync(journal)
    return n


def sync(journal: Journal, pauses: Pauses | None = None) -> list[int]:
    """Make the ``paused`` column of every dataset in progress say what holds it; returns
    the ids whose text changed. A refused key's text (not ours) is left alone."""
    pauses = read(journal) if pauses is None else pauses
    changed: list[tuple[str | None, int]] = []
    rows = journal._db().execute(
        f"SELECT id, drop_dir, paused FROM datasets WHERE stage IN {ACTIVE_STAGES_SQL}"
    )
    for dataset_id, drop_dir, current in rows:
        held = pauses.holding(int(dataset_id), drop_dir)
        if held is not None:
            if current is None or current.startswith(PREFIX):
                text = held.reason()
                if text != current:
                    changed.append((text, int(dataset_id)))
        elif current is not None and current.startswith(PREFIX):
            changed.append((None, int(dataset_id)))
    if changed:
        with journal._write() as db:
            db.executemany("UPDATE datasets SET paused=? WHERE id=?", changed)
        for _, dataset_id in changed:
            _write_status(journal, dataset_id)
    return [i for _, i in changed]


def _write_status(journal: Journal, dataset_id: int) -> None:
    """STATUS.json says ``paused`` (or no longer) at once: a held dataset is not stepped, and
    the runner writes it only when it steps (best effort, as the runner's own)."""
    import json

    from agent.fsutil import write_atomic
    from agent.runner import STATUS_FILE, status_record

    ds = journal.get(dataset_id)
    if not ds.output_dir or not Path(ds.output_dir).is_dir():
        return
    try:
        write_atomic(Path(ds.output_dir) / STATUS_FILE, json.dumps(status_record(journal, ds), indent=2))
    except OSError:
        pass  # the next step writes it


def holding(journal: Journal, ds: Dataset, pauses: Pauses | None = None) -> Pause | None:
    """The pause holding ``ds`` (None when it is not held, or has ended)."""
    if ds.final:
        return None
    pauses = read(journal) if pauses is None else pauses
    return pauses.holding(ds.id, ds.drop_dir)


# -- what the CLI and the page ask for ---------------------------------------------------
def known_drops(journal: Journal, configured: Iterable[str] = ()) -> list[str]:
    """Drop folders this agent knows: configured, watched now, or recorded with a dataset."""
    found = set(configured)
    found.update(d.path for d in journal.drop_states())
    found.update(
        r[0] for r in journal._db().execute("SELECT DISTINCT drop_dir FROM datasets") if r[0]
    )
    found.update(p.target for p in read(journal).rows if p.scope == "drop")  # so it can be resumed
    return sorted(found)


def drop_target(journal: Journal, path: str | Path, configured: Iterable[str] = ()) -> str:
    """The drop folder ``path`` names, as recorded (resolved); CannotPause when unknown."""
    wanted = str(Path(path).expanduser().resolve())
    known = known_drops(journal, configured)
    if wanted in known:
        return wanted
    listing = ", ".join(known) if known else "none yet"
    raise CannotPause(f"{path} is not a drop folder of this agent (its drop folders: {listing})")


def pause_dataset(journal: Journal, ds: Dataset, *, by: str, via: str) -> tuple[Pause, bool]:
    if ds.final:
        raise CannotPause(f"{ds.name} is {ds.state}: it has ended, there is nothing to pause")
    return add(journal, "dataset", str(ds.id), by=by, via=via)


def resume_dataset(journal: Journal, ds: Dataset) -> tuple[int, Pause | None]:
    """Lift the dataset's own pause; (lifted, the pause still holding it: its drop folder's
    or the agent's, which only their own resume lifts)."""
    lifted = remove(journal, "dataset", str(ds.id))
    return lifted, holding(journal, ds)


# -- one request, for the CLI and the page -------------------------------------------------
def request(
    journal: Journal, action: str, *, dataset: Dataset | None = None, drop: str | None = None,
    by: str, via: str,
) -> str:
    """Pause or resume (``action``) a dataset, a drop folder (its recorded path) or, with
    neither, the whole agent; returns the sentence to show. A running agent applies it at
    its next look at the journal (within about 2 s)."""
    if action == "pause":
        if dataset is not None:
            p, new = pause_dataset(journal, dataset, by=by, via=via)
        elif drop is not None:
            p, new = add(journal, "drop", drop, by=by, via=via)
        else:
            p, new = add(journal, "all", "", by=by, via=via)
        if not new:
            return f"{p.what()} was already paused (by {p.by}, {p.via}); `{p.resume_command()}` resumes it"
        return (
            f"{p.what()} paused: nothing new starts (transfers stop at their next chunk; "
            f"executions already on VIP keep running); `{p.resume_command()}` resumes it"
        )
    if action != "resume":
        raise ValueError(action)
    if dataset is not None:
        lifted, still = resume_dataset(journal, dataset)
        if still is not None:
            return (
                f"#{dataset.id} {dataset.name} is still paused: {still.what()} is paused "
                f"(`{still.resume_command()}`)"
            )
        if not lifted:
            return f"#{dataset.id} {dataset.name} was not paused"
        return f"#{dataset.id} {dataset.name} resumed"
    if drop is not None:
        lifted = remove(journal, "drop", drop)
        agent_pause = read(journal).agent()
        if agent_pause is not None:
            return (f"drop folder {drop} {'resumed' if lifted else 'was not paused'}, but the whole "
                    "agent is paused (`vip-agent resume --all`)")  # fmt: skip
        return f"drop folder {drop} resumed" if lifted else f"drop folder {drop} was not paused"
    lifted = remove(journal, None)
    if not lifted:
        return "nothing was paused"
    return f"resumed: {lifted} pause(s) lifted (the agent, drop folders and datasets)"


# -- the commands ----------------------------------------------------------------------------
