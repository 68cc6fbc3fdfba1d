"""Spool retention: the originals of handed-over studies are deleted ``keep`` after their hand-over.

The spool holds identified originals; once every object of a study was handed over as a
dataset (de-identified, in a drop folder), its originals are only a safety copy. A study is
deleted ``keep`` (``dicom.keep``, default 7 days; ``forever`` keeps everything) after its
last hand-over or its last object, whichever is later, and earlier, oldest first, when the
spool's free space falls below twice ``disk_low`` (so that objects are not refused). Never
deleted: a study pending, unrouted or refused, one an open association is carrying, and one
with a series the current routes would not hand over the way it was handed (a series no
route took, a route renamed since): those may be the only copy of what was not sent.

The index keeps the study's row and its objects' rows (state ``purged``): a resend of a
deleted object is still a duplicate, a new object is late (``late:``), and ``dicom status``
counts what was deleted. Order: objects are marked purged in one transaction that checks
that the study is still handed over (a late object makes it pending), then their files are
deleted, then their paths forgotten; a stop in between is finished at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.dicom.config import DicomConfig, Route
from agent.dicom.index import IGNORED, SPOOLED, DicomIndex, ObjectRow, StudyRow
from agent.dicom.routing import group_series, plan
from agent.dicom.spool import Spool, study_key
from agent.fsutil import fsync_dir

log = logging.getLogger("vip_agent.dicom")
#: seconds between two looks (shorter for a ``keep`` under 10 minutes: a tenth of it, at least 1 s)
INTERVAL = 60.0
#: below PRESSURE x disk_low of free space, handed-over studies go before their ``keep`` ends
PRESSURE = 2
#: seconds between two free-space checks (statvfs: cheap) between the regular looks
PRESSURE_INTERVAL = 5.0


@dataclass(frozen=True)
class Purged:
    """One study whose originals were deleted (as logged: the pseudonym, never a patient value)."""

    pseudonym: str
    objects: int
    bytes: int
    #: "kept 7d" (its time was up) or "low disk space"
    why: str


def _words(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def unhanded(routes: tuple[Route, ...], objects: list[ObjectRow], handed: set[tuple[int, str]]) -> str | None:
    """Why these spooled objects are not all handed over (None: they are).

    Each object's series must be taken by a current route that handed a dataset in the
    object's wave; an ignored late object (``late: ignore``) counts as dealt with.
    """
    waves: dict[int, list[ObjectRow]] = {}
    for obj in objects:
        if obj.state == SPOOLED:
            waves.setdefault(obj.wave, []).append(obj)
    for wave, members in sorted(waves.items()):
        taken, unrouted = plan(routes, group_series(members))
        if unrouted:
            return "not routed: " + ", ".join(s.label() for s in unrouted)
        for idx, series in taken.items():
            if (wave, routes[idx].label) not in handed:
                return f"{', '.join(s.label() for s in series)}: not handed over by {routes[idx].label}"
    return None


class Retention:
    """Deletes handed-over studies from the spool; :meth:`run` from the node's loop when :meth:`due`."""

    def __init__(self, index: DicomIndex, spool: Spool, *, carried: Callable[[], set[str]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.index = index
        self.spool = spool
        #: studies an open association is carrying (never deleted under it)
        self.carried = carried or set
        #: wall clock of hand-over times (tests move it forward)
        self.clock = clock
        #: pseudonym -> why a handed-over study past its ``keep`` is kept
        self.kept: dict[str, str] = {}
        self._next = 0.0
        self._pressure_next = 0.0
        self._last_run = 0.0
        self._swept = False
        self._said_low = False

    def soon(self) -> None:
        """Look at the next turn of the loop (a reload changed ``keep`` or ``disk_low``)."""
        self._next = 0.0

    def refused(self) -> None:
        """An object was refused for disk space: look at free space at the loop's next turn
        (at most once a second), not up to ``PRESSURE_INTERVAL`` later."""
        self._pressure_next = min(self._pressure_next, self._last_run + 1.0)

    def due(self, config: DicomConfig, now: float | None = None) -> bool:
        """Time for a look: the interval is over, or free space is low (checked every few seconds)."""
        now = time.monotonic() if now is None else now
        if now >= self._next:
            return True
        if config.keep is None or not config.disk_low or now < self._pressure_next:
            return False
        self._pressure_next = now + PRESSURE_INTERVAL
        return self.spool.free() < PRESSURE * config.disk_low

    def run(self, config: DicomConfig) -> list[Purged]:
        """One look: delete what ``keep`` and free space say; the studies deleted."""
        mono = self._last_run = time.monotonic()
        interval = INTERVAL if config.keep is None else min(INTERVAL, max(1.0, config.keep / 10))
        self._next = mono + interval
        self._pressure_next = mono + PRESSURE_INTERVAL
        if not self._swept:
            self._sweep()
            self._swept = True
        if config.keep is None:
            self.kept.clear()
            return []
        low = PRESSURE * config.disk_low
        now = self.clock()
        carried = self.carried()
        purged: list[Purged] = []
        kept: dict[str, str] = {}
        for study, since in self.index.handed_studies():  # oldest first
            expired = now - since >= config.keep
            pressed = bool(low) and self.spool.free() < low
            if not expired and not pressed:
                break  # the rest are younger
            if study.study_uid in carried:
                continue
            objects = self.index.held(study.study_uid)
            why = unhanded(config.routes, objects, self.index.handed_routes(study.study_uid))
            if why is not None:
                kept[study.pseudonym] = why
                continue
            done = self._purge(study, objects, f"kept {_words(config.keep)}" if expired else "low disk space")
            if done is not None:
                purged.append(done)
        for pseudonym, why in kept.items():
            if pseudonym not in self.kept:  # said once, not at every look
                log.info("DICOM spool: study %s is not deleted although its time is up (%s)", pseudonym, why)
        self.kept = kept
        pressed = bool(low) and self.spool.free() < low
        if pressed and not self._said_low:
            log.warning("DICOM spool: free space in %s is below %s and no handed-over study may be deleted; "
                        "below disk_low objects are refused", self.spool.root, _size(low))  # fmt: skip
        self._said_low = pressed
        return purged

    def _purge(self, study: StudyRow, objects: list[ObjectRow], why: str) -> Purged | None:
        rows = self.index.purge(study.study_uid, {o.sop_uid for o in objects})
        if not rows:
            return None  # a late object arrived meanwhile: pending again, kept
        freed = shared = 0
        folders: set[Path] = set()
        for row in rows:
            if row.path:
                path = Path(row.path)
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    # deidentify: none links the originals into the dataset: no space comes back
                    # while the dataset is there
                    if st.st_nlink > 1:
                        shared += st.st_size
                    else:
                        freed += st.st_size
                    path.unlink()
                folders.add(path.parent)
        self.index.forget_paths([r.sop_uid for r in rows])
        for folder in folders:
            if folder.name == study_key(study.study_uid):
                self._remove_folder(study.study_uid, folder)
        ignored = sum(r.state == IGNORED for r in rows)
        note = f" ({ignored} ignored late)" if ignored else ""
        if shared:
            note += f" ({_size(shared)} still linked from datasets in drop folders)"
        log.info("DICOM spool: study %s deleted (%s): %d object(s)%s, %s freed", study.pseudonym, why,
                 len(rows), note, _size(freed))  # fmt: skip
        return Purged(study.pseudonym, len(rows), freed, why)

    def _remove_folder(self, study_uid: str, folder: Path) -> None:
        """Remove an emptied study folder, never from under an object on its way in.

        The receiver notes a study as carried before it writes the object (spool.write makes
        the folder only when it is missing); so a folder removed while an object of the study
        arrives is made again at once, before that object (fsynced first) is renamed into it.
        """
        if study_uid in self.carried():
            return
        try:
            folder.rmdir()
        except OSError:  # not empty (a late object arrived) or already gone
            return
        if study_uid in self.carried():
            folder.mkdir(exist_ok=True)
            fsync_dir(folder.parent)
            return
        with contextlib.suppress(OSError):
            fsync_dir(folder.parent)

    def _sweep(self) -> None:
        """Finish deletions a stop interrupted (objects marked purged, files still there)."""
        left = self.index.purged_leftovers()
        if not left:
            return
        folders: set[tuple[str, Path]] = set()
        for _sop, study_uid, name in left:
            path = Path(name)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            folders.add((study_uid, path.parent))
        self.index.forget_paths([sop for sop, _, _ in left])
        for study_uid, folder in folders:
            if folder.name == study_key(study_uid):
                self._remove_folder(study_uid, folder)
        log.info("DICOM spool: finished deleting %d object(s) a stop left behind", len(left))
