"""The DICOM node: receiver + spool + index + completeness + hand-over, one object.

``vip-agent watch`` starts one when ``dicom:`` is configured. Completeness: a study
is complete when no open association carries it **and** it has been quiet for
``quiet`` seconds (the quiet clock restarts when the agent starts: whether an
association was open when it stopped cannot be known); a route may also wait for
required series and for the instance counts the data announces (at most
``max_wait`` longer). Then each route's series are handed over as datasets.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from agent.dicom.config import NETWORK_SETTINGS, DicomConfig, Route, changed_settings
from agent.dicom.handover import HandoverRefused, hand_over
from agent.dicom.index import PENDING, REFUSED, UNROUTED, DicomIndex, StudyRow
from agent.dicom.prepare import Preparer
from agent.dicom.receiver import OUT_OF_RESOURCES, SUCCESS, Counters, Incoming, Receiver
from agent.dicom.retention import Retention
from agent.dicom.routing import Series, group_series, plan, waiting_for
from agent.dicom.spool import Spool, SpoolFull, header
from agent.dicom.status import PORT_FILE, dicom_dir, write_status
from agent.fsutil import write_atomic

log = logging.getLogger("vip_agent.dicom")
#: seconds between two looks when no study is pending and no association open (idle CPU)
IDLE_TICK = 2.0
#: acknowledged objects indexed together, at most this many or this old (seconds)
BATCH, BATCH_AGE = 32, 0.05


@dataclass(frozen=True)
class _Acked:
    """An object acknowledged to its sender, waiting to be indexed (path None: a resend)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    path: Path | None
    size: int
    info: dict[str, Any]
    calling_ae: str


