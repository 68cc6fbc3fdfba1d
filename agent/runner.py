"""The per-dataset state machine: validate, upload, launch, monitor, mirror, extract, cleanup.

``Runner.step(id)`` performs the current stage of one dataset (or one bounded
slice of it) and returns the stage it is now in, with how long to wait before
calling again. Every decision is committed to the journal before the action it
announces, so a crash at any instant resumes at the right place:

- upload: a file is marked uploaded only after the server confirms its size; a
  file already on the server with the right size counts as uploaded;
- launch: the execution name is deterministic and is looked up on the server
  before any POST, so a crash between the POST and the journal write never
  launches twice;
- mirror: downloads go to ``<file>.part`` and are renamed when complete; a local
  file of the expected size that the journal has not marked yet is adopted;
- extract: archives are replaced by a folder atomically (see ``agent.extract``);
- cleanup: deletes are idempotent and polled until gone, and start only once every
  execution of the dataset is known to have ended on the server (a VIP label that says
  so, or the execution is gone); ``Unknown`` and unrecognised labels count as running.

The runner never sleeps on the network: waiting is returned as ``retry_after``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent import dataset as dataset_mod
from agent import failpoints
from agent.errors import AgentError, ValidationError
from agent.extract import has_archive_name, safe_extract
from agent.fsutil import write_atomic
from agent.journal import FINAL_STAGES, Dataset, Journal
from agent.leftovers import remove_left_file, summary, write_left_file
from agent.progress import ProgressTracker, human_size
from agent.session_data import write_session_data
from agent.vip.client import VipClient
from agent.vip.errors import (
    AuthError,
    CapacityError,
    LaunchUncertain,
    NotFoundError,
    SourceChanged,
    TooLargeError,
    TransientError,
    UnsafePathError,
    VipError,
)
from agent.vip.models import ENDED_STATUSES, check_server_path, status_kind

log = logging.getLogger("vip_agent.runner")

#: which worker pool a stage needs (the scheduler limits each pool)
STAGE_POOL: dict[str, str] = {
    "waiting": "local",
    "validate": "local",
    "upload": "upload",
    "launch": "launch",
    "monitor": "monitor",
    "mirror": "download",
    "extract": "local",
    "cleanup": "local",
}

STATUS_FILE = "STATUS.json"
LOGS_DIR = "logs"
#: statuses after which nothing of an execution runs on the server: VIP's four "ended"
#: labels, and "Lost" (the agent's word for an execution the server no longer has)
TERMINAL_STATUSES = ENDED_STATUSES | {"Lost"}
#: how long an execution may read ``Unknown`` before the agent kills it (seconds)
UNKNOWN_LIMIT = 6 * 3600.0
#: while VIP has not confirmed a kill, it is sent again this often (seconds)
KILL_REPEAT = 300.0
#: how long ``vip-agent run`` keeps retrying a failing server before giving up (seconds)
GIVE_UP_AFTER = 4 * 3600.0
#: how long a remote delete may take before it is reported
DELETE_DEADLINE = 600.0
#: polling of a running execution: first interval, then a tenth of its running time, up to max
DEFAULT_POLL_MIN = 2.0
DEFAULT_POLL_MAX = 120.0
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
_DONE = object()


@dataclass(frozen=True)
class Tuning:
    """Per-dataset settings from its drop folder; None keeps the runner's default."""

    poll_min: float | None = None
    poll_max: float | None = None
    parallelism: int | None = None


class _InputChanged(AgentError):
    """An input file is not what was taken (changed before or during its upload)."""


def _remote_parent(f: Any) -> str:
    return str(PurePosixPath(f.remote or "").parent)


def _on_grid(step: float, key: int, now: float) -> float:
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


def _check_unchanged(local: Path, f: Any, *, during: bool = False) -> None:
    """Raise unless ``local`` still has the size and mtime recorded when the dataset was taken."""
    try:
        st = local.stat()
    except FileNotFoundError:
        raise _InputChanged(
            f"input file {f.rel} was removed "
            + ("while it was being uploaded" if during else "after the dataset was taken")
            + "; drop the dataset again (complete) and it will run as a new dataset"
        ) from None
    if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
        if during:
            raise _changed_during_upload(local, f, st.st_size)
        raise _InputChanged(
            f"input file {f.rel} changed after the dataset was taken (size {f.size} -> "
            f"{st.st_size}); nothing was launched. Drop the dataset again when it is "
            "complete and it will run as a new dataset"
        )


def _changed_during_upload(local: Path, f: Any, now: int | None = None) -> _InputChanged:
    if now is None:
        try:
            now = local.stat().st_size
        except OSError:
            now = -1
    return _InputChanged(
        f"input file {f.rel} was written to while it was being uploaded (size {f.size} when "
        f"taken, {now} now); the copy on VIP was discarded and nothing was launched. The "
        "dataset was still being written: drop it again when it is complete and it will run "
        "as a new dataset",
        detail=f"{local}: planned size {f.size}, mtime_ns {f.mtime_ns}",
    )


class Interrupted(AgentError):
    """The agent is stopping; the step was abandoned at a resumable point."""


class GaveUp(AgentError):
    """The server kept failing for longer than ``give_up_after``; the dataset is resumable."""


@dataclass(frozen=True)
class StepOutcome:
    """Where a dataset stands after a step, and when to call ``step`` again."""

    stage: str
    retry_after: float | None = None

    @property
    def final(self) -> bool:
        return self.stage in FINAL_STAGES


@dataclass
class _Memo:
    """Per-dataset, in-memory counters (lost on restart, which is fine)."""

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


ClientFactory = Callable[[str], VipClient]


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
    options: dict[str, Any] | None = None,
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
        stage="validate",
    )


def safe_token(text: str, limit: int = 40) -> str:
    """Letters, digits, ``-`` and ``_`` only: valid in VIP paths and execution names."""
    token = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")
    return token[:limit] or "dataset"


