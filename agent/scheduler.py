"""The scheduler: steps many datasets through the runner within limits.

One dispatcher thread decides what runs; each step runs in its own daemon
thread (a step is one bounded slice of a stage, see ``agent.runner``). Limits:

* ``upload`` and ``download`` pools: ``max_uploads`` / ``max_downloads`` per drop
  folder; ``local`` (validate, extract, cleanup) and ``monitor`` have small
  fixed sizes.
* Executions: a step that may launch (stage ``launch``, or ``monitor`` with
  executions not yet launched) runs one at a time per server, and a ``launch``
  step starts only while ``runner.slot_free(server)`` (the server's
  ``max_running``, decided by the runner alone). VIP's own cap (2001) answers with ``retry_after``
  anyway, so the cap is never exceeded and never fails a dataset.
* Uploads ahead of the slot: a dataset starts uploading only while fewer than
  ``upload_ahead(server)`` datasets of its server are uploading or uploaded and waiting
  to launch; the others keep their files locally, shown ``queued`` with the reason
  (``agent.journal.UPLOAD_HELD``). Thousands of datasets dropped at once never fill the
  account's storage with inputs waiting on VIP.
* Waiting (monitor polling, capacity, outage) is a deadline on the dispatcher,
  not a sleeping thread.
* An :class:`~agent.vip.errors.AuthError` pauses every dataset of that server
  (journal ``paused``), is logged once, and is probed with backoff until the key
  works again (:meth:`Scheduler.probe_now` on SIGHUP).
* One owner per dataset: a dataset is tracked only once its journal lease is taken
  (:meth:`agent.journal.Journal.take_lease`); a dataset a live ``vip-agent run`` drives is
  left alone, and taken when that process is gone. Leases are renewed every
  ``LEASE_BEAT`` seconds and released when a dataset ends.
* The journal itself: a write that fails (disk full, read-only) is said once and retried;
  the file deleted, replaced or emptied under the agent stops it (``on_lost``).

Stopping: :meth:`stop` stops dispatching and sets the runner's stop event;
steps check it between chunks and raise ``Interrupted``. Step threads are
daemon threads, so the process can exit without waiting for a transfer: the
journal is written before every action, so an abandoned step resumes cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent import pause as user_pause
from agent.config import Limits
from agent.errors import CredentialError
from agent.holds import Holds, ServerPause
from agent.journal import (
    ACTIVE_STAGES_SQL,
    FINAL_STAGES,
    LEASE_BEAT,
    LIVE_SQL,
    PUBLIC_STATE,
    UPLOAD_HELD,
    Dataset,
    Journal,
    JournalWriteError,
    Owner,
    Stage,
)
from agent.pacer import policy
from agent.runner import STAGE_POOL, Interrupted
from agent.runner.launch import REFUSED_LABEL

log = logging.getLogger("vip_agent.scheduler")

#: consecutive unexpected errors (bugs) before a dataset is marked failed
MAX_UNEXPECTED = 5


class StepRunner(Protocol):
    """What the scheduler needs of :class:`agent.runner.Runner`."""

    def step(self, dataset_id: int) -> Any: ...

    def slot_free(self, server: str) -> bool: ...


@dataclass
class _Entry:
    id: int
    name: str
    server: str
    group: str  # the drop folder (limits are per drop folder)
    stage: str
    state: str = "ready"  # ready | timer | busy | paused
    due: float = 0.0
    pool: str = ""  # pool of the step in flight
    unexpected: int = 0


class Scheduler(Holds):
    """Run datasets from the journal through ``runner.step`` within limits."""

    def __init__(
        self,
        journal: Journal,
        runner: StepRunner,
        *,
        limits_for: Callable[[str | None], Limits] = lambda group: Limits(),
        probe: Callable[[str], None] | None = None,
        on_final: Callable[[int, str], None] | None = None,
        stop_event: threading.Event | None = None,
        local_workers: int = 2,
        monitor_workers: int = 4,
        auth_retry: tuple[float, float] | None = None,
        poll_journal: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        owner: Owner | None = None,
        on_lost: Callable[[str], None] | None = None,
        upload_ahead: Callable[[str], int | None] | None = None,
    ) -> None:
        self.journal = journal
        self.runner = runner
        self.limits_for = limits_for
        self.probe = probe
        self.on_final = on_final
        self.stop_event = stop_event or threading.Event()
        self.local_workers = local_workers
        self.monitor_workers = monitor_workers
        #: waits between checks of a refused key: the ``auth_probe`` policy; ``auth_retry``
        #: (first, largest) replaces its numbers (tests)
        rule = policy("auth_probe")
        self.auth_policy = replace(rule, base=auth_retry[0], cap=auth_retry[1]) if auth_retry else rule
        self.auth_retry = (self.auth_policy.base, self.auth_policy.cap)
        self.poll_journal = poll_journal
        self.clock = clock
        self._cond = threading.Condition()
        self._entries: dict[int, _Entry] = {}
        self._busy: Counter[tuple[str, str]] = Counter()
        self._paused: dict[str, ServerPause] = {}
        self._thread: threading.Thread | None = None
        self._steps: set[threading.Thread] = set()
        self._next_poll = 0.0
        #: what happened, for tests and the status line: counts of steps per pool
        self.stats: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        #: this process as the owner of the datasets it drives (journal leases)
        self.owner = owner or Owner.this_process("service")
        self.on_lost = on_lost
        #: why the journal was given up (deleted/replaced under us), once it was
        self.lost: str | None = None
        self._next_beat = 0.0
        #: datasets seen owned by another live process: id -> that owner's token (said once)
        self._others: dict[int, str] = {}
        #: the journal write failure being reported (said once, and when it is over)
        self._write_trouble: str | None = None
        #: what users paused (`vip-agent pause`, the page: agent/pause.py), re-read at every
        #: look at the journal; and the datasets asked to cancel (a cancel passes a pause)
        self._held = user_pause.Pauses()
        self._cancels: set[int] = set()
        #: datasets of a server that may upload ahead of its running slot (None: no limit)
        self.upload_ahead = upload_ahead
        #: datasets whose upload started (they count ahead until they launch)
        self._uploads_started: set[int] = set()
        #: datasets held back by ``upload_ahead``: id -> the reason they were given
        self._held_uploads: dict[int, str] = {}

    # -- public --------------------------------------------------------------------
    def start(self) -> None:
        """Resume every unfinished dataset of the journal and start dispatching."""
        self.resume_all()
        self.refresh_pauses()
        self._thread = threading.Thread(target=self._loop, name="vip-agent-scheduler", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 3.0) -> bool:
        """Stop dispatching; wait up to ``grace`` s for steps in flight (True if none is left)."""
        self.stop_event.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=grace)
        deadline = self.clock() + grace
        for t in list(self._steps):
            t.join(timeout=max(0.0, deadline - self.clock()))
        left = [t for t in self._steps if t.is_alive()]
        if left:
            log.info("stopping with %d step(s) in flight; they resume at the next start", len(left))
        return not left

    def resume_all(self) -> int:
        """Track every dataset the journal has between ``validate`` and a final stage."""
        n = 0
        for ds in self.journal.datasets(where=f"stage IN {ACTIVE_STAGES_SQL}"):
            if self.submit(ds):
                n += 1
                if ds.paused and ds.server not in self.paused_servers():
                    self.journal.update(ds.id, paused=None)  # re-checked by the next step
        if n:
            log.info("resuming %d unfinished dataset(s) from the journal", n)
        return n

    def submit(self, ds: Dataset | int) -> bool:
        """Start tracking a dataset (no-op if tracked or final). Thread-safe."""
        if isinstance(ds, int):
            ds = self.journal.get(ds)
        if ds.stage in FINAL_STAGES or ds.stage == "waiting":
            return False
        with self._cond:
            if ds.id in self._entries:
                return False
        if not self._take(ds):
            return False
        self._read_pauses()  # a pause made a moment ago holds a dataset admitted now
        with self._cond:
            if ds.id in self._entries:
                return False
            entry = _Entry(ds.id, ds.name, ds.server, ds.drop_dir or "", ds.stage)
            self._entries[ds.id] = entry
            if ds.stage == Stage.UPLOAD.value and ds.progress:
                self._uploads_started.add(ds.id)  # resumed mid-upload: its files are on VIP
            pause = self._paused.get(ds.server)
            if pause is not None:
                entry.state = "paused"
        if pause is not None:
            self.journal.update(ds.id, paused=pause.reason)
        with self._cond:
            self._cond.notify_all()
        return True

    def _take(self, ds: Dataset) -> bool:
        """Take the dataset's lease; False (said once) while another live process drives it."""
        held = self.journal.take_lease(ds.id, self.owner)
        if held is None:
            self._others.pop(ds.id, None)
            return True
        if self._others.get(ds.id) != held.owner.token:
            self._others[ds.id] = held.owner.token
            log.info("%s: driven by %s; left to it", ds.name, held.owner.describe())
        return False

    def journal_trouble(self, err: BaseException | None) -> None:
        """Say a journal write failure once (and once when writes work again)."""
        if err is None:
            if self._write_trouble is not None:
                self._write_trouble = None
                log.info("the journal %s can be written again; going on", self.journal.path)
            return
        text = str(err)
        if self._write_trouble is None:
            log.error("%s", text)
        self._write_trouble = text

    def wake(self, dataset_id: int) -> None:
        """Step a dataset now if it is waiting on a timer (e.g. a cancel request)."""
        with self._cond:
            e = self._entries.get(dataset_id)
            if e is not None and e.state == "timer":
                e.state, e.due = "ready", 0.0
                self._cond.notify_all()

    def counts(self) -> Counter[str]:
        """Tracked datasets by public state (for the systemd STATUS line)."""
        with self._cond:
            return Counter(
                "paused" if e.state == "paused" or self._holds(e)
                else "queued" if e.id in self._held_uploads
                else PUBLIC_STATE.get(e.stage, e.stage)
                for e in self._entries.values()
            )  # fmt: skip

    def tracked(self) -> set[int]:
        with self._cond:
            return set(self._entries)

    def idle(self) -> bool:
        with self._cond:
            return not self._entries

    # -- dispatcher ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stop_event.is_set():
            now = self.clock()
            if now >= self._next_poll:
                self._next_poll = now + self.poll_journal
                lost = self.journal.changed_under_us()
                if lost is not None:
                    self._lose_journal(lost)
                    break
                try:
                    if now >= self._next_beat:
                        self._next_beat = now + LEASE_BEAT
                        self.journal.renew_leases(self.owner)
                    self._poll_journal()
                except JournalWriteError as err:
                    self.journal_trouble(err)
                except Exception:  # never let a journal hiccup kill the dispatcher
                    log.exception("could not read the journal; trying again shortly")
            with self._cond:
                if self.stop_event.is_set():
                    break
                wait = self._dispatch(self.clock())
                wait = min(wait, max(0.0, self._next_poll - self.clock()))
                self._cond.wait(timeout=wait)

    def _lose_journal(self, why: str) -> None:
        """Stop at once: going on would write to a file nobody sees (and re-run work later)."""
        self.lost = why
        log.error(
            "%s; stopping. Restart the agent: it starts a new journal (or restore a backup), "
            "and a dataset whose outputs are already mirrored is recorded as done, not run again",
            why,
        )
        self.stop_event.set()
        with self._cond:
            self._cond.notify_all()
        if self.on_lost is not None:
            self.on_lost(why)

    def _poll_journal(self) -> None:
        """Pick up datasets other processes changed: ``retry`` (stage validate), ``cancel``."""
        tracked = self.tracked()
        live = self.journal.datasets(where=LIVE_SQL)
        self._cancels = {ds.id for ds in live if ds.cancel_requested}
        for ds in live:
            if ds.id not in tracked:
                if not ds.final and self.submit(ds):
                    log.info("%s: picked up from the journal (stage %s)", ds.name, ds.stage)
            elif ds.cancel_requested:
                self.wake(ds.id)
        self.refresh_pauses()

    def _pool_of(self, e: _Entry) -> str:
        pool = STAGE_POOL.get(e.stage, "local")
        if pool == "monitor":
            # a monitor step launches the dataset's next execution when a slot is free
            if self._launches_left(e):
                return "launch"
        return pool

    def _launches_left(self, e: _Entry) -> bool:
        # a run the platform refused for good (REFUSED_LABEL) is never launched again
        return any(x.vip_id is None and x.status != REFUSED_LABEL
                   for x in self.journal.executions(e.id))  # fmt: skip

    def _limit(self, pool: str, e: _Entry) -> tuple[tuple[str, str], int]:
        if pool == "upload":
            return (pool, e.group), self.limits_for(e.group or None).max_uploads
        if pool == "download":
            return (pool, e.group), self.limits_for(e.group or None).max_downloads
        if pool == "launch":
            return (pool, e.server), 1
        if pool == "monitor":
            return (pool, ""), self.monitor_workers
        return (pool, e.group), self.local_workers

    def _dispatch(self, now: float) -> float:
        """Start what may start; return seconds until the next deadline. Holds the lock."""
        wait = 60.0
        for server, pause in self._paused.items():
            if not pause.probing:
                if pause.next_probe <= now:
                    pause.probing = True
                    self._spawn(self._probe, server, name=f"probe {server}")
                else:
                    wait = min(wait, pause.next_probe - now)
        full: set[str] = set()
        ahead = self._uploads_ahead()
        newly_held: list[tuple[int, str]] = []
        for e in sorted(self._entries.values(), key=lambda x: x.id):
            if e.state == "timer":
                if e.due > now:
                    wait = min(wait, e.due - now)
                    continue
                e.state = "ready"
            if e.state != "ready":
                continue
            pool = self._pool_of(e)
            if pool != "monitor" and self._holds(e):
                continue  # paused by a user: only polling a running execution goes on
            key, limit = self._limit(pool, e)
            if self._busy[key] >= limit:
                continue
            if pool == "upload" and e.id not in self._uploads_started and e.id not in self._cancels:
                reason = self._upload_gate(e, ahead)
                if reason is not None:
                    if e.id not in self._held_uploads:
                        self._held_uploads[e.id] = reason
                        newly_held.append((e.id, reason))
                    continue
                self._uploads_started.add(e.id)
                ahead[e.server] = ahead.get(e.server, 0) + 1
            if pool == "launch" and e.stage == "launch" and self._launches_left(e):
                # the runner decides (one authority); launch steps of a server run one at a time.
                # A dataset whose executions are all launched (a crash right after the launch)
                # needs no slot: its own running execution must not block it
                if e.server in full or not self.runner.slot_free(e.server):
                    full.add(e.server)
                    continue  # re-evaluated whenever a step ends
            self._busy[key] += 1
            self.max_in_flight[pool] = max(self.max_in_flight[pool], self._busy[key])
            e.state, e.pool = "busy", pool
            self.stats[pool] += 1
            self._spawn(self._step, e, key, name=f"step {e.name}")
        if newly_held:
            self._spawn(self._note_held, newly_held, name="upload-ahead")
        return max(wait, 0.0)

    def _uploads_ahead(self) -> dict[str, int]:
        """Per server: datasets uploading or uploaded and waiting to launch (lock held)."""
        counts: Counter[str] = Counter()
        for x in self._entries.values():
            if x.stage == Stage.LAUNCH.value or (
                x.stage == Stage.UPLOAD.value and x.id in self._uploads_started
            ):
                counts[x.server] += 1
        return dict(counts)

    def _upload_gate(self, e: _Entry, ahead: dict[str, int]) -> str | None:
        """Why ``e`` may not start uploading now (``upload_ahead``), or None (lock held)."""
        limit = self.upload_ahead(e.server) if self.upload_ahead is not None else None
        if limit is None or ahead.get(e.server, 0) < limit:
            return None
        return (
            f"{UPLOAD_HELD}{ahead.get(e.server, 0)} dataset(s) of {e.server} are uploaded or "
            f"uploading ahead of its running slot (upload_ahead: {limit}); its files stay "
            "here until one of them launches"
        )

    def _note_held(self, held: list[tuple[int, str]]) -> None:
        """Show why held datasets wait (``vip-agent status``, the page: state ``queued``)."""
        for dataset_id, reason in held:
            with contextlib.suppress(Exception):  # a note only: the journal may be failing
                self.journal.update(dataset_id, error=reason, error_detail=None)

    def _spawn(self, fn: Callable[..., None], *args: Any, name: str) -> None:
        def run() -> None:
            try:
                fn(*args)
            finally:
                with self._cond:
                    self._steps.discard(threading.current_thread())

        t = threading.Thread(target=run, name=f"vip-agent {name}", daemon=True)
        self._steps.add(t)
        t.start()

    # -- one step ------------------------------------------------------------------
    def _step(self, e: _Entry, key: tuple[str, str]) -> None:
        from agent.vip.errors import AuthError

        outcome: Any = None
        error: BaseException | None = None
        trouble: JournalWriteError | None = None
        with self._cond:
            released = self._held_uploads.pop(e.id, None)
        try:
            if released is not None:  # no longer held back: it uploads now
                self.journal.update(e.id, error=None, error_detail=None)
            outcome = self.runner.step(e.id)
        except (AuthError, CredentialError) as err:
            error = err
        except JournalWriteError as err:  # disk full, read-only: said once, retried
            trouble = err
        except Interrupted:
            pass
        except Exception as err:  # a bug in a step must not stop the agent
            error = err
            log.exception("%s: unexpected error at stage %s", e.name, e.stage)
        finally:
            with self._cond:
                self._busy[key] -= 1
        self.journal_trouble(trouble)
        if trouble is not None:
            with self._cond:
                if not self.stop_event.is_set():
                    e.state, e.due = "timer", self.clock() + 5.0
                self._cond.notify_all()
            return
        final_stage = None
        pause_reason = None
        with self._cond:
            if self.stop_event.is_set() and outcome is None:
                self._cond.notify_all()
                return
            if outcome is None and error is None:  # a paused dataset's transfer stopped
                e.state = "ready"  # held by the gate until resumed
                self._cond.notify_all()
                stopped = True
            else:
                stopped = False
        if stopped:
            log.info("%s: paused: its %s stopped; it goes on from there when resumed", e.name, e.pool)
            with contextlib.suppress(Exception):  # a note only: the journal may be failing
                self.journal.event(e.id, f"paused: the {e.pool} stopped (files already sent are kept; "
                                         "the file in flight starts again on resume)")  # fmt: skip
            return
        with self._cond:
            now = self.clock()
            if isinstance(error, CredentialError):
                pause_reason = self._pause_locked(e, error)
            elif error is not None:
                e.unexpected += 1
                if e.unexpected >= MAX_UNEXPECTED:
                    final_stage = "failed"
                else:
                    e.state, e.due = "timer", now + policy("unexpected").delay(e.unexpected - 1)
            else:
                e.unexpected = 0
                e.stage = outcome.stage
                if e.stage in FINAL_STAGES:
                    final_stage = e.stage
                elif outcome.retry_after:
                    e.state, e.due = "timer", now + float(outcome.retry_after)
                else:
                    e.state = "ready"
            if e.stage != Stage.UPLOAD.value:
                self._uploads_started.discard(e.id)  # counted by its stage from here on
            if final_stage is not None:
                self._entries.pop(e.id, None)
                self._held_uploads.pop(e.id, None)
            self._cond.notify_all()
        if final_stage is not None:
            try:
                self.journal.release_lease(e.id, self.owner)
            except JournalWriteError:
                pass  # a stale lease of a final dataset harms nobody: taken over when needed
        if pause_reason is not None:
            self.journal.update(e.id, paused=pause_reason)
        if final_stage == "failed" and error is not None and e.unexpected >= MAX_UNEXPECTED:
            self.journal.set_stage(
                e.id, Stage.FAILED,
                error=f"internal error after {MAX_UNEXPECTED} attempts: {error}; "
                      "please report it, then `vip-agent retry` the dataset",
                detail=repr(error),
            )  # fmt: skip
        if final_stage is not None and self.on_final is not None:
            try:
                self.on_final(e.id, final_stage)
            except Exception:
                log.exception("%s: could not finish up after stage %s", e.name, final_stage)
