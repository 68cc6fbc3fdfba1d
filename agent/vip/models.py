"""Typed views of VIP JSON records, tolerant of VIP and CARMIN dialects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: a timestamp above this is in milliseconds (1e11 s is the year 5138)
_MS_THRESHOLD = 1e11


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
