"""Read-only questions about the journal: what the CLI, the web page and tests all ask.

Everything here reads the journal (safe while an agent runs) and the files on
disk; nothing changes state (that is :mod:`agent.actions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent import pause as user_pause
from agent import settings
from agent.errors import AgentError
from agent.journal import JOURNAL_NAME, PUBLIC_STATE, Dataset, Journal
from agent.progress import current as current_progress
from agent.runner import LOGS_DIR, status_record
from agent.timeline import all_segments
from agent.watch.lock import AgentLock


class NotFound(AgentError):
    """No dataset matches the name or id given."""

    exit_code = 1


def state_dir(state: Path | str | None = None, config: Path | str | None = None) -> Path:
    """``state``, else ``VIP_AGENT_STATE``, else the ``state`` of ``config`` (or of the
    per-user agent.yaml), else the default: :func:`agent.settings.state_dir`."""
    return settings.state_dir(state, config)


def open_journal(state: Path) -> Journal | None:
    """The journal of a state folder, or None if no agent ever ran there."""
    if not (state / JOURNAL_NAME).is_file():
        return None
    return Journal.in_state_dir(state)


def find_dataset(journal: Journal, ref: str) -> Dataset:
    """The dataset ``#ID`` (or a bare number that is an id), else the latest one named ``ref``."""
    text = ref.strip()
    if text.startswith("#") or text.isdigit():
        number = text.lstrip("#")
        if number.isdigit():
            try:
                return journal.get(int(number))
            except KeyError:
                if text.startswith("#"):
                    raise NotFound(
                        f"no dataset with id {text} in the journal (see `vip-agent status`)"
                    ) from None
    rows = journal.find(name=text)
    if not rows:
        rows = [d for d in journal.datasets() if Path(d.path).name == text]
    if not rows:
        raise NotFound(f"no dataset named {ref!r} in the journal (see `vip-agent status`)")
    return rows[-1]


def open_dataset(state: Path, ref: str) -> tuple[Journal, Dataset]:
    """The journal in ``state`` and its dataset ``ref`` (a name or ``#ID``); NotFound otherwise."""
    journal = open_journal(state)
    if journal is None:
        raise NotFound(f"no journal in {state}: nothing has run there yet")
    return journal, find_dataset(journal, ref)


def agent_pid(state: Path) -> int | None:
    """pid of the agent holding ``state`` (0 if unknown), None if no agent runs."""
    return AgentLock(state).held_by_other()


def who_takes_it(state: Path, alone: str = "start `vip-agent watch` to run it") -> str:
    """What happens next to a dataset queued again: the running agent takes it, or ``alone``."""
    pid = agent_pid(state)
    if pid is not None:
        return f"the running agent (pid {pid or '?'}) takes it within seconds"
    return f"no agent is running: {alone}"


def record(journal: Journal, ds: Dataset, pauses: user_pause.Pauses | None = None) -> dict[str, Any]:
    """One entry of ``vip-agent status --json``: STATUS.json's fields (``attempt``: this
    attempt's number, from 1) plus ``id`` and ``attempts`` (the earlier attempts: ``attempt``
    - 1, kept for scripts) (and ``paused_by``: who paused it, from where, since when, when a
    user pause holds it)."""
    rec = status_record(journal, ds)
    rec = {"id": ds.id, **rec, "attempts": ds.attempts}
    if rec.get("state") == "paused" and (ds.paused or "").startswith(user_pause.PREFIX):
        held = user_pause.holding(journal, ds, pauses)
        if held is not None:
            rec["paused_by"] = held.to_json()
    rec["progress"] = current_progress(rec)  # an upload's figures are history once it downloads
    if ds.paused and not ds.final and not rec.get("error"):
        rec["error"] = ds.paused
    return rec


def list_records(journal: Journal | None, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Exactly what ``vip-agent status --json`` prints (every dataset, oldest first)."""
    if journal is None:
        return []
    rows = journal.datasets()
    if names:
        wanted = set(names)
        ids = {int(n.lstrip("#")) for n in wanted if n.lstrip("#").isdigit()}
        rows = [d for d in rows if d.name in wanted or Path(d.path).name in wanted or d.id in ids]
    pauses = user_pause.read(journal)
    return [record(journal, d, pauses) for d in rows]


def stage_timeline(journal: Journal, ds: Dataset) -> list[dict[str, Any]]:
    """The stages the dataset went through, from its events: ``[{stage, state, start, end}]``.

    A stage that comes back (a retry) is a new entry; ``end`` is when the next stage
    began, or the dataset's end for the last one (None while it is still there).
    """
    events = (e for e in journal.events(ds.id, limit=100_000) if e.stage in PUBLIC_STATE)
    spans = [
        {"stage": seg.stage, "state": PUBLIC_STATE[seg.stage], "start": seg.start, "end": seg.end}
        for seg in all_segments(events)
    ]
    if spans and ds.final and spans[-1]["stage"] == ds.stage:
        spans[-1]["end"] = ds.finished or spans[-1]["start"]
    return spans


def log_files(ds: Dataset) -> list[str]:
    """The execution logs saved on disk (``<output>/logs/<variant>-r<n>/*.txt``), sorted."""
    if not ds.output_dir:
        return []
    folder = Path(ds.output_dir) / LOGS_DIR
    if not folder.is_dir():
        return []
    # a name starting with "." is a log still being written (write_atomic's temporary file)
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def detail(journal: Journal, ds: Dataset) -> dict[str, Any]:
    """One dataset in full (``vip-agent status NAME --json``, the web page's detail view).

    The :func:`record` fields, plus ``events`` ([{time, level, stage, message}]),
    ``stages`` (:func:`stage_timeline`), ``runs`` (each execution with its VIP
    status and times), ``outputs`` (each remote file, where it lands, whether it
    arrived), ``output`` (the dataset's output folder), ``logs`` (files on disk)
    and ``error_detail``.
    """
    rec = record(journal, ds)
    rec["output"] = ds.output_dir
    rec["error_detail"] = ds.error_detail
    rec["server"] = ds.server
    rec["stages"] = stage_timeline(journal, ds)
    rec["events"] = [
        {"time": ev.time, "level": ev.level, "stage": ev.stage, "message": ev.message}
        for ev in journal.events(ds.id, limit=100_000)
    ]
    rec["runs"] = [
        {
            "key": e.key, "name": e.name, "variant": e.variant, "run": e.run,
            "vip_id": e.vip_id, "status": e.status, "launched": e.launched, "ended": e.ended,
            "results_dir": e.results_dir,
        }
        for e in journal.executions(ds.id)
    ]  # fmt: skip
    rec["outputs"] = [
        {
            "remote": o.remote, "local": o.local, "size": o.size, "execution": o.exec_key,
            "downloaded": bool(o.downloaded), "extracted_to": o.extracted_to,
            # an archive extracted into a folder of its own name (as VipSession does): a folder
            "kind": "folder" if o.extracted_to and Path(o.extracted_to).is_dir() else "file",
        }
        for o in journal.outputs(ds.id)
    ]  # fmt: skip
    rec["logs"] = log_files(ds)
    return rec
