"""What the DICOM node shows to ``status``, ``dicom status``, ``doctor``, the page and ``/metrics``.

The running node rewrites ``<state>/dicom/status.json`` (its counters, address and
open associations) whenever they change; the studies come from the journal's
index. So any process reading the state folder sees the same thing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.dicom.index import DicomIndex, StudyRow
from agent.fsutil import write_atomic

STATUS_FILE = "status.json"
PORT_FILE = "dicom-port"
#: studies in these states are still in the spool, not handed over
NOT_HANDED = ("pending", "unrouted", "refused")
_T = TypeVar("_T")


def dicom_dir(state: Path) -> Path:
    return Path(state) / "dicom"


def write_status(state: Path, data: dict[str, Any]) -> None:
    folder = dicom_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / STATUS_FILE, json.dumps(data, sort_keys=True))


def read_status(state: Path) -> dict[str, Any] | None:
    """The node's last status (None: no DICOM node ever ran with this state folder)."""
    try:
        data = json.loads((dicom_dir(state) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def study_view(study: StudyRow, now: float | None = None) -> dict[str, Any]:
    """One study as shown to people: pseudonym only, never a UID or a name."""
    now = time.time() if now is None else now
    return {
        "study": study.pseudonym,
        "state": study.state,
        "objects": study.objects,
        "duplicates": study.duplicates,
        "late": study.late,
        "wave": study.wave,
        "age": round(max(0.0, now - study.last), 1),
        "first": study.first,
        "message": study.message,
    }


def _reading(journal_path: Path, read: Callable[[DicomIndex], _T]) -> _T | None:
    """``read(index)`` on the journal's DICOM index; None when there is none to read (an old
    journal without DICOM tables, or no journal at all)."""
    try:
        index = DicomIndex(journal_path)
        try:
            return read(index)
        finally:
            index.close()
    except Exception:
        return None


def pending_studies(journal_path: Path) -> list[dict[str, Any]]:
    """Studies still in the spool (pending, unrouted, refused); [] without DICOM tables."""
    rows = _reading(journal_path, lambda index: index.studies(*NOT_HANDED)) or []
    return [study_view(s) for s in rows]


def all_studies(journal_path: Path) -> list[dict[str, Any]]:
    rows = _reading(journal_path, lambda index: index.studies()) or []
    return [study_view(s) for s in rows]


def spool_summary(journal_path: Path) -> dict[str, Any] | None:
    """What the spool holds and what its retention deleted (``DicomIndex.spool_summary``;
    ``oldest_handed`` as an age in seconds); None without DICOM tables."""
    data = _reading(journal_path, lambda index: index.spool_summary())
    if data is None:
        return None
    oldest = data.pop("oldest_handed")
    data["oldest_handed_age"] = None if oldest is None else round(max(0.0, time.time() - oldest), 1)
    return data


def dicom_view(journal_path: Path) -> dict[str, Any] | None:
    """The node and its pending studies for the status page (None: no DICOM node ran here)."""
    node = read_status(Path(journal_path).parent)
    if node is None:
        return None
    return {"node": node, "pending": pending_studies(Path(journal_path))}
