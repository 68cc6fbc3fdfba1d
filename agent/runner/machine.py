"""The machine: one step of a dataset is its stage's step function (``agent.runner.table``),
and the machine alone acts on what it returns: it writes the stage, or says how long to wait.

``Runner.step(id)`` performs the current stage of one dataset (or one bounded slice of it)
and returns the stage it is now in, with how long to wait before calling again. Every
decision is committed to the journal before the action it announces, so a crash at any
instant resumes at the right place (see each stage's module). The runner never sleeps on
the network: waiting is returned as ``retry_after``.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent import failpoints
from agent.backend import as_backend
from agent.backend.errors import AuthError, CapacityError, TransientError
from agent.backend.port import Backend
from agent.errors import AgentError
from agent.fsutil import write_atomic
from agent.journal import (
    FINAL_STAGES,
    Dataset,
    IllegalTransition,
    Journal,
    JournalWriteError,
    Stage,
)
from agent.pacer import ServerBudget, budget_for, policy
from agent.progress import ProgressTracker
from agent.progress import current as current_progress
from agent.runner import cancel
from agent.runner.common import (
    DEFAULT_PARALLELISM,
    DEFAULT_POLL_MAX,
    DEFAULT_POLL_MIN,
    STATUS_FILE,
    UNKNOWN_LIMIT,
    Advance,
    Finish,
    GaveUp,
    Interrupted,
    Memo,
    Next,
    Tuning,
    Wait,
    clock_text,
    duration,
    wall_time,
)
from agent.runner.table import TABLE

log = logging.getLogger("vip_agent.runner")


@dataclass(frozen=True)
class StepOutcome:
    """Where a dataset stands after a step, and when to call ``step`` again."""

    stage: str
    retry_after: float | None = None

    @property
    def final(self) -> bool:
        return self.stage in FINAL_STAGES


#: the platform of a server: a backend (or a bare ``VipClient``, wrapped by ``as_backend``)
BackendFactory = Callable[[str], object]


class Runner:
    """Drives datasets through their stages. Thread-safe across datasets."""

    def __init__(
        self,
        journal: Journal,
        client_for: BackendFactory,
        *,
        stop_event: threading.Event | None = None,
        max_running: Callable[[str], int | None] | int | None = None,
        transfer_threads: int = DEFAULT_PARALLELISM,
        progress: Callable[[int, str, int, int], None] | None = None,
        poll_min: float = DEFAULT_POLL_MIN,
        poll_max: float = DEFAULT_POLL_MAX,
        retry_base: float | None = None,
        capacity_wait: float | None = None,
        tuning_for: Callable[[Dataset], Tuning] | None = None,
        unknown_limit: float = UNKNOWN_LIMIT,
        give_up_after: float | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        budget_for: Callable[[str], ServerBudget] = budget_for,
    ) -> None:
        self.journal = journal
        #: ``server -> backend``; a bare ``VipClient`` is accepted (wrapped by ``as_backend``)
        self.client_for = client_for
        self.stop_event = stop_event or threading.Event()
        self._max_running = max_running
        self.transfer_threads = transfer_threads
        self.progress = progress
        self.poll_min = poll_min
        self.poll_max = poll_max
        #: first wait after a transient failure (doubles each time up to the ``outage``
        #: policy's cap); None: the policy's base
        self.retry_base = retry_base
        #: least wait after the server refused a launch for capacity (2000/2001); the wait
        #: itself is the server's budget's (``capacity`` policy, shared by every dataset)
        self.capacity_wait = capacity_wait
        self._budget_for = budget_for
        #: per-dataset settings (the drop folder's ``poll`` and ``transfer_parallelism``)
        self.tuning_for = tuning_for
        #: how long an execution may read ``Unknown`` before it is killed
        self.unknown_limit = unknown_limit
        #: stop retrying a failing server after this many seconds (None: never; ``watch``)
        self.give_up_after = give_up_after
        self._clock = clock
        #: durations acted on (Unknown limit, give-up, delete deadline, kill repeats) are
        #: measured on this clock, never on ``clock``: a wall-clock jump must not kill a
        #: healthy execution. A test's own ``clock`` (a memory backend's, which never goes
        #: back) serves as both unless it gives a separate one.
        self._monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self._memos: dict[int, Memo] = {}
        self._tracker = ProgressTracker()
        self.lock = threading.Lock()
        self.run_times: dict[str, tuple[float, dict[str, list[float]]]] = {}

    # -- the context the steps use (agent.runner.common.Context) ---------------------------
    def clock(self) -> float:
        return self._clock()

    def monotonic(self) -> float:
        return self._monotonic()

    def backend(self, server: str) -> Backend:
        return as_backend(self.client_for(server))

    def budget(self, server: str) -> ServerBudget:
        return self._budget_for(server)

    def memo(self, dataset_id: int) -> Memo:
        with self.lock:
            return self._memos.setdefault(dataset_id, Memo())

    def slot_free(self, server: str) -> bool:
        """May an execution be launched on ``server`` now? The only place the running cap
        (``max_running``, per server) is applied: the scheduler asks here too."""
        cap = self._max_running(server) if callable(self._max_running) else self._max_running
        if cap is None:
            return True
        return self.journal.running_executions(server) < cap

    def threads(self, ds: Dataset) -> int:
        tuned = self.tuning_for(ds).parallelism if self.tuning_for else None
        return max(1, tuned or self.transfer_threads)

    def report_progress(self, dataset_id: int, kind: str, done: int, total: int) -> None:
        """Report transfer progress: to the caller; rate and ETA to the journal once a
        second and to STATUS.json every few seconds; a service log line every so often."""
        if self.progress:
            self.progress(dataset_id, kind, done, total)
        update = self._tracker.update(dataset_id, kind, done, total)
        if update.journal:
            self.journal.update(dataset_id, progress=update.as_progress())
        if update.status and done < total:  # at the end the step writes it anyway
            self.write_status(dataset_id)
        if update.log:
            log.info("%s: %s", self._name(dataset_id), update.log)

    def write_status(self, dataset_id: int) -> None:
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

    # -- public ------------------------------------------------------------------------------
    def step(self, dataset_id: int) -> StepOutcome:
        """Perform the current stage of a dataset (see module docstring)."""
        ds = self.journal.get(dataset_id)
        if ds.final:
            return StepOutcome(ds.stage)
        memo = self.memo(dataset_id)
        started = self.monotonic()
        try:
            if ds.cancel_requested:
                nxt = cancel.step(self, ds)
            else:
                row = TABLE[Stage(ds.stage)]
                assert row.step is not None, f"stage {ds.stage} has no step"
                nxt = row.step(self, ds)
            outcome = self._apply(ds, nxt)
            memo.transient_failures = 0
            if memo.failing_since is not None:
                self.journal.event(
                    dataset_id,
                    f"VIP answers again (it failed for "
                    f"{duration(self.monotonic() - memo.failing_since)})",
                )
                memo.failing_since = None
            notice, memo.notice = memo.notice, None
            if notice and not outcome.final:
                self.journal.update(dataset_id, error=notice, error_detail=None)
            elif ds.error and not outcome.final:
                self.journal.update(dataset_id, error=None, error_detail=None)
        except (AuthError, Interrupted, JournalWriteError):
            raise  # the scheduler pauses, stops, or says once and retries (journal not writable)
        except CapacityError as err:
            # launches on this server back off together (agent.pacer), never every poll
            delay = max(self.budget(ds.server).launch_refused(err.code), self.capacity_wait or 0.0)
            self.journal.event(
                dataset_id, f"{err.message}; retrying in {delay:.0f} s", level="warning"
            )
            self.journal.update(dataset_id, error=err.message, error_detail=err.detail)
            outcome = StepOutcome(ds.stage, delay)
        except TransientError as err:
            outcome = self._server_failing(ds, memo, err, started)
        except OSError as err:
            outcome = self._local_failure(ds, err)
        except AgentError as err:  # ValidationError included: the lab user's message
            outcome = self._apply(ds, Finish(Stage.FAILED, error=err.message), detail=err.detail)
        self.write_status(dataset_id)
        if outcome.stage != ds.stage:
            failpoints.hit(f"stage:{outcome.stage}")
        if outcome.final:
            self._memos.pop(dataset_id, None)
        return outcome

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

    # -- the machine -------------------------------------------------------------------------
    def _apply(self, ds: Dataset, nxt: Next, *, detail: str | None = None) -> StepOutcome:
        """Act on what a step returned; the only place the runner writes a stage."""
        if isinstance(nxt, Wait):
            return StepOutcome(ds.stage, nxt.seconds)
        current = Stage(ds.stage)
        if nxt.stage is not current and nxt.stage not in TABLE[current].to:
            # a bug: said in the log and on the dataset, never raised at a user
            log.error("%s: a step chose %s -> %s, which the table forbids",
                      ds.name, current.value, nxt.stage.value)  # fmt: skip
            nxt = Finish(Stage.FAILED, error=f"internal error: {current.value} -> "
                         f"{nxt.stage.value} is not a legal stage change; please report it")
        try:
            if isinstance(nxt, Advance):
                self.journal.set_stage(ds.id, nxt.stage, message=nxt.message)
                return StepOutcome(nxt.stage.value, nxt.wait)
            self.journal.set_stage(ds.id, nxt.stage, message=nxt.message, error=nxt.error,
                                   detail=detail, level=nxt.level)  # fmt: skip
            return StepOutcome(nxt.stage.value)
        except IllegalTransition as err:
            # the dataset changed under this step (another process drove it): keep what
            # the journal says, never a traceback
            now = self.journal.get(ds.id)
            log.warning("%s: %s (the dataset is now %s; another process drives it?)",
                        ds.name, err, now.stage)  # fmt: skip
            return StepOutcome(now.stage, None if now.final else 1.0)

    def _backoff(self, memo: Memo) -> float:
        """The wait after the server failed ``memo.transient_failures`` times in a row."""
        rule = policy("outage")
        if self.retry_base is not None:
            rule = replace(rule, base=self.retry_base)
        return rule.delay(memo.transient_failures - 1)

    def _server_failing(
        self, ds: Dataset, memo: Memo, err: TransientError, started: float
    ) -> StepOutcome:
        """Wait and retry; said once in the events, kept current in the dataset's error."""
        memo.transient_failures += 1
        delay = self._backoff(memo)
        now = self.monotonic()  # the give-up deadline is a duration: never the wall clock
        if memo.failing_since is None:
            memo.failing_since = started  # the failing step began then
            give_up = (
                f"; giving up after {duration(self.give_up_after)}"
                if self.give_up_after is not None else "; waiting for it as long as it takes"
            )
            self.journal.event(
                ds.id, f"VIP at {ds.server} is unreachable or failing ({err.message}); "
                f"retrying with backoff{give_up}",
                level="warning",
            )
        since = memo.failing_since
        since_wall, now_wall = wall_time(self, since), self.clock()
        if self.give_up_after is not None and now - since >= self.give_up_after:
            message = (
                f"gave up: VIP at {ds.server} unreachable since {clock_text(since_wall)} "
                f"({duration(now - since)}; last error: {err.message}). Nothing is lost: run "
                "the same command again to resume where it stopped"
            )
            self.journal.update(ds.id, error=message, error_detail=err.detail)
            self.journal.event(ds.id, message, level="error")
            self.write_status(ds.id)
            raise GaveUp(message, err.detail)
        self.journal.update(
            ds.id,
            error=f"VIP unreachable since {clock_text(since_wall)}, next try at "
                  f"{clock_text(now_wall + delay)} ({err.message})",
            error_detail=err.detail,
        )
        return StepOutcome(ds.stage, delay)

    def _local_failure(self, ds: Dataset, err: OSError) -> StepOutcome:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            message = (
                f"the disk is full ({err.filename or ds.output_dir}); the dataset waits and "
                "resumes when space is freed"
            )
            self.journal.update(ds.id, error=message, error_detail=str(err))
            self.journal.event(ds.id, message, level="error")
            return StepOutcome(ds.stage, 60.0)
        message = f"local file problem: {err.strerror or err} ({err.filename or ''})"
        return self._apply(ds, Finish(Stage.FAILED, error=message), detail=repr(err))

    def _name(self, dataset_id: int) -> str:
        try:
            return self.journal.get(dataset_id).name
        except KeyError:
            return f"#{dataset_id}"


def status_record(journal: Journal, ds: Dataset) -> dict[str, Any]:
    """What ``STATUS.json`` and ``vip-agent status --json`` say of a dataset."""
    execs = journal.executions(ds.id)
    record = {
        "name": ds.name,
        "state": ds.state,
        "stage": ds.stage,
        "path": ds.path,
        "fingerprint": ds.fingerprint,
        "attempt": ds.attempt,  # counted from 1 (docs/operations.md, "Attempts and output folders")
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
    # a transfer's figures are history once the dataset moved on or ended
    record["progress"] = current_progress(record)
    return record
