"""What the runner needs of a platform: a :class:`Storage`, an :class:`Engine`, a :class:`Backend`.

A port in the sense of rclone's ``Fs`` or fsspec's ``AbstractFileSystem``: a few small
protocols, implemented once per platform (``agent.backend.vip`` over VIP's REST API,
``agent.backend.memory`` in memory for tests) and held to one conformance suite
(``tests/test_backend_conformance.py``). The runner never interprets a platform's words:
status labels become an :class:`ExecStatus`, a vanished execution is ``None``, the session
layout and the direct-transfer limit are the backend's.

Errors are the typed ones of :mod:`agent.vip.errors` (the vocabulary every backend speaks):
``AuthError`` (key refused), ``CapacityError`` (launch refused: try later),
``NotFoundError``, ``TransientError`` (outage), ``LaunchUncertain``, ``SourceChanged``,
``TooLargeError``, ``UnsafePathError``; anything else is a ``VipError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: progress callback of a transfer: bytes moved since the last call
Progress = Callable[[int], None]

#: the agent's own label for an execution the server no longer has
LOST_LABEL = "Lost"
#: how the message of a launch refused "for now" by the platform's engine starts (the
#: dataset's error while it waits: ``status``, the page's "waiting for")
ENGINE_WAIT = "waiting for VIP's engine"


class RunState(str, Enum):
    """What an execution's status means for the agent, whatever the platform calls it."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    KILLED = "killed"
    #: the platform lost track of it for now: it may still run (killed after a limit)
    UNKNOWN = "unknown"
    #: the platform no longer has it (deleted or vanished): nothing of it runs
    LOST = "lost"

    @property
    def ended(self) -> bool:
        """Nothing of the execution runs any more (only then may its inputs be deleted)."""
        return self in (RunState.FINISHED, RunState.FAILED, RunState.KILLED, RunState.LOST)


@dataclass(frozen=True)
class ExecStatus:
    """A typed status plus the platform's raw label (kept for users: ``status``, STATUS.json)."""

    state: RunState
    label: str
    #: False for a word the platform does not define (treated as running, reported once)
    recognised: bool = True

    @property
    def ended(self) -> bool:
        return self.state.ended


@dataclass(frozen=True)
class ExecutionInfo:
    """One execution as the engine reports it."""

    id: str
    name: str
    status: ExecStatus
    #: per job: the platform's job record (kept as is in the journal, shown in the logs)
    jobs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteFile:
    """One entry of an execution's results (or of a listing)."""

    path: str
    size: int | None
    is_dir: bool = False
    exists: bool = True


@dataclass(frozen=True)
class SessionLayout:
    """Where a dataset's session lives on the platform (VipSession's layout on VIP)."""

    root: str

    @property
    def inputs(self) -> str:
        return f"{self.root}/INPUTS"

    @property
    def outputs(self) -> str:
        return f"{self.root}/OUTPUTS"

    def results_location(self, key: str, several: bool) -> str:
        """Where an execution writes its results; one subfolder each when there are several
        (VIP names the results folder after the launch second: two launches in one second
        of one dataset would otherwise write into the same folder)."""
        return f"{self.outputs}/{key}" if several else self.outputs


@runtime_checkable
class Storage(Protocol):
    """Files on the platform. Paths are absolute POSIX paths."""

    def sizes(self, folder: str) -> dict[str, int | None]:
        """File name -> size of the files directly in ``folder``; {} when it is missing."""
        ...

    def makedirs(self, folder: str) -> None:
        """Create ``folder`` and its missing parents (an existing folder is fine)."""
        ...

    def put(self, local: Path, remote: str, *, progress: Progress | None = None,
            verify: bool = True) -> None:
        """Upload ``local`` to the new file ``remote`` (a copy already there at the right size
        counts as sent). Raises ``SourceChanged`` when ``local`` changes while sent."""
        ...

    def get(self, remote: str, local: Path, *, expected_size: int | None = None,
            progress: Progress | None = None) -> int:
        """Download ``remote`` to ``local`` atomically (``.part`` then rename); the byte count.
        Raises ``TooLargeError`` above the direct-transfer limit."""
        ...

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        """Delete ``path`` and everything below it; may complete later (poll :meth:`exists`)."""
        ...

    def exists(self, path: str) -> bool: ...


@runtime_checkable
class Engine(Protocol):
    """Pipelines and executions on the platform."""

    def pipelines(self) -> list[dict[str, Any]]:
        """Every pipeline the key may use (``identifier``, ``name``, ``version``...)."""
        ...

    def pipeline(self, identifier: str) -> dict[str, Any]:
        """The pipeline's description (parameters), as ``agent.validate`` reads it;
        ``NotFoundError`` when there is none the key may use."""
        ...

    def launch(self, name: str, pipeline: str, inputs: Mapping[str, str | list[str]],
               results_location: str) -> ExecutionInfo:
        """Start an execution. ``CapacityError`` when refused for now; ``LaunchUncertain``
        when it may or may not exist (look it up with :meth:`find` before launching again)."""
        ...

    def find(self, name: str) -> ExecutionInfo | None:
        """The newest execution named ``name``, or None."""
        ...

    def status(self, execution_id: str) -> ExecutionInfo | None:
        """The execution now, or None once it is certain the platform no longer has it."""
        ...

    def classify(self, label: str) -> ExecStatus:
        """The typed status of a label this engine reported (as stored in the journal)."""
        ...

    def job_problems(self, jobs: Mapping[str, Any]) -> list[str]:
        """The jobs of a finished execution that did not complete (for a warning)."""
        ...

    def results(self, execution_id: str) -> list[RemoteFile]: ...

    def log(self, execution_id: str, stream: str, job: str | None = None) -> str:
        """``stream`` (``stdout``/``stderr``) of the execution, or of one of its jobs."""
        ...

    def kill(self, execution_id: str) -> None:
        """Ask for the execution to stop (confirmed later by :meth:`status`);
        ``NotFoundError`` when it is gone."""
        ...

    def delete_execution(self, execution_id: str) -> None:
        """Delete an ended execution and its files (an already deleted one is fine)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """One platform (one server and key): its storage, its engine and its facts."""

    @property
    def server(self) -> str:
        """The platform's address, as the user wrote it (for messages)."""
        ...

    @property
    def storage(self) -> Storage: ...

    @property
    def engine(self) -> Engine: ...

    def max_transfer_size(self, *, refresh: bool = False) -> int | None:
        """The largest file :meth:`Storage.get` may fetch (bytes), None when unlimited or unknown."""
        ...

    def check_key(self) -> None:
        """One authenticated request: ``AuthError`` when the key is refused."""
        ...

    def session(self, root_folder: str, session: str) -> SessionLayout:
        """The layout of a new session named ``session`` under ``root_folder``."""
        ...

    def layout(self, root: str) -> SessionLayout:
        """The layout of the session whose folder is ``root`` (as recorded in the journal)."""
        ...

    def close(self) -> None: ...
