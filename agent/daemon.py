"""The drop-folder service behind ``vip-agent watch`` (and ``demo``, and the web page).

Threads: one *watch loop* (events, readiness checks, rescans, after-processing;
it waits on a :class:`~agent.watch.detect.DeadlineQueue`), the scheduler's
dispatcher and its step threads, watchdog's observer threads, and the main
thread, which only waits for signals (``signal.set_wakeup_fd``: no Python code
runs inside a signal handler) and updates the systemd status line.

SIGTERM/SIGINT: stop taking work, ask running steps to stop (transfers check a
stop event between chunks), wait at most ``grace`` seconds, exit 0; whatever
was abandoned resumes from the journal at the next start. SIGHUP: reload
``agent.yaml``, re-read API keys and check paused servers again at once.
"""

from __future__ import annotations

import contextlib
import logging
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.bandwidth import Limiter
from agent.bandwidth import install as install_bandwidth
from agent.clients import ClientProvider, MissingKey
from agent.config import AgentConfig, DropConfig, Limits, load_config
from agent.errors import AgentError, ConfigError, CredentialError
from agent.journal import Journal, JournalWriteError
from agent.logs import RedactFilter
from agent.pacer import configure_transfers
from agent.runner import Tuning
from agent.scheduler import Scheduler
from agent.vip.errors import AuthError
from agent.watch.after import finish
from agent.watch.claim import CLAIM_BEAT, CLAIMED, DropClaim
from agent.watch.detect import DeadlineQueue, DropEventHandler, start_observer
from agent.watch.drop import DropFolder
from agent.watch.lock import AgentLock
from agent.watch.presence import MISSING, PRESENCE_INTERVAL, WATCHING, Presence

log = logging.getLogger("vip_agent.watch")

#: events for one dataset are coalesced for this long (and at most MAX_DEBOUNCE)
DEBOUNCE = 1.0
MAX_DEBOUNCE = 10.0


class AlreadyRunning(AgentError):
    """Another agent holds the state folder."""

    exit_code = 1


