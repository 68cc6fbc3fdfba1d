"""What every stage module shares: the settings, the outcome of a step, the context a step
runs in (:class:`Context`, implemented by :class:`agent.runner.machine.Runner`) and small helpers.
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar, cast

from agent.backend.port import Backend, ExecStatus
from agent.errors import AgentError
from agent.journal import FINAL_STAGES, Dataset, Execution, FileRow, Journal, Stage
from agent.pacer import ServerBudget, policy

STATUS_FILE = "STATUS.json"
LOGS_DIR = "logs"
#: how long an execution may read ``Unknown`` before the agent kills it (seconds)
UNKNOWN_LIMIT = 6 * 3600.0
#: while the server has not confirmed a kill, it is sent again this often (seconds)
KILL_REPEAT = 300.0
#: how long ``vip-agent run`` keeps retrying a failing server before giving up (seconds):
#: the ``outage`` policy's deadline (agent.pacer holds every wait's numbers)
GIVE_UP_AFTER = float(policy("outage").deadline or 4 * 3600.0)
#: how long a remote delete may take before it is reported: the ``delete`` policy's deadline
DELETE_DEADLINE = float(policy("delete").deadline or 600.0)
#: polling of a running execution: first interval, then a tenth of its running time, up to
#: max (the ``status`` policy's base and cap; a drop folder's ``poll`` overrides them)
DEFAULT_POLL_MIN = policy("status").base
DEFAULT_POLL_MAX = policy("status").cap
#: polling of a running execution while other launches wait for a slot, seconds ...
BUSY_POLL = 0.5
#: ... but never more status requests per second than this to one server
MAX_POLL_RATE = 2.0
#: ... and only from shortly before the shortest run seen of the same pipeline on that
#: server (its latest runs, once there are this many), not for hours before a long run ends
HISTORY_MIN_RUNS = 3
HISTORY_RUNS = 50
HISTORY_TTL = 30.0  # seconds a server's run times are kept before the journal is asked again
#: parallel connections per dataset transfer: on a WAN each small file costs a round trip,
#: so several must be in flight; VIP's own client uses up to 10 for downloads
DEFAULT_PARALLELISM = 8
#: uploaded files are committed to the journal in groups of this many files, or at least
#: this often: a crash re-sends at most one group
UPLOAD_GROUP_FILES = 64
UPLOAD_GROUP_SECONDS = 1.0


class Interrupted(AgentError):
    """The agent is stopping; the step was abandoned at a resumable point."""


class GaveUp(AgentError):
    """The server kept failing for longer than ``give_up_after``; the dataset is resumable."""


class InputChanged(AgentError):
    """An input file is not what was taken (changed before or during its upload)."""


@dataclass(frozen=True)
class Tuning:
    """Per-dataset settings from its drop folder; None keeps the runner's default."""

    poll_min: float | None = None
    poll_max: float | None = None
    parallelism: int | None = None


# -- what a step returns: the machine alone acts on it -------------------------------------
@dataclass(frozen=True)
class Advance:
    """Go to ``stage`` (written by the machine with ``message``); call again after ``wait``."""

    stage: Stage
    message: str
    wait: float | None = None


