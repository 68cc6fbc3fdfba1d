"""Typed views of VIP JSON records, tolerant of VIP and CARMIN dialects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from agent.vip.errors import UnsafePathError

#: a timestamp above this is in milliseconds (1e11 s is the year 5138)
_MS_THRESHOLD = 1e11


#: VIP's eight REST status labels, by what they mean for a client
ACTIVE_STATUSES = frozenset({"Initializing", "Ready", "Running"})
#: the execution ended: nothing of it runs on the server any more
ENDED_STATUSES = frozenset({"Finished", "InitializationFailed", "ExecutionFailed", "Killed"})
#: the engine lost track of it, or it is being killed: it may still run
UNKNOWN_STATUS = "Unknown"
KNOWN_STATUSES = ACTIVE_STATUSES | ENDED_STATUSES | {UNKNOWN_STATUS}


def status_kind(status: str) -> str:
    """``"active"``, ``"ended"``, ``"unknown"`` (the ``Unknown`` label) or ``"strange"``.

    A word that is not one of VIP's eight labels is ``"strange"``: callers treat it as still
    running, since only a label that says so proves an execution ended.
    """
    if status in ENDED_STATUSES:
        return "ended"
    if status in ACTIVE_STATUSES:
        return "active"
    if status == UNKNOWN_STATUS:
        return "unknown"
    return "strange"


def check_server_path(path: Any, under: str | None = None) -> str:
    """A path received from VIP, checked: absolute, no ``.``/``..``/empty segments, and
    strictly below ``under`` when given. Returns it without a trailing ``/``.

    Raises :class:`UnsafePathError` with a message saying what is wrong.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"VIP returned {path!r} where a file path was expected")
    if "\x00" in path or not path.startswith("/"):
        raise UnsafePathError(
            f"VIP returned the path {path!r}, which is not absolute; refusing to use it",
            detail=f"path={path!r}",
        )
    segments = path.rstrip("/").split("/")[1:]
    if any(seg in ("", ".", "..") for seg in segments):
        raise UnsafePathError(
            f"VIP returned the path {path!r}, which has empty, '.' or '..' parts; refusing to use it",
            detail=f"path={path!r}",
        )
    clean = "/" + "/".join(segments)
    if under is not None:
        base = PurePosixPath(under.rstrip("/") or "/")
        if base == PurePosixPath(clean) or base not in PurePosixPath(clean).parents:
            raise UnsafePathError(
                f"VIP returned the path {path!r}, which is not inside {base}; refusing to use it",
                detail=f"path={path!r} expected under {base}",
            )
    return clean


def to_seconds(value: Any) -> float | None:
    """A VIP timestamp in seconds: accepts None, seconds or milliseconds (> 1e11), numbers or digit strings."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != number or number <= 0:  # NaN or unset
        return None
    return number / 1000.0 if number > _MS_THRESHOLD else number


def start_seconds(execution: dict[str, Any]) -> float | None:
    """An execution's ``startDate`` in seconds (VIP sends ms, CARMIN says s), or None."""
    return to_seconds(execution.get("startDate"))


@dataclass(frozen=True)
class PathInfo:
    """One ``PathProperties`` record (``action=properties``, ``action=list``, ``/results``)."""

    path: str
    is_dir: bool
    #: bytes for files; for folders VIP gives the entry count (properties) or 0 (list)
    size: int | None
    exists: bool
    #: seconds since the epoch, or None (VIP usually sends null for files)
    mtime: float | None
    mime_type: str | None

    @classmethod
    def from_json(cls, record: dict[str, Any], fallback_path: str = "") -> PathInfo:
        """Build from VIP (``path``) or CARMIN (``platformPath``) JSON; missing keys are tolerated."""
        path = record.get("path") or record.get("platformPath") or fallback_path
        size = record.get("size")
        exists = record.get("exists")
        return cls(
            path=str(path),
            is_dir=bool(record.get("isDirectory")),
            size=int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else None,
            # a record without "exists" comes from a listing, where every entry exists
            exists=True if exists is None else bool(exists),
            mtime=to_seconds(record.get("lastModificationDate")),
            mime_type=record.get("mimeType"),
        )

    @property
    def name(self) -> str:
        """Last path segment."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]