class DicomNode:
    """Receive, spool, decide completeness, hand over; ``start()``/``stop()`` with the service."""

    def __init__(self, config: DicomConfig, state: Path, journal_path: Path, *,
                 markers: Mapping[Path, str | None] | None = None,
                 on_dataset: Callable[[Path, str], None] | None = None, tick: float = 0.2) -> None:  # fmt: skip
        self.config = config
        self.state = Path(state)
        self.folder = dicom_dir(self.state)
        self.spool = Spool(config.spool or self.folder / "spool", config.disk_low)
        self.index = DicomIndex(journal_path)
        self.markers = dict(markers or {})
        self.on_dataset = on_dataset
        self.tick = tick
        self.counters = Counters()
        self.receiver = Receiver(config, self.receive, self.counters, on_release=self.flush_index)
        self.audit = self.folder / "audit.log"
        #: de-identifies objects while their study is still arriving (when a route needs it)
        self.preparer = self._new_preparer()
        self._last: dict[str, float] = {}
        self._why: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        #: a study is pending or an association open: look every ``tick``
        self._busy = True
        #: monotonic time at which the next pending study's quiet time ends (None: none waits)
        self._due: float | None = None
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._written: dict[str, Any] = {}
        #: SOPInstanceUIDs being written or indexed (first copy wins across associations)
        self._inflight: set[str] = set()
        #: spooled and acknowledged, not indexed yet (path -> study): retried by the loop
        self._unindexed: dict[str, str] = {}
        #: objects acknowledged and waiting to be indexed together (one journal commit for many)
        self._batch: list[_Acked] = []
        self._batch_since = 0.0
        self._flushing = threading.Lock()

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> int:
        self._started = time.monotonic()
        removed = self.spool.clean_tmp()
        if removed:
            log.info("DICOM spool: removed %d object(s) a stop left half-written (never acknowledged)", removed)
        self._reindex()
        for kept in self.index.studies(UNROUTED, REFUSED):
            # the configuration may have been fixed since (a route added, a drop folder mounted):
            # look again; a leak is refused again, the scan does not change its mind
            self.index.set_state(kept.study_uid, PENDING, kept.message)
        if self.preparer is not None:
            self.preparer.start()
        #: deletes handed-over studies from the spool (``keep:``); first look in the loop's first turn
        self.retention = Retention(self.index, self.spool, carried=self.receiver.open_studies)
        try:
            port = self.receiver.start()
        except BaseException:  # e.g. the port is taken: nothing half-started stays behind
            self.stop()
            raise
        write_atomic(self.state / PORT_FILE, f"{port}\n")
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._loop, name="vip-agent-dicom", daemon=True)
        self._thread.start()
        self._publish()
        return port

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.receiver.stop()
        self.flush_index()  # what was acknowledged is indexed before the journal closes
        if self.preparer is not None:  # first: a hand-over waiting for the workers ends at once
            self.preparer.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.preparer is not None:  # one the loop started (a reload) while this stopped it
            self.preparer.stop()
        self._publish(listening=False)
        self.spool.close()
        self.index.close()

    def reconfigure(self, config: DicomConfig, markers: Mapping[Path, str | None] | None = None) -> list[str] | None:
        """Apply a reloaded ``dicom:`` block without dropping an association: the settings that
        changed, or None when the listening side changed (the caller stops and starts the node)."""
        changed = changed_settings(self.config, config)
        network = dict.fromkeys("listen" if n in ("host", "port") else n for n in changed if n in NETWORK_SETTINGS)
        if network:
            log.info("DICOM node: %s changed: restarting (open associations end)", ", ".join(network))
            return None
        if markers is not None:
            self.markers = dict(markers)
        self.spool.disk_low = config.disk_low
        self.receiver.config = config  # its allow-list is read at each new association
        self.config = config
        if "routes" in changed:  # as at start: a route added may take what no route took
            for kept in self.index.studies(UNROUTED, REFUSED):
                self.index.set_state(kept.study_uid, PENDING, kept.message)
        if "keep" in changed or "disk_low" in changed:
            self.retention.soon()
        self._wake.set()  # a shorter quiet time may complete a study now
        if changed:
            log.info("DICOM node: applied the reloaded %s (associations kept open)", ", ".join(changed))
        return changed

    def _new_preparer(self) -> Preparer | None:
        """Workers for the current routes: None unless one of them says ``deidentify: basic``."""
        if not self._deidentifies():
            return None
        return Preparer(self.spool.root / "prepared", self.index)

    def _deidentifies(self) -> bool:
        return any(r.deidentify == "basic" for r in self.config.routes)

    def _match_preparer(self) -> None:
        """Start or stop the de-identification workers when a reload added the first or removed
        the last ``deidentify: basic`` route. Only the loop thread calls this, between hand-overs,
        so a hand-over never sees them change under it."""
        if self.preparer is None and not self._stop.is_set():
            preparer = self._new_preparer()
            if preparer is not None:
                preparer.start()
                self.preparer = preparer
                log.info("DICOM node: a route now de-identifies: de-identification workers started")
        elif self.preparer is not None and not self._deidentifies():
            old, self.preparer = self.preparer, None
            old.stop()
            log.info("DICOM node: no route de-identifies any more: de-identification workers stopped")

    def _reindex(self) -> None:
        """Index spooled files a crash left unindexed (written and fsynced, not yet indexed)."""
        known = self.index.paths()
        for path in self.spool.files():
            if str(path) not in known and self._index_file(path):
                log.info("DICOM spool: indexed %s left unindexed by the last stop", path.name)

    def _index_file(self, path: Path) -> bool:
        """Index one spooled file from its own header; False (said in the log) if it cannot be."""
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            info = header(ds)
            self.index.add(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                           str(path), path.stat().st_size, info, self.config.late, path.stat().st_mtime)  # fmt: skip
            return True
        except Exception as err:  # an unreadable leftover stays, named in the log
            log.warning("DICOM spool: cannot index %s: %s", path, err)
            return False

    # -- receiving (called in each association's thread) -------------------------------
    def receive(self, inc: Incoming) -> tuple[int, Callable[[], None] | None]:
        """Spool one object durably and answer; its indexing waits until the answer is sent.

        Only what "success" promises sits on the sender's clock: the object on disk (fsynced,
        renamed, its folder fsynced). Its header is decoded once the answer is sent, in the same
        thread, while the sender sends its next object, and indexed with others in one
        transaction (:meth:`flush_index`: every ``BATCH`` objects or ``BATCH_AGE`` seconds, when
        an association is released, and before every completeness check; until then the
        study counts as still arriving). A crash in between leaves a spooled, unindexed file
        that :meth:`_reindex` indexes at the next start.
        """
        with self._lock:
            self._last[inc.study_uid] = time.monotonic()
            # the first copy wins, also against a resend arriving before the first is indexed
            duplicate = inc.sop_uid in self._inflight
            if not duplicate:
                self._inflight.add(inc.sop_uid)
        if not self._busy:  # the loop may be in its long idle wait: look every tick again
            self._busy = True
            self._wake.set()
        if duplicate:
            return SUCCESS, lambda: self._acked(inc, None)
        try:
            if self.index.known(inc.sop_uid):
                self._settled([inc.sop_uid])
                return SUCCESS, lambda: self._acked(inc, None)
            path = self.spool.write(inc.study_uid, inc.sop_uid, inc.data)
        except BaseException as err:
            self._settled([inc.sop_uid])
            if not isinstance(err, SpoolFull):
                raise
            self.counters.add(refusals=1)
            log.warning("object from %s refused: free space below the watermark (%d bytes) in %s; "
                        "the sender keeps it", inc.calling_ae, self.config.disk_low, self.spool.root)  # fmt: skip
            self.retention.refused()  # handed-over studies may make room: look now
            self._wake.set()
            return OUT_OF_RESOURCES, None
        return SUCCESS, lambda: self._acked(inc, path)

    def _settled(self, sop_uids: list[str]) -> None:
        with self._lock:
            self._inflight.difference_update(sop_uids)

    def _acked(self, inc: Incoming, path: Path | None) -> None:
        """After the answer: decode the header, queue the object for indexing (None: a resend)."""
        try:
            info = inc.header()
        except Exception:  # the UIDs were readable, the rest is not: indexed without it
            info = {}
        info.update(CallingAE=inc.calling_ae, CalledAE=inc.called_ae, Peer=inc.peer)
        now = time.monotonic()
        with self._lock:
            if not self._batch:
                self._batch_since = now
            self._batch.append(_Acked(inc.sop_uid, inc.study_uid, inc.series_uid, path, len(inc.data), info,
                                      inc.calling_ae))  # fmt: skip
            due = len(self._batch) >= BATCH or now - self._batch_since >= BATCH_AGE
        if due:  # another association's thread flushing now: its next look, or the release, takes these
            self.flush_index(wait=False)

    def flush_index(self, wait: bool = True) -> None:
        """Index the acknowledged objects waiting in the batch (in their order, one transaction);
        ``wait=False``: not if another thread is flushing."""
        if not self._flushing.acquire(blocking=wait):
            return
        try:
            self._flush()
        finally:
            self._flushing.release()

    def _flush(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            stored = self.index.add_many([(a.sop_uid, a.study_uid, a.series_uid, str(a.path or ""),
                                           a.size if a.path else 0, a.info) for a in batch],
                                         self.config.late)  # fmt: skip
        except Exception as err:
            # acknowledged and on disk: their studies wait until they are indexed (retried by the loop)
            with self._lock:
                self._unindexed.update({str(a.path): a.study_uid for a in batch if a.path is not None})
            log.warning("%d object(s) spooled but not indexed yet (%s); retrying", len(batch), err)
            return
        finally:  # (a resend's first copy may still be on its way: it settles its own)
            self._settled([a.sop_uid for a in batch if a.path is not None])
        for acked, result in zip(batch, stored, strict=True):
            if acked.path is None or result.duplicate:
                self.counters.add(duplicates=1)
                log.info("duplicate object %s from %s: the first copy is kept", acked.sop_uid, acked.calling_ae)
                continue
            self.counters.add(objects=1, bytes=acked.size, late=1 if result.late else 0)
            preparer = self.preparer  # read once: a reload may stop it (the loop thread)
            if preparer is not None and not result.ignored:
                preparer.submit(acked.study_uid, acked.sop_uid, str(acked.path))
            if result.late:
                what = "ignored (late: ignore)" if result.ignored else f"kept for a late hand-over (late: {self.config.late})"
                log.warning("late object for a study already handed over: %s", what)

    def _index_again(self) -> None:
        """Index the objects whose indexing failed after their answer (a busy or full journal)."""
        with self._lock:
            paths = list(self._unindexed)
        for path in paths:
            if self._index_file(Path(path)):
                with self._lock:
                    self._unindexed.pop(path, None)

    # -- completeness and hand-over ---------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = self.tick if self._busy else IDLE_TICK
            if self._due is not None:  # look right when a study's quiet time ends, not up to a tick later
                wait = max(0.0, min(wait, self._due - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._match_preparer()
                self.check()
                self._publish()
            except Exception:  # one broken study must not stop the node
                log.exception("DICOM node: error while checking studies")
            try:
                if self.retention.due(self.config):
                    self.retention.run(self.config)
            except Exception:  # nor a spool that cannot be cleaned
                log.exception("DICOM node: error while deleting handed-over studies from the spool")

    def check(self, now: float | None = None) -> list[str]:
        """One look at every pending study; the datasets handed over."""
        now = time.monotonic() if now is None else now
        handed: list[str] = []
        if self._unindexed:
            self._index_again()
        self.flush_index()  # what was acknowledged so far is looked at, not a part of it
        carried = self.receiver.open_studies()
        with self._lock:
            carried |= set(self._unindexed.values()) | {a.study_uid for a in self._batch}
        pending = self.index.studies(PENDING)
        self._busy = bool(pending) or self.receiver.open_associations() > 0
        self._due = None
        for study in pending:
            if study.study_uid in carried:
                self._why[study.pseudonym] = "receiving (an association carrying it is open)"
                continue
            with self._lock:
                last = self._last.get(study.study_uid, self._started)
            quiet_for = now - last
            if quiet_for < self.config.quiet:
                self._why[study.pseudonym] = f"waiting for {self.config.quiet:g} s without a new object"
                due = last + self.config.quiet
                self._due = due if self._due is None else min(self._due, due)
                continue
            handed += self._complete(study, quiet_for - self.config.quiet)
        return handed

    def _objects(self, study: StudyRow) -> list[Any]:
        if study.wave and self.config.late == "new":
            return self.index.objects(study.study_uid, study.wave)
        return self.index.objects(study.study_uid)

    def _complete(self, study: StudyRow, waited: float) -> list[str]:
        objects = self._objects(study)
        series = group_series(objects)
        routes = self.config.routes
        taken, unrouted = plan(routes, series)
        if not taken:
            message = "no route takes " + ", ".join(s.label() for s in unrouted) if unrouted else "no object"
            self.index.set_state(study.study_uid, UNROUTED, message)
            log.warning("study %s: %s; kept in the spool", study.pseudonym, message)
            return []
        for idx, mine in taken.items():
            why = waiting_for(routes[idx], series, mine)
            if why is not None and waited < self.config.max_wait:
                self._why[study.pseudonym] = f"{routes[idx].label}: {why}"
                return []
        names: list[str] = []
        if self.preparer is not None:
            # what the worker still has of this study is faster from it than redone here
            self.preparer.settle({o.sop_uid for o in objects})
            self.preparer.hold(study.study_uid)
        try:
            for idx, mine in taken.items():
                names += self._hand(study, routes[idx], mine)
        except HandoverRefused as err:
            self.index.set_state(study.study_uid, REFUSED, err.message)
            log.error("study %s: %s", study.pseudonym, err.full())
            return names
        except Exception as err:  # unforeseen: refused (kept in the spool), said once, not every tick
            self.index.set_state(study.study_uid, REFUSED, f"hand-over failed: {err}")
            log.exception("study %s: hand-over failed; kept in the spool", study.pseudonym)
            return names
        finally:
            if self.preparer is not None:
                self.preparer.release(study.study_uid)
        note = f"{len(names)} dataset(s): {', '.join(names)}"
        if unrouted:
            note += "; not routed (kept in the spool): " + ", ".join(s.label() for s in unrouted)
        arrived = self.index.finish(study.study_uid, {o.sop_uid for o in objects}, self.config.late, note)
        if self.preparer is not None:
            self.preparer.forget(study.study_uid, {o.sop_uid for o in objects})
        if arrived:
            self.counters.add(late=arrived)
            log.warning("study %s: %d object(s) arrived during its hand-over: late (late: %s)",
                        study.pseudonym, arrived, self.config.late)  # fmt: skip
        self._why.pop(study.pseudonym, None)
        return names

    def _hand(self, study: StudyRow, route: Route, series: list[Series]) -> list[str]:
        groups = [series] if route.per == "study" else [[s] for s in series]
        names = []
        for group in groups:
            try:
                done = hand_over(study, route, group, study.wave, marker=self.markers.get(route.drop),
                                 audit=self.audit,
                                 prepared=self.preparer.get if self.preparer is not None else None)  # fmt: skip
            except HandoverRefused as err:
                self.index.handed(study.study_uid, study.wave, route.label, "", str(route.drop),
                                  sum(s.count for s in group), "refused", err.message)  # fmt: skip
                raise
            self.index.handed(study.study_uid, study.wave, route.label, done.name, str(route.drop),
                              done.objects, "handed")  # fmt: skip
            names.append(done.name)
            if self.on_dataset is not None:
                self.on_dataset(route.drop, done.name)
        return names

    # -- status ------------------------------------------------------------------------
    def waiting_reason(self, pseudonym: str) -> str | None:
        return self._why.get(pseudonym)

    def snapshot(self, listening: bool = True) -> dict[str, Any]:
        studies = self.index.counts()
        return {
            "ae_title": self.config.ae_title,
            "host": self.config.host,
            "port": self.receiver.port,
            "listening": listening,
            "pid": os.getpid(),
            "open_associations": self.receiver.open_associations(),
            "counters": self.counters.snapshot(),
            "studies": studies,
            "pending": studies.get(PENDING, 0) + studies.get(UNROUTED, 0) + studies.get(REFUSED, 0),
            "spool": str(self.spool.root),
            "spool_free": self.spool.free(),
            "disk_low": self.config.disk_low,
            "quiet": self.config.quiet,
            #: why each pending study (by pseudonym) is not handed over yet
            "waiting": dict(self._why),
            #: the de-identification workers (None: no route de-identifies)
            "deidentify": self.preparer.stats() if self.preparer is not None else None,
        }

    def _publish(self, listening: bool = True) -> None:
        data = self.snapshot(listening)
        comparable = {k: v for k, v in data.items() if k != "spool_free"}
        if comparable != self._written:
            self._written = comparable
            write_status(self.state, {**data, "updated": time.time()})