@dataclass(frozen=True)
class Wait:
    """Stay in the stage; call again after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Finish:
    """End in the final ``stage``: with ``message``, or with ``error`` (at ``level``)."""

    stage: Stage
    message: str | None = None
    error: str | None = None
    level: str | None = None


Next = Advance | Wait | Finish


@dataclass
class Memo:
    """Per-dataset, in-memory counters (lost on restart, which is fine).

    Every time kept here is on the runner's *monotonic* clock (``Context.monotonic``): the
    agent acts on the durations measured from them (kill, give up, report a delete), and a
    wall-clock jump (NTP, a laptop's suspend, a user fixing the date) must not shorten or
    lengthen them. Messages show them as wall times through :func:`wall_time`.
    """

    transient_failures: int = 0
    delete_started: float | None = None
    delete_polls: int = 0
    #: since when the server has kept failing (None while it answers)
    failing_since: float | None = None
    #: per execution key: when it started reading Unknown, when it was last killed
    unknown_since: dict[str, float] = field(default_factory=dict)
    kill_sent: dict[str, float] = field(default_factory=dict)
    #: execution keys whose unrecognised status word was already reported
    strange_reported: set[str] = field(default_factory=set)
    #: a message for the dataset's error field, written after the step
    notice: str | None = None
    #: when the server is looked at once more for files landing after the delete
    #: (``agent.runner.cleanup.LANDING_SWEEP``), None until the delete is confirmed
    sweep_due: float | None = None
    #: a delete past ``DELETE_DEADLINE`` was reported (said once)
    delete_late: bool = False


class Context(Protocol):
    """What a stage's step may use of the machine (:class:`agent.runner.machine.Runner`)."""

    journal: Journal
    stop_event: threading.Event
    poll_min: float
    poll_max: float
    unknown_limit: float
    tuning_for: Callable[[Dataset], Tuning] | None
    #: per server: (when to ask the journal again, run times per pipeline)
    run_times: dict[str, tuple[float, dict[str, list[float]]]]
    lock: threading.Lock

    def clock(self) -> float:
        """Now, in seconds since the epoch (``time.time`` unless a test gives its own): for
        what is shown to users and stored in the journal, never for a duration acted on."""
        ...

    def monotonic(self) -> float:
        """A clock that never jumps (``time.monotonic``): every duration the runner acts on."""
        ...

    def backend(self, server: str) -> Backend: ...

    def budget(self, server: str) -> ServerBudget:
        """What paces ``server`` in this process (``agent.pacer``): its launch backoff."""
        ...

    def memo(self, dataset_id: int) -> Memo: ...

    def slot_free(self, server: str) -> bool: ...

    def threads(self, ds: Dataset) -> int: ...

    def report_progress(self, dataset_id: int, kind: str, done: int, total: int) -> None: ...

    def write_status(self, dataset_id: int) -> None: ...


def is_ended(ctx: Context, ds: Dataset, e: Execution) -> bool:
    """Nothing of ``e`` runs on the server any more, by the last status recorded."""
    return e.status is not None and status_of(ctx, ds, e.status).ended


def status_of(ctx: Context, ds: Dataset, label: str) -> ExecStatus:
    """The typed status of a label recorded in the journal, as the dataset's backend reads it."""
    return ctx.backend(ds.server).engine.classify(label)


def admit(
    journal: Journal,
    path: Path,
    *,
    server: str,
    output_root: Path,
    fingerprint: str,
    name: str,
    drop_dir: Path | None = None,
    template: Path | None = None,
    options: dict[str, object] | None = None,
) -> int:
    """Record a ready dataset at stage ``validate``; returns its id."""
    return journal.add_dataset(
        name=name,
        path=str(Path(path).resolve()),
        server=server,
        output_root=str(Path(output_root).resolve()),
        fingerprint=fingerprint,
        drop_dir=str(drop_dir) if drop_dir else None,
        template=str(template) if template else None,
        options=options or {},
        stage=Stage.VALIDATE,
    )


def safe_token(text: str, limit: int = 40) -> str:
    """Letters, digits, ``-`` and ``_`` only: valid in VIP paths and execution names."""
    token = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")
    return token[:limit] or "dataset"


def remote_parent(f: FileRow) -> str:
    return str(PurePosixPath(f.remote or "").parent)


def dataset_root(ds: Dataset) -> Path:
    path = Path(ds.path)
    return path.parent if path.is_file() else path


def final(stage: str) -> bool:
    return stage in FINAL_STAGES


def on_grid(step: float, key: int, now: float) -> float:
    """Seconds to the next point of a grid of ``step`` seconds whose offset depends on ``key``
    (a dataset), never less than half a step.

    Polls on a fixed grid of their own are ``step`` apart on average, like a plain interval,
    but datasets polled often do not poll in step with each other (no bursts of status
    requests), nor in step with their executions' launches: a pipeline lasting a multiple of
    ``step`` would otherwise end just after a poll every time and wait a whole step to be
    noticed.
    """
    # a hash, not an arithmetic spread: consecutive datasets would keep a constant offset
    phase = (zlib.crc32(str(key).encode()) % 1000) / 1000 * step
    following = phase + (int((now - phase) // step) + 1) * step
    if following - now < step / 2:
        following += step
    return following - now


def inside(root: Path, rel: PurePosixPath) -> Path:
    """``root / rel``, refusing anything that would land outside ``root``."""
    parts = [p for p in rel.parts if p not in ("", ".")]
    if not parts or any(p == ".." or "/" in p or "\\" in p or p.startswith("/") for p in parts):
        raise AgentError(f"refusing output path {rel!s}: it would leave the output folder")
    return root.joinpath(*parts)


def clock_text(when: float) -> str:
    """A local wall-clock time for messages (``14:03:07``, with the date if not today)."""
    stamp = time.localtime(when)
    if time.strftime("%Y-%m-%d", stamp) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", stamp)
    return time.strftime("%Y-%m-%d %H:%M:%S", stamp)


def wall_time(ctx: Context, mono: float) -> float:
    """The wall time (for a message) of ``mono``, a reading of ``ctx.monotonic``: now on the
    wall clock less the monotonic time elapsed since."""
    return ctx.clock() - (ctx.monotonic() - mono)


def duration(seconds: float | None) -> str:
    """``45 s``, ``12 min``, ``3.5 h``."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


_DONE = object()
T = TypeVar("T")


def parallel(fn: Callable[[T], None], items: list[T], threads: int) -> None:
    """``fn`` on every item with ``threads`` workers; the first error stops them and is raised.

    Workers pull from one iterator (no future per item: memory stays flat however many
    files a dataset has).
    """
    if len(items) <= 1 or threads <= 1:
        for item in items:
            fn(item)
        return
    source = iter(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if errors:
                    return
                item = next(source, _DONE)
            if item is _DONE:
                return
            try:
                fn(cast(T, item))
            except BaseException as err:  # noqa: B036 - re-raised by the caller's thread
                with lock:
                    errors.append(err)
                return

    workers = [
        threading.Thread(target=worker, name=f"vip-agent transfer {i}", daemon=True)
        for i in range(min(threads, len(items)))
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
