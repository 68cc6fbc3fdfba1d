"""The journal's rows as typed records (JSON columns decoded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.stages import FINAL_STAGES, PUBLIC_STATE, UPLOAD_HELD, Stage

_JSON_COLUMNS = frozenset({"options", "job", "progress", "inputs", "jobs"})


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and value is not None and not isinstance(value, str):
        return json.dumps(value, sort_keys=True)
    return value


def _decode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and isinstance(value, str):
        return json.loads(value)
    return value


@dataclass
class Dataset:
    """A row of ``datasets``, JSON columns decoded."""

    id: int
    name: str
    path: str
    drop_dir: str | None
    fingerprint: str | None
    stage: Stage
    paused: str | None
    error: str | None
    error_detail: str | None
    server: str
    output_root: str
    template: str | None
    options: dict[str, Any]
    job: dict[str, Any] | None
    session: str | None
    remote_root: str | None
    output_dir: str | None
    progress: dict[str, Any] | None
    attempts: int
    cancel_requested: int
    created: float
    updated: float
    finished: float | None

    @property
    def attempt(self) -> int:
        """This attempt's number, counted from 1: ``attempts`` counts the runs before it
        (each ``retry``/``rerun``). The one number every surface shows (docs/operations.md,
        "Attempts and output folders")."""
        return self.attempts + 1

    @property
    def state(self) -> str:
        """The public state (``vip-agent status``)."""
        if self.paused and self.stage not in FINAL_STAGES:
            return "paused"
        if self.stage == "upload" and (self.error or "").startswith(UPLOAD_HELD):
            return "queued"  # held back by the scheduler: nothing sent yet
        return PUBLIC_STATE[self.stage]

    @property
    def final(self) -> bool:
        return self.stage in FINAL_STAGES


@dataclass
class Execution:
    dataset_id: int
    key: str
    name: str
    variant: str
    run: int
    inputs: dict[str, Any]
    vip_id: str | None
    status: str | None
    jobs: dict[str, Any] | None
    launched: float | None
    ended: float | None
    results_dir: str | None
    logs_saved: int
    cleaned: int


@dataclass
class FileRow:
    dataset_id: int
    rel: str
    size: int
    mtime_ns: int
    sha256: str | None
    remote: str | None
    uploaded: int


@dataclass
class Output:
    dataset_id: int
    remote: str
    exec_key: str
    size: int | None
    local: str
    downloaded: int
    extracted: int
    extracted_to: str | None
    #: the server's copy was deleted (mirrored outputs of an ``incomplete`` dataset)
    remote_deleted: int = 0


@dataclass
class Event:
    id: int
    dataset_id: int | None
    time: float
    level: str
    stage: str | None
    message: str


@dataclass
class DropState:
    """What the running agent sees of one drop folder (``watching``, ``missing``)."""

    path: str
    state: str
    message: str | None
    since: float