class Runner:
    """Drives datasets through their stages. Thread-safe across datasets."""

    def __init__(
        self,
        journal: Journal,
        client_for: ClientFactory,
        *,
        stop_event: threading.Event | None = None,
        max_running: Callable[[str], int | None] | int | None = None,
        transfer_threads: int = DEFAULT_PARALLELISM,
        progress: Callable[[int, str, int, int], None] | None = None,
        poll_min: float = DEFAULT_POLL_MIN,
        poll_max: float = DEFAULT_POLL_MAX,
        retry_base: float = 5.0,
        capacity_wait: float = 15.0,
        tuning_for: Callable[[Dataset], Tuning] | None = None,
        unknown_limit: float = UNKNOWN_LIMIT,
        give_up_after: float | None = None,
    ) -> None:
        self.journal = journal
        # until the runner speaks the backend port: a backend hands over its client
        self.client_for: ClientFactory = lambda server: getattr(
            client_for(server), "client", None) or client_for(server)
        self.stop_event = stop_event or threading.Event()
        self._max_running = max_running
        self.transfer_threads = transfer_threads
        self.progress = progress
        self.poll_min = poll_min
        self.poll_max = poll_max
        #: first wait after a transient failure (doubles each time, up to 5 minutes)
        self.retry_base = retry_base
        #: least wait after VIP refused a launch for capacity (2000/2001)
        self.capacity_wait = capacity_wait
        #: per-dataset settings (the drop folder's ``poll`` and ``transfer_parallelism``)
        self.tuning_for = tuning_for
        #: how long an execution may read ``Unknown`` before it is killed
        self.unknown_limit = unknown_limit
        #: stop retrying a failing server after this many seconds (None: never; ``watch``)
        self.give_up_after = give_up_after
        self._memos: dict[int, _Memo] = {}
        self._tracker = ProgressTracker()
        self._lock = threading.Lock()
        #: per server: (when to ask the journal again, run times per pipeline)
        self._run_times: dict[str, tuple[float, dict[str, list[float]]]] = {}

    # -- public ------------------------------------------------------------------
    def step(self, dataset_id: int) -> StepOutcome:
        """Perform the current stage of a dataset (see module docstring)."""
        ds = self.journal.get(dataset_id)
        if ds.final:
            return StepOutcome(ds.stage)
        memo = self._memo(dataset_id)
        started = time.time()
        try:
            if ds.cancel_requested:
                outcome = self._cancel(ds)
            else:
                handler = getattr(self, f"_stage_{ds.stage}", None)
                if handler is None:
                    return StepOutcome(ds.stage, 1.0)  # waiting: the watcher admits it
                outcome = handler(ds)
            memo.transient_failures = 0
            if memo.failing_since is not None:
                self.journal.event(
                    dataset_id,
                    f"VIP answers again (it failed for {_duration(time.time() - memo.failing_since)})",
                )
                memo.failing_since = None
            notice, memo.notice = memo.notice, None
            if notice and not outcome.final:
                self.journal.update(dataset_id, error=notice, error_detail=None)
            elif ds.error and not outcome.final:
                self.journal.update(dataset_id, error=None, error_detail=None)
        except (AuthError, Interrupted):
            raise
        except CapacityError as err:
            memo.transient_failures += 1
            delay = max(self._backoff(memo), self.capacity_wait)
            self.journal.event(
                dataset_id, f"{err.message}; retrying in {delay:.0f} s", level="warning"
            )
            self.journal.update(dataset_id, error=err.message, error_detail=err.detail)
            outcome = StepOutcome(ds.stage, delay)
        except TransientError as err:
            outcome = self._server_failing(ds, memo, err, started)
        except OSError as err:
            outcome = self._local_failure(ds, err)
        except ValidationError as err:
            self.journal.set_stage(dataset_id, "failed", error=err.message, detail=err.detail)
            outcome = StepOutcome("failed")
        except AgentError as err:
            self.journal.set_stage(dataset_id, "failed", error=err.message, detail=err.detail)
            outcome = StepOutcome("failed")
        self._write_status(dataset_id)
        if outcome.stage != ds.stage:
            failpoints.hit(f"stage:{outcome.stage}")
        if outcome.final:
            self._memos.pop(dataset_id, None)
        return outcome

    def _backoff(self, memo: _Memo) -> float:
        return float(min(self.retry_base * 2 ** (memo.transient_failures - 1), 300.0))

    def _server_failing(
        self, ds: Dataset, memo: _Memo, err: TransientError, started: float
    ) -> StepOutcome:
        """Wait and retry; said once in the events, kept current in the dataset's error."""
        memo.transient_failures += 1
        delay = self._backoff(memo)
        now = time.time()
        if memo.failing_since is None:
            memo.failing_since = started  # the failing step began then
            give_up = (
                f"; giving up after {_duration(self.give_up_after)}"
                if self.give_up_after is not None else "; waiting for it as long as it takes"
            )
            self.journal.event(
                ds.id, f"VIP at {ds.server} is unreachable or failing ({err.message}); "
                f"retrying with backoff{give_up}",
                level="warning",
            )
        since = memo.failing_since
        if self.give_up_after is not None and now - since >= self.give_up_after:
            message = (
                f"gave up: VIP at {ds.server} unreachable since {_clock(since)} "
                f"({_duration(now - since)}; last error: {err.message}). Nothing is lost: run the "
                "same command again to resume where it stopped"
            )
            self.journal.update(ds.id, error=message, error_detail=err.detail)
            self.journal.event(ds.id, message, level="error")
            self._write_status(ds.id)
            raise GaveUp(message, err.detail)
        self.journal.update(
            ds.id,
            error=f"VIP unreachable since {_clock(since)}, next try at {_clock(now + delay)} "
                  f"({err.message})",
            error_detail=err.detail,
        )
        return StepOutcome(ds.stage, delay)

    def run(self, dataset_id: int, *, sleep: Callable[[float], bool] | None = None) -> StepOutcome:
        """Step a dataset to a final stage (for ``vip-agent run``)."""
        wait = sleep or (lambda s: self.stop_event.wait(s))
        while True:
            outcome = self.step(dataset_id)
            if outcome.final:
                return outcome
            if outcome.retry_after:
                if wait(outcome.retry_after):
                    raise Interrupted("stopped while waiting")
            elif self.stop_event.is_set():
                raise Interrupted("stopped")

    # -- stages ------------------------------------------------------------------
    def _stage_validate(self, ds: Dataset) -> StepOutcome:
        from agent.jobfile import load_job, resolve_inputs
        from agent.validate import execution_name, validate

        path = Path(ds.path)
        template = Path(ds.template) if ds.template else None
        marker = ds.options.get("marker")
        # every entry of the dataset must be readable (loops, permissions): said, never skipped
        dataset_mod.scan(
            self._dataset_root(ds), only=[path.name] if path.is_file() else None,
            exclude=(marker,) if marker else (),
        ).raise_if_unreadable()
        job = load_job(path, template, exclude=(marker,) if marker else ())
        client = self.client_for(ds.server)
        try:
            pipeline = client.pipeline(job.pipeline)
        except NotFoundError as err:
            raise ValidationError([unknown_pipeline(client, job.pipeline)], detail=err.detail) from err
        report = validate(job, path, pipeline, max_runs=ds.options.get("max_runs"),
                          max_jobs=ds.options.get("max_jobs"))  # fmt: skip
        for warning in report.warnings:
            self.journal.event(ds.id, warning, level="warning")
        report.raise_if_errors()

        name = job.name or ds.name
        # a retry is a new attempt: new session and execution names, never the old ones
        identity = (ds.fingerprint or "") + (f"#{ds.attempts}" if ds.attempts else "")
        session = f"{safe_token(name)}-{(ds.fingerprint or '0' * 8)[:8]}"
        if ds.attempts:
            session += f"-a{ds.attempts + 1}"
        vip_root = str(ds.options.get("vip_root") or job.vip_root)
        remote_root = f"{vip_root.rstrip('/')}/{session}"
        remote_inputs = f"{remote_root}/INPUTS"
        resolved = report.resolved or resolve_inputs(job, path, pipeline)
        output_dir = ds.output_dir or str(self._choose_output_dir(ds, job, name))

        scan = dataset_mod.scan(resolved.root, only=[f for f in resolved.files])
        by_rel = {f.rel: f for f in scan.files}
        entries = []
        for rel in resolved.files:
            f = by_rel.get(rel)
            if f is None:
                raise ValidationError([f"input file {rel} disappeared from the dataset"])
            entries.append((rel, f.size, f.mtime_ns, resolved.remote_path(remote_inputs, rel)))
        # written before any byte is sent: the plan is fixed from here on
        self.journal.set_files(ds.id, entries)
        for variant in resolved.variants:
            remote_inputs_values = resolved.remote_inputs(variant, remote_inputs)
            for run in range(1, job.runs + 1):
                key = f"{variant}-r{run}"
                exec_name = execution_name(name, variant, run, identity)
                self.journal.add_execution(
                    ds.id, key=key, name=exec_name, variant=variant, run=run,
                    inputs=remote_inputs_values,
                )
        self.journal.update(
            ds.id,
            name=name,
            job=job.to_dict(),
            session=session,
            remote_root=remote_root,
            output_dir=output_dir,
        )
        self.journal.set_stage(
            ds.id, "upload",
            message=f"valid: {len(entries)} file(s) to upload, "
                    f"{len(resolved.variants) * job.runs} execution(s) of {job.pipeline}",
        )
        return StepOutcome("upload")

    def _stage_upload(self, ds: Dataset) -> StepOutcome:
        """Send the planned files: one PUT each, in parallel, progress committed in groups.

        A 201 from VIP comes once the file is stored, so each file costs one request;
        the sizes of all files are then verified with one listing per folder before the
        stage ends. Progress is committed to the journal in groups of files: a crash
        re-sends at most the last uncommitted group (VIP refuses to overwrite; the client
        then finds the file there at the right size and counts it as sent).
        """
        client = self.client_for(ds.server)
        assert ds.remote_root
        files = self.journal.files(ds.id)
        todo = [f for f in files if not f.uploaded]
        root = self._dataset_root(ds)
        # refuse a dataset that changed since it was taken: never mix two versions
        for f in todo:
            _check_unchanged(root / f.rel, f)
        if todo:
            folders = sorted({_remote_parent(f) for f in todo})
            if len(todo) < len(files):
                # resuming: files that reached VIP before the crash are not sent again
                todo = self._adopt(ds, client, todo, folders)
        if todo:
            total = sum(f.size for f in todo)
            self.journal.event(ds.id, f"uploading {len(todo)} file(s), {human_size(total)}")
            for folder in folders:
                client.makedirs(folder)
            self._send_files(ds, client, root, todo, verify=False)
        # one listing per folder proves every size (and catches a file VIP lost)
        wrong = self._unverified(client, files)
        if wrong:
            names = ", ".join(f.rel for f in wrong[:3]) + (" ..." if len(wrong) > 3 else "")
            self.journal.event(
                ds.id, f"{len(wrong)} file(s) not on VIP at the right size ({names}); sending again",
                level="warning",
            )
            self.journal.unmark_uploaded(ds.id, [f.rel for f in wrong])
            self._send_files(ds, client, root, wrong, verify=True)
        self.journal.set_stage(ds.id, "launch", message="inputs uploaded and verified")
        return StepOutcome("launch")

    def _adopt(self, ds: Dataset, client: VipClient, todo: list[Any], folders: list[str]) -> list[Any]:
        """Mark files already on VIP at the right size as sent; return the others."""
        on_vip = {folder: client.sizes(folder) for folder in folders}
        found = [
            f for f in todo
            if on_vip[_remote_parent(f)].get(PurePosixPath(f.remote or "").name) == f.size
        ]
        if found:
            self.journal.mark_uploaded_many(ds.id, [(f.rel, None) for f in found])
        return [f for f in todo if f not in found]

    def _unverified(self, client: VipClient, files: list[Any]) -> list[Any]:
        """Files that VIP's listings do not show at their planned size."""
        by_folder: dict[str, list[Any]] = {}
        for f in files:
            by_folder.setdefault(_remote_parent(f), []).append(f)
        wrong = []
        for folder, group in by_folder.items():
            sizes = client.sizes(folder)
            wrong += [f for f in group if sizes.get(PurePosixPath(f.remote or "").name) != f.size]
        return wrong

    def _send_files(
        self, ds: Dataset, client: VipClient, root: Path, todo: list[Any], *, verify: bool
    ) -> None:
        total = sum(f.size for f in todo)
        done_bytes = [0]
        lock = threading.Lock()
        pending: list[tuple[str, str | None]] = []
        last_commit = [time.monotonic()]

        def progress(n: int) -> None:
            if self.stop_event.is_set():
                raise Interrupted("stopping: upload abandoned, it resumes on next start")
            with lock:
                done_bytes[0] += n
                done = done_bytes[0]
            self._progress(ds.id, "upload", done, total)
            failpoints.hit("upload:partial")

        def commit(force: bool = False) -> None:
            with lock:
                due = force or len(pending) >= UPLOAD_GROUP_FILES or (
                    time.monotonic() - last_commit[0] >= UPLOAD_GROUP_SECONDS
                )
                if not due or not pending:
                    return
                batch = pending[:]
                pending.clear()
                last_commit[0] = time.monotonic()
            self.journal.mark_uploaded_many(ds.id, batch)
            failpoints.hit("upload:group")

        def upload(f: Any) -> None:
            local = root / f.rel
            _check_unchanged(local, f)
            try:
                client.upload(local, f.remote, progress=progress, verify=verify)
            except SourceChanged:
                raise _changed_during_upload(local, f) from None
            # before and after: a file written to meanwhile is not the file that was taken
            _check_unchanged(local, f, during=True)
            with lock:
                pending.append((f.rel, None))
            commit()

        try:
            self._parallel(upload, todo, self._threads(ds))
        except _InputChanged:
            commit(force=True)
            # nothing was launched: the partial session on VIP is of no use to anyone
            try:
                client.delete(ds.remote_root or "", missing_ok=True)
            except VipError:
                pass
            raise
        finally:
            commit(force=True)

    def _stage_launch(self, ds: Dataset) -> StepOutcome:
        """Launch the first execution; the others launch from ``monitor`` as slots free up."""
        pending = [e for e in self.journal.executions(ds.id) if not e.vip_id]
        if pending:
            if not self.slot_free(ds.server):
                return StepOutcome("launch", self.poll_min)
            self._launch(ds, pending[0])
        self.journal.set_stage(ds.id, "monitor", message="execution launched")
        return StepOutcome("monitor", self._poll_interval(ds, self.journal.executions(ds.id)))

    def _stage_monitor(self, ds: Dataset) -> StepOutcome:
        client = self.client_for(ds.server)
        memo = self._memo(ds.id)
        for e in self.journal.executions(ds.id):
            if not e.vip_id or e.status in TERMINAL_STATUSES:
                continue
            info = self._poll_execution(ds, client, e)
            if info is None:
                continue  # gone from the server: recorded as Lost
            self._observe(ds, client, memo, e, str(info["status"]), info.get("jobs") or {})

        executions = self.journal.executions(ds.id)
        pending = [e for e in executions if not e.vip_id]
        if pending and self.slot_free(ds.server):
            try:
                self._launch(ds, pending[0])
            except CapacityError:
                pass  # VIP's per-user cap: try again at the next poll
            executions = self.journal.executions(ds.id)
        if all(e.vip_id and e.status in TERMINAL_STATUSES for e in executions):
            self.journal.set_stage(ds.id, "mirror", message="all executions ended")
            return StepOutcome("mirror")
        return StepOutcome("monitor", self._poll_interval(ds, executions))

    def _poll_execution(self, ds: Dataset, client: VipClient, e: Any) -> dict[str, Any] | None:
        """The execution's record, or None once it is certain the server no longer has it.

        "Deleted" (8015) is certain: VIP only deletes ended executions. Any other "not
        found" (8000 is VIP's catch-all code) is checked against the execution list first.
        """
        try:
            info: dict[str, Any] = client.execution(e.vip_id)
            return info
        except NotFoundError as err:
            if err.code != 8015:
                listed = next((x for x in client.executions() if x.get("identifier") == e.vip_id), None)
                if listed is not None and isinstance(listed.get("status"), str):
                    return listed
            self.journal.update_execution(ds.id, e.key, status="Lost", ended=time.time())
            self.journal.event(
                ds.id, f"execution {e.vip_id} vanished from the server ({err.message})",
                level="error",
            )
            return None

    def _observe(
        self, ds: Dataset, client: VipClient, memo: _Memo, e: Any, status: str,
        jobs: dict[str, Any],
    ) -> None:
        """Record what VIP says of one execution; kill one that reads Unknown for too long."""
        now = time.time()
        kind = status_kind(status)
        fields: dict[str, Any] = {"status": status, "jobs": jobs}
        limit = float(ds.options.get("unknown_limit") or self.unknown_limit)
        if kind == "unknown":
            since = memo.unknown_since.setdefault(e.key, now)
            if e.status != status:
                self.journal.event(
                    ds.id,
                    f"execution {e.vip_id} ({e.key}) reads Unknown: VIP lost track of it for now; "
                    "it is treated as still running and its inputs stay on the server (it is "
                    f"killed if this lasts {_duration(limit)})",
                    level="warning",
                )
            if now - since >= limit:
                self._kill_unknown(ds, client, memo, e, since, now, limit)
            else:
                memo.notice = (
                    f"execution {e.vip_id} reads Unknown since {_clock(since)}; treated as "
                    f"running (killed at {_clock(since + limit)} if it lasts)"
                )
        else:
            memo.unknown_since.pop(e.key, None)
        if kind == "strange" and e.key not in memo.strange_reported:
            memo.strange_reported.add(e.key)
            self.journal.event(
                ds.id,
                f"execution {e.vip_id} ({e.key}) reports the status {status[:80]!r}, which is not "
                "one VIP defines; treating it as still running",
                level="warning",
            )
        if kind == "ended":
            fields["ended"] = now
            if e.key in memo.kill_sent:
                self.journal.event(ds.id, f"VIP confirms execution {e.vip_id} ended ({status})")
        if status != e.status:
            if kind != "unknown":
                self.journal.event(ds.id, f"execution {e.vip_id} ({e.key}): {status}")
        self.journal.update_execution(ds.id, e.key, **fields)

    def _kill_unknown(
        self, ds: Dataset, client: VipClient, memo: _Memo, e: Any, since: float, now: float,
        limit: float,
    ) -> None:
        """Kill an execution stuck in Unknown; cleanup waits until VIP says it ended."""
        last = memo.kill_sent.get(e.key)
        if last is None or now - last >= KILL_REPEAT:
            if last is None:
                self.journal.event(
                    ds.id,
                    f"execution {e.vip_id} ({e.key}) has read Unknown since {_clock(since)} "
                    f"(limit {_duration(limit)}): killing it; its inputs stay on the "
                    "server until VIP confirms it ended",
                    level="error",
                )
            try:
                client.kill(e.vip_id)
            except NotFoundError:
                pass  # gone meanwhile: the next poll records it
            memo.kill_sent[e.key] = now
        memo.notice = (
            f"execution {e.vip_id} read Unknown since {_clock(since)}; killed at "
            f"{_clock(memo.kill_sent[e.key])}, waiting for VIP to confirm it ended before "
            "cleaning up"
        )

    def _stage_mirror(self, ds: Dataset) -> StepOutcome:
        client = self.client_for(ds.server)
        assert ds.output_dir and ds.remote_root
        out_dir = Path(ds.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs_root = PurePosixPath(ds.remote_root) / "OUTPUTS"
        # outputs already known and not mirrored: a retry of an incomplete dataset (or a
        # resume); the server's limit may have been raised since it was cached
        limit = _max_download(
            client, refresh=any(not o.downloaded for o in self.journal.outputs(ds.id))
        )
        for e in self.journal.executions(ds.id):
            if not e.vip_id or e.status == "Lost" or e.cleaned:
                continue  # a cleaned one is deleted: its outputs were all mirrored
            for info in client.results(e.vip_id):
                if not info.exists or info.is_dir:
                    continue
                try:
                    remote = PurePosixPath(check_server_path(info.path, under=str(outputs_root)))
                except UnsafePathError as err:
                    raise AgentError(
                        f"execution {e.vip_id} ({e.key}): {err.message}. Nothing was written "
                        "for it; its outputs and inputs stay on the server (see them on the VIP "
                        "portal, then `vip-agent cancel` or `retry`)",
                        detail=err.detail,
                    ) from None
                rel = remote.relative_to(outputs_root)
                local = _inside(out_dir, rel)
                self.journal.add_output(
                    ds.id, remote=str(remote), exec_key=e.key, size=info.size, local=str(local)
                )
                if e.results_dir is None:
                    self.journal.update_execution(ds.id, e.key, results_dir=str(remote.parent))
            if not e.logs_saved:
                self._save_logs(ds, client, e.vip_id, e.key, e.jobs or {})
                self.journal.update_execution(ds.id, e.key, logs_saved=1)

        todo = [o for o in self.journal.outputs(ds.id) if not o.downloaded]
        too_big = [o for o in todo if limit and o.size and o.size > limit]
        todo = [o for o in todo if o not in too_big]
        refused: list[Any] = []
        total = sum(o.size or 0 for o in todo)
        done_bytes = [0]
        lock = threading.Lock()

        def progress(n: int) -> None:
            if self.stop_event.is_set():
                raise Interrupted("stopping: download abandoned, it resumes on next start")
            with lock:
                done_bytes[0] += n
            self._progress(ds.id, "download", done_bytes[0], total)
            failpoints.hit("download:partial")

        def download(o: Any) -> None:
            local = Path(o.local)
            if local.exists() and not local.is_dir():
                if o.size is not None and local.stat().st_size == o.size:
                    self.journal.update_output(ds.id, o.remote, downloaded=1)
                    return  # finished before a crash, not yet recorded
                raise AgentError(
                    f"{local} already exists and differs from the output {o.remote}; "
                    "vip-agent never overwrites local files. Move it away and retry"
                )
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download(o.remote, local, expected_size=o.size, progress=progress)
            except TooLargeError:
                with lock:
                    refused.append(o)  # its size was unknown, or the limit went down
                return
            self.journal.update_output(ds.id, o.remote, downloaded=1)

        if todo:
            self.journal.event(ds.id, f"downloading {len(todo)} output file(s), {human_size(total)}")
            self._parallel(download, todo, self._threads(ds))
        for o in too_big + refused:
            size = human_size(o.size) if o.size is not None else "of unknown size"
            self.journal.event(
                ds.id,
                f"output {o.remote} is {size}, above VIP's direct-transfer limit"
                f"{f' of {human_size(limit)}' if limit else ''}: it stays on VIP (listed in the "
                "output folder's LEFT_ON_VIP.txt)",
                level="warning",
            )
        write_session_data(self.journal, ds.id)
        job = ds.job or {}
        nxt = "extract" if job.get("extract", True) else "cleanup"
        self.journal.set_stage(ds.id, nxt, message="outputs mirrored")
        return StepOutcome(nxt)

    def _stage_extract(self, ds: Dataset) -> StepOutcome:
        for o in self.journal.outputs(ds.id):
            if not o.downloaded or o.extracted:
                continue
            local = Path(o.local)
            if not has_archive_name(local):
                continue  # safe_extract is idempotent: a folder here is a finished extraction
            if self.stop_event.is_set():
                raise Interrupted("stopping before extraction")
            try:
                folder = safe_extract(
                    local, max_ratio=ds.options.get("extract_max_ratio"),
                    max_member_ratio=ds.options.get("extract_max_member_ratio"),
                )  # fmt: skip
            except AgentError as err:
                self.journal.update_output(ds.id, o.remote, extracted=-1)
                self.journal.event(ds.id, f"{local.name}: {err.message}", level="error")
                continue
            self.journal.update_output(ds.id, o.remote, extracted=1, extracted_to=str(folder))
        self.journal.set_stage(ds.id, "cleanup", message="result archives extracted")
        return StepOutcome("cleanup")

    def _stage_cleanup(self, ds: Dataset) -> StepOutcome:
        client = self.client_for(ds.server)
        job = ds.job or {}
        outputs = self.journal.outputs(ds.id)
        left = [o for o in outputs if not o.downloaded]
        keep = bool(ds.options.get("keep_remote")) or not job.get("cleanup", True)
        if not keep and ds.remote_root:
            # outputs we could not mirror stay on VIP with their execution (the portal shows
            # them there); the inputs, the other executions and the copies we hold go
            holding = {o.exec_key for o in left}
            if left:
                targets = [f"{ds.remote_root}/INPUTS"] + [
                    o.remote for o in outputs if o.downloaded and not o.remote_deleted
                ]
            else:
                targets = [ds.remote_root]
            for e in self.journal.executions(ds.id):
                if not e.vip_id or e.cleaned or e.key in holding:
                    continue
                if e.status in ("Finished", "Killed"):
                    try:
                        client.delete_execution(e.vip_id, delete_files=True)
                        self._record_removed(ds.id, execution=e.vip_id)
                    except NotFoundError:
                        self._record_removed(ds.id, execution=e.vip_id)  # deleted before a crash
                    except VipError as err:
                        self.journal.event(
                            ds.id, f"could not delete execution {e.vip_id}: {err.message}",
                            level="warning",
                        )
                self.journal.update_execution(ds.id, e.key, cleaned=1)
            wait = self._delete_remote(ds, client, targets, {o.remote for o in outputs})
            if wait is not None:
                return StepOutcome("cleanup", wait)
        return self._finish(ds, kept_remote=keep)

    def _delete_remote(
        self, ds: Dataset, client: VipClient, targets: list[str], outputs: set[str]
    ) -> float | None:
        """Delete ``targets`` on VIP and poll until gone: None when gone, else the wait."""
        memo = self._memo(ds.id)
        if memo.delete_started is None:
            memo.delete_started = time.time()
        pending = []
        for target in targets:
            if client.exists(target):
                pending.append(target)
                continue
            if target in outputs:
                self.journal.update_output(ds.id, target, remote_deleted=1)
            self._record_removed(ds.id, path=target)
        if not pending:
            memo.delete_started, memo.delete_polls = None, 0
            return None
        if time.time() - memo.delete_started > DELETE_DEADLINE:
            raise AgentError(
                f"the server has not deleted {pending[0]} after {DELETE_DEADLINE:.0f} s",
                detail="VIP deletes asynchronously and may drop failed deletes",
            )
        if memo.delete_polls == 0:
            for target in pending:
                try:
                    client.delete(target)
                except NotFoundError:
                    pass  # deleted meanwhile
        memo.delete_polls += 1
        if memo.delete_polls % 30 == 0:
            memo.delete_polls = 0  # VIP may drop a failed delete: ask again now and then
        # VIP deletes asynchronously: look again soon, then every 2 s
        return min(0.25 * 2 ** (memo.delete_polls - 1), 2.0)

    def _record_removed(
        self, dataset_id: int, *, path: str | None = None, execution: str | None = None
    ) -> None:
        """Remember what cleanup removed from the server (for session_data.json)."""
        options = dict(self.journal.get(dataset_id).options or {})
        removed = dict(options.get("removed") or {})
        for key, value in (("paths", path), ("executions", execution)):
            if value is not None and value not in removed.get(key, []):
                removed[key] = [*removed.get(key, []), value]
        removed["time"] = time.time()
        options["removed"] = removed
        self.journal.update(dataset_id, options=options)

    # -- helpers -----------------------------------------------------------------
    def _finish(self, ds: Dataset, *, kept_remote: bool) -> StepOutcome:
        problems = []
        killed = self._memo(ds.id).kill_sent
        for e in self.journal.executions(ds.id):
            if e.status != "Finished":
                why = (
                    " (killed by vip-agent: VIP reported it Unknown for longer than the limit)"
                    if e.key in killed and not ds.cancel_requested else ""
                )
                problems.append(
                    f"execution {e.name} ({e.vip_id}) ended {e.status}{why}; its logs are in "
                    f"{Path(ds.output_dir or '.') / LOGS_DIR / e.key}"
                )
            else:
                failed_jobs = [
                    j for j, info in (e.jobs or {}).items()
                    if isinstance(info, dict) and str(info.get("status")) not in ("COMPLETED",)
                ]
                if failed_jobs:
                    self.journal.event(
                        ds.id,
                        f"execution {e.vip_id} finished but job(s) {', '.join(failed_jobs)} "
                        "did not complete",
                        level="warning",
                    )
        left = [o for o in self.journal.outputs(ds.id) if not o.downloaded]
        for o in self.journal.outputs(ds.id):
            if o.downloaded and o.extracted == -1:
                problems.append(f"archive {o.local} was not extracted (unsafe or corrupt); kept as is")
        write_session_data(self.journal, ds.id)
        if left:
            limit = _max_download(self.client_for(ds.server))
            write_left_file(ds, left, limit)
            if not problems:
                self.journal.set_stage(
                    ds.id, "incomplete", error=summary(left, limit), level="warning"
                )
                return StepOutcome("incomplete")
            problems.append(summary(left, limit))
        else:
            remove_left_file(ds)
        if problems:
            self.journal.set_stage(ds.id, "failed", error="; ".join(problems))
            return StepOutcome("failed")
        note = " (remote data kept)" if kept_remote else " and the server is clean"
        self.journal.set_stage(ds.id, "done", message=f"outputs in {ds.output_dir}{note}")
        return StepOutcome("done")

    def _launch(self, ds: Dataset, e: Any) -> None:
        """Launch one planned execution, exactly once (idempotent across crashes)."""
        client = self.client_for(ds.server)
        job = ds.job or {}
        announce = f"launching {e.name}"
        # the announcement is committed before any POST: without it no earlier attempt can
        # have reached VIP, and the lookup (a listing of the account's executions) is saved
        tried = self.journal.has_event(ds.id, announce)
        existing = client.find_execution(e.name) if tried else None
        if existing is None:
            if not tried:
                self.journal.event(ds.id, announce)
            try:
                info = client.create_execution(
                    e.name, str(job.get("pipeline")), e.inputs,
                    results_location=self._results_location(ds, e.key),
                )
            except LaunchUncertain:
                existing = client.find_execution(e.name)
                if existing is None:
                    raise
                info = existing
            failpoints.hit("launch:posted")
        else:
            info = existing
            self.journal.event(ds.id, f"found execution {info.get('identifier')} already launched")
        self.journal.update_execution(
            ds.id, e.key, vip_id=str(info["identifier"]), status=str(info.get("status")),
            launched=time.time(),
        )

    def _results_location(self, ds: Dataset, key: str) -> str:
        """``OUTPUTS`` as VipSession uses it; one subfolder per execution when there are several.

        VIP names the results folder after the launch second, so two executions of one
        dataset launched in the same second would write the same files into the same folder.
        """
        outputs = f"{ds.remote_root}/OUTPUTS"
        if len(self.journal.executions(ds.id)) > 1:
            return f"{outputs}/{key}"
        return outputs

    def _poll_interval(self, ds: Dataset, executions: list[Any]) -> float:
        """Seconds until the next status request for a dataset whose executions run.

        Short at first, then a tenth of the time the executions have run, between the
        dataset's ``poll`` minimum and maximum. While other launches wait for a slot
        (other datasets, or this dataset's further runs), the running execution is
        checked every :data:`BUSY_POLL` seconds, so the next launch follows its end
        within about a second; the status requests of one server then stay under
        :data:`MAX_POLL_RATE` per second however many executions run.
        """
        tuning = self.tuning_for(ds) if self.tuning_for else Tuning()
        low = tuning.poll_min if tuning.poll_min is not None else self.poll_min
        high = max(low, tuning.poll_max if tuning.poll_max is not None else self.poll_max)
        launched = [e.launched for e in executions if e.launched]
        elapsed = time.time() - min(launched) if launched else 0.0
        interval = min(max(low, elapsed / 10), high)
        if interval > BUSY_POLL and self._launches_waiting(ds, executions):
            running = max(1, self.journal.running_executions(ds.server))
            busy = max(BUSY_POLL, running / MAX_POLL_RATE)
            quiet = self._quiet_for(ds, executions, busy)
            if quiet > busy:
                # no end expected yet: the usual interval, but look again when one may come
                interval = min(interval, quiet)
            else:
                interval = min(interval, _on_grid(busy, ds.id, time.time()))
        return interval

    def _quiet_for(self, ds: Dataset, executions: list[Any], busy: float) -> float:
        """Seconds before this dataset's running executions may end, judging by the shortest
        run of their pipeline seen on this server (less one busy interval, since an end is seen
        up to one poll late); 0 when no history says so."""
        pipeline = str((ds.job or {}).get("pipeline") or "")
        shortest = self._shortest_run(ds.server, pipeline)
        starts = [e.launched for e in executions
                  if e.vip_id and e.launched and e.status not in TERMINAL_STATUSES]
        if shortest is None or not starts:
            return 0.0
        return max(0.0, min(starts) + shortest - busy - time.time())

    def _shortest_run(self, server: str, pipeline: str) -> float | None:
        """The shortest launch-to-end time among the latest runs of ``pipeline`` on ``server``;
        None until there are :data:`HISTORY_MIN_RUNS`. Cached :data:`HISTORY_TTL` seconds."""
        now = time.monotonic()
        with self._lock:
            cached = self._run_times.get(server)
        if cached is None or cached[0] < now:
            by_pipeline: dict[str, list[float]] = {}
            for name, seconds in self.journal.run_times(server, limit=4 * HISTORY_RUNS):
                by_pipeline.setdefault(name, []).append(seconds)
            cached = (now + HISTORY_TTL, by_pipeline)
            with self._lock:
                self._run_times[server] = cached
        runs = cached[1].get(pipeline, [])[:HISTORY_RUNS]
        return min(runs) if len(runs) >= HISTORY_MIN_RUNS else None

    def _launches_waiting(self, ds: Dataset, executions: list[Any]) -> bool:
        if any(not e.vip_id for e in executions):
            return True
        return self.journal.waiting_launches(ds.server) > 0

    def slot_free(self, server: str) -> bool:
        """May an execution be launched on ``server`` now? The only place the running cap
        (``max_running``, per server) is applied: the scheduler asks here too."""
        cap = self._max_running(server) if callable(self._max_running) else self._max_running
        if cap is None:
            return True
        return self.journal.running_executions(server) < cap

    def _cancel(self, ds: Dataset) -> StepOutcome:
        """Kill the executions; clean the server only once VIP confirms they all ended."""
        client = self.client_for(ds.server)
        memo = self._memo(ds.id)
        waiting = []
        for e in self.journal.executions(ds.id):
            if not e.vip_id or e.status in TERMINAL_STATUSES:
                continue
            now = time.time()
            last = memo.kill_sent.get(e.key)
            if last is None or now - last >= KILL_REPEAT:
                try:
                    client.kill(e.vip_id)
                except NotFoundError:
                    pass  # gone: the poll below records it
                memo.kill_sent[e.key] = now
                if last is None:
                    self.journal.event(ds.id, f"execution {e.vip_id} killed")
            info = self._poll_execution(ds, client, e)
            if info is None:
                continue
            status = str(info["status"])
            ended = status_kind(status) == "ended"
            self.journal.update_execution(
                ds.id, e.key, status=status, **({"ended": now} if ended else {})
            )
            if not ended:
                waiting.append(e.vip_id)
        if waiting:
            memo.notice = (
                f"cancelling: waiting for VIP to confirm that {', '.join(waiting)} ended before "
                "deleting anything"
            )
            return StepOutcome(ds.stage, 1.0)
        discard = bool(ds.options.get("discard"))  # cancel --discard of an incomplete dataset
        keep = bool(ds.options.get("keep_remote")) and not discard
        if not keep and ds.remote_root:
            for e in self.journal.executions(ds.id):
                if e.vip_id and not e.cleaned:
                    try:
                        client.delete_execution(e.vip_id, delete_files=True)
                        self._record_removed(ds.id, execution=e.vip_id)
                    except VipError:
                        pass  # not deletable (failed) or already gone
                    self.journal.update_execution(ds.id, e.key, cleaned=1)
            if client.exists(ds.remote_root):
                try:
                    client.delete(ds.remote_root)
                except NotFoundError:
                    pass
                return StepOutcome(ds.stage, 2.0)
            self._record_removed(ds.id, path=ds.remote_root)
        write_session_data(self.journal, ds.id)
        if discard:
            remove_left_file(ds)
            # a request, not a setting: a later attempt must not inherit it
            fresh = self.journal.get(ds.id).options or {}
            options = {k: v for k, v in fresh.items() if k != "discard"}
            self.journal.update(ds.id, options=options)
            message = "cancelled: the outputs left on VIP were deleted; the server is clean"
        else:
            message = "cancelled; the server is clean"
        self.journal.set_stage(ds.id, "cancelled", message=message)
        return StepOutcome("cancelled")

    def _save_logs(
        self, ds: Dataset, client: VipClient, vip_id: str, key: str, jobs: dict[str, Any]
    ) -> None:
        folder = Path(ds.output_dir or ".") / LOGS_DIR / key
        folder.mkdir(parents=True, exist_ok=True)
        job_ids: list[str | None] = [*sorted(jobs, key=lambda j: (len(j), j))] or [None]
        for job in job_ids:
            for stream in ("stdout", "stderr"):
                try:
                    text = getattr(client, stream)(vip_id, job) if job is not None else getattr(
                        client, stream
                    )(vip_id)
                except VipError as err:
                    text = f"(not available: {err.message})\n"
                suffix = f"job{job}." if job is not None else ""
                write_atomic(folder / f"{suffix}{stream}.txt", text)

    def _local_failure(self, ds: Dataset, err: OSError) -> StepOutcome:
        import errno

        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            message = (
                f"the disk is full ({err.filename or ds.output_dir}); the dataset waits and "
                "resumes when space is freed"
            )
            self.journal.update(ds.id, error=message, error_detail=str(err))
            self.journal.event(ds.id, message, level="error")
            return StepOutcome(ds.stage, 60.0)
        message = f"local file problem: {err.strerror or err} ({err.filename or ''})"
        self.journal.set_stage(ds.id, "failed", error=message, detail=repr(err))
        return StepOutcome("failed")

    def _choose_output_dir(self, ds: Dataset, job: Any, name: str) -> Path:
        root = Path(ds.output_root)
        job_out = getattr(job, "output_dir", None)
        if job_out and not ds.options.get("output_override"):
            root = Path(job_out)
            if not root.is_absolute():
                root = Path(ds.path).parent / root
        base = safe_token(name, 80)
        # chosen once, stored in the journal before use; never a folder that already exists
        candidates = [base, f"{base}-{(ds.fingerprint or '')[:8]}", f"{base}-{ds.id}"]
        if ds.attempts:
            candidates.insert(0, f"{base}-attempt{ds.attempts + 1}")
        for candidate in candidates:
            if not (root / candidate).exists():
                return root / candidate
        return root / f"{base}-{ds.id}-{int(time.time())}"

    def _dataset_root(self, ds: Dataset) -> Path:
        path = Path(ds.path)
        return path.parent if path.is_file() else path

    def _parallel(self, fn: Callable[[Any], None], items: list[Any], threads: int) -> None:
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
                    fn(item)
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

    def _threads(self, ds: Dataset) -> int:
        tuned = self.tuning_for(ds).parallelism if self.tuning_for else None
        return max(1, tuned or self.transfer_threads)

    def _progress(self, dataset_id: int, kind: str, done: int, total: int) -> None:
        """Report transfer progress: to the caller; rate and ETA to the journal once a
        second and to STATUS.json every few seconds; a service log line every so often."""
        if self.progress:
            self.progress(dataset_id, kind, done, total)
        update = self._tracker.update(dataset_id, kind, done, total)
        if update.journal:
            self.journal.update(dataset_id, progress=update.as_progress())
        if update.status and done < total:  # at the end the step writes it anyway
            self._write_status(dataset_id)
        if update.log:
            log.info("%s: %s", self._name(dataset_id), update.log)

    def _name(self, dataset_id: int) -> str:
        try:
            return self.journal.get(dataset_id).name
        except KeyError:
            return f"#{dataset_id}"

    def _memo(self, dataset_id: int) -> _Memo:
        with self._lock:
            return self._memos.setdefault(dataset_id, _Memo())

    def _write_status(self, dataset_id: int) -> None:
        """Write STATUS.json beside the dataset's outputs (best effort)."""
        ds = self.journal.get(dataset_id)
        if not ds.output_dir:
            return
        folder = Path(ds.output_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / STATUS_FILE, json.dumps(status_record(self.journal, ds), indent=2))
        except OSError:
            log.warning("could not write %s", folder / STATUS_FILE)


def status_record(journal: Journal, ds: Dataset) -> dict[str, Any]:
    """What ``STATUS.json`` and ``vip-agent status --json`` say of a dataset."""
    execs = journal.executions(ds.id)
    return {
        "name": ds.name,
        "state": ds.state,
        "stage": ds.stage,
        "path": ds.path,
        "fingerprint": ds.fingerprint,
        "output_dir": ds.output_dir,
        "progress": ds.progress,
        "executions": [e.vip_id for e in execs if e.vip_id],
        "execution_status": {e.vip_id: e.status for e in execs if e.vip_id},
        "error": ds.error,
        "paused": ds.paused,
        "created": ds.created,
        "updated": ds.updated,
        "finished": ds.finished,
    }


def unknown_pipeline(client: VipClient, identifier: str) -> str:
    """Why ``identifier`` cannot be used, naming the closest pipelines the server offers."""
    from agent.validate import closest_pipelines

    try:
        near = closest_pipelines(identifier, client.pipelines())
    except VipError:
        near = []
    hint = f" (closest: {', '.join(repr(n) for n in near)})" if near else ""
    return (
        f"pipeline {identifier!r} does not exist on {client.base_url} or you may not use it{hint}; "
        "check the name with `vip-agent pipelines`"
    )


def _inside(root: Path, rel: PurePosixPath) -> Path:
    """``root / rel``, refusing anything that would land outside ``root``."""
    parts = [p for p in rel.parts if p not in ("", ".")]
    if not parts or any(p == ".." or "/" in p or "\\" in p or p.startswith("/") for p in parts):
        raise AgentError(f"refusing output path {rel!s}: it would leave the output folder")
    return root.joinpath(*parts)


def _max_download(client: VipClient, *, refresh: bool = False) -> int | None:
    """VIP's direct-transfer limit (``/platform``, cached by the client), None if unknown."""
    try:
        return client.max_transfer_size(refresh=refresh)
    except AuthError:
        raise
    except VipError:
        return None


def _clock(when: float) -> str:
    """A local wall-clock time for messages (``14:03:07``, with the date if not today)."""
    stamp = time.localtime(when)
    if time.strftime("%Y-%m-%d", stamp) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", stamp)
    return time.strftime("%Y-%m-%d %H:%M:%S", stamp)


def _duration(seconds: float | None) -> str:
    """``45 s``, ``12 min``, ``3.5 h``."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