class WatchService:
    """The whole agent: drop folders -> readiness -> scheduler -> runner."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        client_for: Callable[[str], Any] | None = None,
        redact: RedactFilter | None = None,
        debounce: float = DEBOUNCE,
        runner_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        client_options: dict[str, Any] | None = None,
        native_factory: Callable[[], Any] | None = None,
        grace: float = 3.0,
        health_interval: float = 30.0,
    ) -> None:
        self.config = config
        self.debounce = debounce
        self.grace = grace
        self.stop_event = threading.Event()
        self.queue: DeadlineQueue[Hashable] = DeadlineQueue()
        self.lock = AgentLock(config.state)
        self.provider: ClientProvider | None = None
        if client_for is None:
            self.provider = ClientProvider(
                self._key_files(config), redact=redact, client_options=client_options
            )
            client_for = self.provider
        self.client_for = client_for
        self.runner_options = runner_options or {}
        self.scheduler_options = scheduler_options or {}
        self.native_factory = native_factory
        self.drops: dict[str, DropFolder] = {}
        self.observers: dict[str, tuple[Any, str]] = {}
        #: drop folder -> whether it is still the folder watched (see agent.watch.presence)
        self.presence: dict[str, Presence] = {}
        #: drop folder -> this agent's claim on it (see agent.watch.claim), and who else has one
        self.claims: dict[str, DropClaim] = {}
        #: drop folder -> ``agent-id@host`` of the other agent that claimed it (page, health)
        self.claimed_by: dict[str, str] = {}
        self.journal: Journal | None = None
        self.scheduler: Scheduler | None = None
        #: each server's bandwidth limiter (None: no limit), from the drop folders' ``bandwidth:``
        self.bandwidth: dict[str, Limiter | None] = {}
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()
        self._status = ""
        #: the DICOM node (``dicom:`` in agent.yaml), started with the service
        self.dicom: Any = None
        self._wake: socket.socket | None = None  # run()'s self-pipe (see _journal_lost)
        from agent.oversight import Oversight

        #: health, alerts, metrics and the status page (``http:``)
        self.oversight = Oversight(self, interval=health_interval)

    @staticmethod
    def _key_files(config: AgentConfig) -> dict[str, Path | None]:
        out: dict[str, Path | None] = {}
        for d in config.drops:
            out.setdefault(d.server, d.key_file)
        return out

    # -- limits ----------------------------------------------------------------------
    def limits_for(self, drop_dir: str | None) -> Limits:
        drop = self.config.drop_for(drop_dir)
        if drop is not None:
            return drop.limits
        return Limits()

    def tuning_for(self, ds: Any) -> Tuning:
        """A dataset's polling and transfer settings, from its drop folder (as configured now)."""
        drop = self.config.drop_for(ds.drop_dir)
        if drop is None:
            return Tuning()
        return Tuning(poll_min=drop.poll_min, poll_max=drop.poll_max,
                      parallelism=drop.transfer_parallelism)

    def max_running(self, server: str) -> int:
        return self.config.max_running(server)

    def _transfer_gate(self, dataset_id: int, kind: str, done: int, total: int) -> None:
        if self.scheduler is not None:
            self.scheduler.check_transfer(dataset_id)

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        """Take the state folder, resume the journal, watch every drop folder."""
        from agent.runner import Runner

        for d in self.config.drops:
            if not d.path.is_dir():
                raise ConfigError(
                    f"the drop folder {d.path} does not exist (or is not mounted yet); create it "
                    f"or fix 'path' in {self.config.source or 'the command line'}",
                    detail="drops.path",
                )
        if not self.lock.acquire():
            pid = self.lock.held_by_other()
            raise AlreadyRunning(
                f"another vip-agent watch (pid {pid or '?'}) already uses the state folder "
                f"{self.config.state}; stop it first, or give this one another --state"
            )
        self.journal = Journal.in_state_dir(self.config.state)
        self.journal.check_integrity()  # a damaged journal: one line and exit, never a crash later
        log.info("state folder %s", self.config.state)
        runner = Runner(
            self.journal,
            self.client_for,
            stop_event=self.stop_event,
            max_running=self.max_running,
            # a dataset paused meanwhile stops its transfer at the next chunk (agent/pause.py)
            **{"tuning_for": self.tuning_for, "progress": self._transfer_gate, **self.runner_options},
        )
        self.scheduler = Scheduler(
            self.journal,
            runner,
            limits_for=self.limits_for,
            probe=self._probe,
            on_final=self._on_final,
            stop_event=self.stop_event,
            on_lost=self._journal_lost,
            upload_ahead=lambda server: self.config.upload_ahead(server),
            **self.scheduler_options,
        )
        self.bandwidth = install_bandwidth(self.config.drops, self.stop_event)
        configure_transfers(self.config.transfer_limits())  # max_transfers_per_server
        self._check_keys()
        self.scheduler.start()
        self.journal.clear_drop_states()
        for d in self.config.drops:
            self._watch(d)
        self._thread = threading.Thread(target=self._loop, name="vip-agent-watch", daemon=True)
        self._thread.start()
        self.oversight.start()
        self._start_dicom()

    def _start_dicom(self) -> None:
        """Start the DICOM node when ``dicom:`` is configured (its datasets land in drop folders)."""
        from agent.dicom.service import start_node

        assert self.journal is not None
        self.dicom = start_node(self.config, self.journal.path, self._dicom_dataset)

    def _dicom_dataset(self, drop: Path, name: str) -> None:
        self.queue.soon(("check", str(drop), name))

    def _check_keys(self) -> None:
        """Say at start-up whether each server accepts its key (never fatal when refused)."""
        from agent.vip.errors import VipError

        assert self.scheduler is not None
        for server in sorted({d.server for d in self.config.drops}):
            record = self.oversight.checker.record
            try:
                client = self.client_for(server)
                client.check_key()
                record(server, reachable=True, key="accepted")
            except MissingKey as err:
                raise CredentialError(err.message, err.detail) from None
            except AuthError as err:
                record(server, reachable=True, key="refused", message=err.message)
                self.scheduler.pause(server, f"API key refused by {server}: {err.message}")
                log.error(
                    "the API key for %s is refused (%s): datasets are detected but wait until "
                    "the key is fixed; the agent checks it again periodically and on SIGHUP",
                    server, err.message,
                )  # fmt: skip
            except (VipError, OSError) as err:
                record(server, reachable=False, key="unknown", message=str(err))
                log.warning("cannot reach %s yet (%s); datasets will wait and retry", server, err)

    def _probe(self, server: str) -> None:
        if self.provider is not None:
            self.provider.probe(server)
        else:
            self.client_for(server).check_key()

    def _claim(self, d: DropConfig) -> bool:
        """Take (or keep) this agent's claim on a drop folder. False while another live agent
        has it (said once; its datasets are not taken; looked at again every CLAIM_BEAT s)."""
        assert self.journal is not None
        key = str(d.path)
        claim = self.claims.get(key)
        if claim is None:
            claim = DropClaim(d.path, agent_id=self.journal.agent_id(), state=self.config.state)
            self.claims[key] = claim
        try:
            other = claim.renew() if claim.held else claim.take()
        except OSError as err:  # a read-only drop folder: nothing to claim it with
            log.debug("cannot write the claim file in %s: %s", d.path, err)
            return True
        if other is None:
            if self.claimed_by.pop(key, None) is not None:
                log.info("drop folder %s: the agent that claimed it is gone; taking it", d.path)
            return True
        message = (
            f"claimed by another vip-agent: {other.describe()}; this agent takes none of its "
            "datasets while that one runs (stop one of them, or remove the folder from one of "
            "the two configurations)"
        )
        if self.claimed_by.get(key) != f"{other.agent_id}@{other.host}":
            self.claimed_by[key] = f"{other.agent_id}@{other.host}"
            log.warning("drop folder %s: %s", d.path, message)
        self.journal.set_drop_state(key, CLAIMED, message)
        return False

    def _look_at_claim(self, key: str) -> None:
        """The claim's heartbeat: renew it; stop on a folder taken over, start on one freed."""
        drop = self.config.drop_for(key)
        if drop is None or key not in self.claims:
            return
        self.queue.at(("claim", key), time.monotonic() + CLAIM_BEAT)
        if not drop.path.is_dir():
            return  # missing: agent.watch.presence watches for it
        if key in self.drops:
            if not self._claim(drop):
                self._unwatch(key)  # another agent has it now: its datasets are its own
        elif self._claim(drop):
            self._watch(drop)

    def _watch(self, d: DropConfig) -> None:
        assert self.journal is not None and self.scheduler is not None
        scheduler = self.scheduler
        key = str(d.path)
        self.queue.at(("claim", key), time.monotonic() + CLAIM_BEAT)
        if not self._claim(d):
            return
        folder = DropFolder(d, self.journal, on_ready=scheduler.submit)
        self.drops[key] = folder

        def notify(name: str) -> None:
            self.queue.touch(("check", key, name), self.debounce, MAX_DEBOUNCE)

        handler = DropEventHandler(folder.candidates, notify)
        kwargs: dict[str, Any] = {"settled": folder.settled_names}
        if self.native_factory:
            kwargs["native_factory"] = self.native_factory
        observer, kind = start_observer(d, handler, log, **kwargs)
        self.observers[key] = (observer, kind)
        # native events come from this machine's clock: a change may be dated from its files
        folder.change_credit = MAX_DEBOUNCE if kind == "native" else 0.0
        # catch-up scan after the observer started: nothing falls between the two. Done
        # here, before start() returns, so READY means caught up
        names = set(folder.candidates.list()) | set(folder.waiting_names())
        try:
            for name, delay in folder.catch_up(sorted(names)).items():
                if delay is not None:
                    self.queue.at(("check", key, name), time.monotonic() + delay)
        except Exception:  # one broken dataset must not stop the others: look again soon
            log.exception("error during the start-up scan of %s", d.path)
            for name in sorted(names):
                self.queue.soon(("check", key, name))
        self.oversight.rescanned(key)
        if d.rescan_interval > 0:
            self.queue.at(("rescan", key), time.monotonic() + d.rescan_interval)
        if key not in self.presence:
            self.presence[key] = Presence(d.path)
            self.queue.at(("presence", key), time.monotonic() + PRESENCE_INTERVAL)
        self.journal.set_drop_state(key, WATCHING, f"{kind} events")
        log.info(
            "watching %s (%s events, %s, rule %s%s): %d dataset(s) present",
            d.path, kind, "one dataset per " + ("folder" if d.datasets == "folders" else f"file {d.pattern}"),
            d.readiness.rule,
            f" {d.readiness.settle_seconds:g} s" if d.readiness.rule != "marker" else f" {d.readiness.marker}",
            len(names),
        )  # fmt: skip

    def _unwatch_all(self) -> None:
        for observer, _ in self.observers.values():
            with contextlib.suppress(Exception):
                observer.stop()
        for observer, _ in self.observers.values():
            with contextlib.suppress(Exception):
                observer.join(timeout=2)
        self.observers.clear()
        self.drops.clear()
        self.presence.clear()

    def _unwatch(self, key: str) -> None:
        """Stop watching one drop folder (its datasets are not looked at until it is back)."""
        observer, _ = self.observers.pop(key, (None, ""))
        self.drops.pop(key, None)
        if observer is not None:
            with contextlib.suppress(Exception):
                observer.stop()
                observer.join(timeout=2)

    def _look_at_drop(self, key: str) -> None:
        """Notice a drop folder that disappeared, came back or was replaced (logged once)."""
        presence = self.presence.get(key)
        drop = self.config.drop_for(key)
        if presence is None or drop is None:
            return
        change = presence.look()
        if change is not None:
            assert self.journal is not None
            if change.state == MISSING:
                log.error("%s", change.message)
                self._unwatch(key)
            else:
                log.warning("%s", change.message)
                self._unwatch(key)
                self._watch(drop)
            self.journal.set_drop_state(key, change.state, change.message)
        self.queue.at(("presence", key), time.monotonic() + PRESENCE_INTERVAL)

    def stop(self) -> None:
        """Stop taking work and shut down (returns within about ``grace`` seconds)."""
        self.stop_event.set()
        self.queue.wake()
        if self.dicom is not None:
            self.dicom.stop()  # no new object is acknowledged once the service stops
            self.dicom = None
        self.oversight.stop()
        self._unwatch_all()
        for claim in self.claims.values():
            with contextlib.suppress(OSError):
                claim.release()  # another agent may take the folder at once
        if self.journal is not None:
            with contextlib.suppress(Exception):
                self.journal.clear_drop_states()  # nothing watches them any more
        if self.scheduler is not None:
            self.scheduler.stop(self.grace)
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.lock.release()
        if getattr(self, "_said_ready", False):
            log.info("stopped")

    def reload(self, config: AgentConfig | None = None) -> None:
        """Apply a new configuration (SIGHUP): drop folders, rules, limits, keys."""
        if config is None:
            if self.config.source is None:
                log.info("SIGHUP: no configuration file to reload; checking keys again")
                config = self.config
            else:
                try:
                    config = load_config(self.config.source)
                except ConfigError as err:
                    log.error("SIGHUP: keeping the current configuration: %s", err.full())
                    if self.scheduler is not None:
                        self.scheduler.probe_now()
                    return
        if config.state != self.config.state:
            log.warning("the state folder cannot change while running (restart to use %s)", config.state)
            config = replace(config, state=self.config.state)
        self._unwatch_all()
        for key in [k for k in self.claims if config.drop_for(k) is None]:
            with contextlib.suppress(OSError):
                self.claims.pop(key).release()  # no longer this agent's drop folder
        old_dicom, self.config = self.config.dicom, config
        if self.provider is not None:
            self.provider.key_files = self._key_files(config)
            self.provider.forget()
        for d in config.drops:
            if d.path.is_dir():
                self._watch(d)
            else:
                log.error("the drop folder %s does not exist; watching it as soon as it does", d.path)
                key = str(d.path)
                self.presence[key] = Presence(d.path)
                self.queue.at(("presence", key), time.monotonic() + PRESENCE_INTERVAL)
                if self.journal is not None:
                    self.journal.set_drop_state(key, MISSING, f"the drop folder {d.path} does not exist")
        self.bandwidth = install_bandwidth(config.drops, self.stop_event)
        configure_transfers(config.transfer_limits())
        if self.scheduler is not None:
            self.scheduler.probe_now()
        if self.dicom is not None or config.dicom is not None:
            from agent.dicom.service import reload_node

            assert self.journal is not None
            self.dicom, dicom = reload_node(self.dicom, old_dicom, config, self.journal.path, self._dicom_dataset)
            self.config = replace(self.config, dicom=dicom)
        log.info("configuration reloaded: %d drop folder(s)", len(config.drops))

    # -- watch loop ------------------------------------------------------------------
    def alive(self) -> bool:
        """The watch loop made progress recently (systemd watchdog)."""
        return time.monotonic() - self._beat < 60.0

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            self._beat = time.monotonic()
            for item in self.queue.pop_due(timeout=5.0):
                if self.stop_event.is_set():
                    return
                try:
                    self._handle(item)
                except JournalWriteError as err:  # said once by the scheduler; looked at again
                    if self.scheduler is not None:
                        self.scheduler.journal_trouble(err)
                    if isinstance(item, tuple) and item[0] in ("check", "final"):
                        self.queue.at(item, time.monotonic() + 5.0)
                except Exception:  # one broken dataset must not stop the watcher
                    log.exception("error while handling %s", item)

    def _handle(self, item: Hashable) -> None:
        assert isinstance(item, tuple)
        kind = item[0]
        if kind == "check":
            _, key, name = item
            folder = self.drops.get(key)
            if folder is None:
                return
            delay = folder.check(name)
            if delay is not None:
                self.queue.at(("check", key, name), time.monotonic() + delay)
        elif kind == "rescan":
            _, key = item
            folder = self.drops.get(key)
            if folder is None:
                return
            names = set(folder.candidates.list()) | set(folder.histories)
            for name in names:
                if folder.needs_rescan(name):  # finished and unchanged: not looked inside
                    self.queue.at(("check", key, name), time.monotonic())
            self.oversight.rescanned(key)
            self.queue.at(("rescan", key), time.monotonic() + folder.drop.rescan_interval)
        elif kind == "presence":
            self._look_at_drop(item[1])
        elif kind == "claim":
            self._look_at_claim(item[1])
        elif kind == "final":
            _, dataset_id, _stage = item
            self._after(dataset_id)

    def _journal_lost(self, why: str) -> None:
        """The scheduler found the journal deleted or replaced: stop the service (exit 1)."""
        self.stop_event.set()
        self.queue.wake()
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"\0")

    def _on_final(self, dataset_id: int, stage: str) -> None:
        self.queue.soon(("final", dataset_id, stage))

    def _after(self, dataset_id: int) -> None:
        assert self.journal is not None
        ds = self.journal.get(dataset_id)
        drop = self.config.drop_for(ds.drop_dir)
        if ds.stage == "done":
            log.info("%s: done; outputs in %s", ds.name, ds.output_dir)
        elif ds.stage == "incomplete":
            log.warning("%s: incomplete: %s", ds.name, ds.error)
        elif ds.stage == "cancelled":
            log.info("%s: cancelled", ds.name)
        self.oversight.dataset_final(ds, drop)
        if drop is None:
            return
        old = Path(ds.path)
        finish(ds, drop, self.journal)
        folder = self.drops.get(str(drop.path))
        if folder is not None and old.parent == drop.path and old.exists():
            # still in the drop folder: new content under this name is a new run
            self.queue.soon(("check", str(drop.path), old.name))

    # -- status ------------------------------------------------------------------------
    def status_line(self) -> str:
        parts = []
        if self.scheduler is not None:
            counts = self.scheduler.counts()
            waiting = sum(len(f.histories) for f in self.drops.values())
            if waiting:
                counts["waiting"] = waiting
            order = ("running", "queued", "uploading", "downloading", "validating", "cleaning",
                     "waiting", "paused")  # fmt: skip
            parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
            paused = self.scheduler.paused_servers()
            if paused:
                parts.append("API key refused: paused")
        return ", ".join(parts) or "idle"

    def run(self, *, notifier: Any = None) -> int:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), stop. Main thread only."""
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        previous: dict[signal.Signals, Any] = {}
        wanted = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
        old_fd = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self._wake = wsock  # the journal lost under us wakes the main thread too
        for sig in wanted:
            previous[sig] = signal.signal(sig, lambda s, f: None)  # the byte on the socket is the message
        try:
            self.start()
            if notifier is not None:
                notifier.ready(self.status_line())
            log.info("ready")
            self._said_ready = True  # "stopped" is said only after "ready" (never before a start-up error)
            while True:
                ready, _, _ = select.select([rsock], [], [], 5.0)
                signals: set[int] = set()
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        signals.update(rsock.recv(64))
                if signal.SIGTERM in signals or signal.SIGINT in signals:
                    log.info("stopping on %s", "SIGTERM" if signal.SIGTERM in signals else "SIGINT")
                    break
                if self.scheduler is not None and self.scheduler.lost is not None:
                    break  # said once by the scheduler
                if hasattr(signal, "SIGHUP") and signal.SIGHUP in signals:
                    if notifier is not None:
                        notifier.reloading()
                    self.reload()
                    if notifier is not None:
                        notifier.ready(self.status_line())
                line = self.status_line()
                if notifier is not None and line != self._status:
                    notifier.status(line)
                self._status = line
        finally:
            if notifier is not None:
                notifier.stopping()
            self.stop()
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wake = None
            rsock.close()
            wsock.close()
        return 1 if self.scheduler is not None and self.scheduler.lost is not None else 0
