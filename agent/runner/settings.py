"""A dataset's settings, typed: the snapshot of its configuration taken when it was admitted.

``Dataset.options`` (a JSON column) holds two kinds of keys: this snapshot (written by the
drop folder or ``vip-agent run`` when the dataset is admitted, and by ``run --output``) and
state (``discard``: a ``cancel --discard`` request; ``removed``: what cleanup deleted, for
``session_data.json``). The steps read the snapshot only through :func:`settings_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.journal import Dataset


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Settings:
    """What the drop folder (or ``vip-agent run``'s options) said when the dataset was taken."""

    #: leave the session and executions on the server after the outputs are mirrored
    keep_remote: bool = False
    #: ``run --output`` was given: it wins over the job's ``output_dir``
    output_override: bool = False
    max_runs: int | None = None
    max_jobs: int | None = None
    extract_max_ratio: float | None = None
    extract_max_member_ratio: float | None = None
    #: seconds an execution may read Unknown before it is killed (None: the runner's)
    unknown_limit: float | None = None
    #: the readiness marker file (not an input)
    marker: str | None = None
    #: the server folder under which sessions go (None: the job's ``vip_root``)
    vip_root: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Settings:
        return cls(
            keep_remote=bool(options.get("keep_remote")),
            output_override=bool(options.get("output_override")),
            max_runs=_int(options.get("max_runs")),
            max_jobs=_int(options.get("max_jobs")),
            extract_max_ratio=_float(options.get("extract_max_ratio")),
            extract_max_member_ratio=_float(options.get("extract_max_member_ratio")),
            unknown_limit=_float(options.get("unknown_limit")) or None,
            marker=_text(options.get("marker")),
            vip_root=_text(options.get("vip_root")),
        )


def settings_of(ds: Dataset) -> Settings:
    return Settings.from_options(ds.options or {})


def discard_requested(ds: Dataset) -> bool:
    """``cancel --discard`` of an incomplete dataset: delete what was left on the server."""
    return bool((ds.options or {}).get("discard"))
