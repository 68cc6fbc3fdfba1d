"""One drop folder: from "something appeared" to "a complete dataset, recorded once".

:meth:`DropFolder.check` looks at one dataset name, records it in the journal
at stage ``waiting`` while it is incomplete (so ``vip-agent status`` shows it),
and moves that same row to ``validate`` when its readiness rule says it is
complete. Identity is path + fingerprint, looked up in the journal: a restart
never takes a dataset twice; new content under a known name is a new run.
Only the watch loop thread calls it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import DropConfig
from agent.journal import FINAL_STAGES, Dataset, Journal, Stage
from agent.watch.adopt import adopt_mirrored
from agent.watch.detect import Candidates
from agent.watch.readiness import History, file_stem, judge, take_snapshot

log = logging.getLogger("vip_agent.watch")

#: seconds by which file times may lag the clock that dated a run (coarse kernel timestamps)
_TIME_MARGIN = 0.1


class DropFolder:
    """Readiness and identity for the datasets of one drop folder."""

    def __init__(
        self,
        drop: DropConfig,
        journal: Journal,
        *,
        on_ready: Callable[[int], object],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.drop = drop
        self.journal = journal
        self.on_ready = on_ready
        self.clock = clock
        self.candidates = Candidates(drop)
        self.histories: dict[str, History] = {}
        self._warned: set[tuple[int, str | None]] = set()
        #: seconds a change may be dated back from its files' ctime (the event debounce;
        #: 0 when the file system's clock may not be ours)
        self.change_credit = 0.0
        #: names whose content is taken (done, failed or running) and unchanged since, with
        #: the top-level entry's (inode, mtime) then: a polling observer does not look
        #: inside them, and the periodic rescan only compares that top-level stat
        self.settled: dict[str, tuple[int, int]] = {}

    def is_settled(self, name: str) -> bool:
        return name in self.settled

    def settled_names(self) -> set[str]:
        """A copy of the settled names (safe to call from the observer's thread)."""
        return set(self.settled)

    def _settle(self, key: str) -> None:
        try:
            st = self.path_of(key).stat()
        except OSError:
            return
        self.settled[key] = (st.st_ino, st.st_mtime_ns)

    def needs_rescan(self, key: str) -> bool:
        """False for a settled name whose top-level entry is unchanged (the cheap check)."""
        seen = self.settled.get(key)
        if seen is None:
            return True
        try:
            st = self.path_of(key).stat()
        except OSError:
            return True
        return (st.st_ino, st.st_mtime_ns) != seen

    @property
    def root(self) -> Path:
        return self.drop.path

    def path_of(self, name: str) -> Path:
        return self.root / name

    def dataset_name(self, key: str) -> str:
        return file_stem(key) if self.drop.datasets == "files" else key

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "keep_remote": self.drop.keep_remote,
            "max_runs": self.drop.limits.max_runs,
            "max_jobs": self.drop.limits.max_jobs,
            "extract_max_ratio": self.drop.limits.extract_max_ratio,
            "extract_max_member_ratio": self.drop.limits.extract_max_member_ratio,
        }
        if self.drop.unknown_limit:
            opts["unknown_limit"] = self.drop.unknown_limit
        if self.drop.readiness.rule == "marker":
            opts["marker"] = self.drop.readiness.marker  # not an input
        return opts

    def template(self) -> str | None:
        return str(self.drop.template) if self.drop.template.is_file() else None

    def waiting_names(self) -> list[str]:
        """Names this drop folder has at stage ``waiting`` in the journal (start-up)."""
        rows = self.journal.datasets(
            where="stage='waiting' AND drop_dir=?", params=(str(self.root),)
        )
        names = []
        for r in rows:
            p = Path(r.path)
            if p.parent == self.root:
                names.append(p.name)
        return names

    def catch_up(self, names: list[str]) -> dict[str, float | None]:
        """The start-up look at every name present: ``{name: check()'s answer}``.

        A name whose latest run is finished and whose top-level entry has not changed
        since that run was recorded (mtime and ctime not after it) is settled without
        looking inside: one ``stat`` instead of a walk of its files, so a restart with
        thousands of finished datasets is ready in seconds. Anything else gets a full
        :meth:`check`. (A finished dataset is looked into again when its top-level entry
        changes or a file event names it.)
        """
        latest = self.journal.latest_runs(str(self.root))
        out: dict[str, float | None] = {}
        for name in names:
            path = os.path.join(self.root, name)
            stage, fingerprint, updated = latest.get(path, ("", None, 0.0))
            if stage in FINAL_STAGES and fingerprint:
                try:
                    st = os.stat(path)
                except OSError:
                    st = None
                # file times come from a coarse clock (a tick behind): keep a margin
                if st is not None and max(st.st_mtime, st.st_ctime) < updated - _TIME_MARGIN:
                    self.histories.pop(name, None)
                    self.settled[name] = (st.st_ino, st.st_mtime_ns)
                    out[name] = None
                    continue
            out[name] = self.check(name)
        return out

    # -- the check -----------------------------------------------------------------
    def check(self, key: str) -> float | None:
        """Look at dataset ``key`` now; returns seconds until it should be looked at again."""
        path = self.path_of(key)
        now = self.clock()
        self.settled.pop(key, None)
        if not self.root.is_dir():
            return None  # the drop folder itself is gone: its datasets wait (agent.watch.presence)
        snap = take_snapshot(path, self.drop)
        rows = self.journal.find(path=str(path))
        waiting = [r for r in rows if r.stage == "waiting"]
        taken = [r for r in rows if r.stage != "waiting"]
        latest = taken[-1] if taken else None
        row = waiting[-1] if waiting else None

        if not snap.exists:
            self.histories.pop(key, None)
            for r in waiting:
                self.journal.set_stage(
                    r.id, Stage.CANCELLED,
                    message="removed from the drop folder before it was complete",
                    error="removed from the drop folder before it was complete",
                    level="warning",
                )  # fmt: skip
                log.info("%s: removed from %s before it was complete", r.name, self.root)
            return None

        if latest is not None and latest.fingerprint == snap.fingerprint:
            # already taken with exactly this content: never twice
            self.histories.pop(key, None)
            self._settle(key)
            for r in waiting:
                self.journal.set_stage(
                    r.id, Stage.CANCELLED, message=f"same content as run #{latest.id}", level="info"
                )
            return None

        if latest is not None and not latest.final:
            self._warn_changed(latest, snap.fingerprint)
            self._settle(key)
            return None  # re-checked when that run ends (never mixed into it)

        if latest is None and row is None and adopt_mirrored(
            self.journal, path=path, name=self.dataset_name(key), fingerprint=snap.fingerprint,
            output_root=self.drop.output, server=self.drop.server, drop_dir=self.root,
            template=self.template(), options=self.options(),
        ) is not None:  # fmt: skip
            # a journal lost and started afresh: outputs already mirrored are not made twice
            self.histories.pop(key, None)
            self._settle(key)
            return None

        hist = self.histories.get(key)
        if hist is None:
            hist = self.histories[key] = History(first_seen=now)
        hist.observe(snap, now, self.change_credit)

        name = self.dataset_name(key)
        if row is None:
            if latest is not None:
                log.info(
                    "%s: dropped again with new content: a new run (the previous one, #%d, "
                    "ended %s)", name, latest.id, latest.stage,
                )  # fmt: skip
            row_id = self.journal.add_dataset(
                name=name,
                path=str(path),
                server=self.drop.server,
                output_root=str(self.drop.output),
                fingerprint=snap.fingerprint,
                drop_dir=str(self.root),
                template=self.template(),
                options=self.options(),
                stage="waiting",
            )
            if latest is not None:
                self.journal.event(
                    row_id, f"new content under a known name: a new run (previous: #{latest.id})"
                )
        else:
            row_id = row.id
            if row.fingerprint != snap.fingerprint:
                self.journal.update(row_id, fingerprint=snap.fingerprint)

        verdict = judge(self.drop.readiness, snap, hist, now)
        if verdict.ready:
            self.histories.pop(key, None)
            self.journal.update(
                row_id,
                fingerprint=snap.fingerprint,
                template=self.template(),
                options=self.options(),
                error=None,
                error_detail=None,
                progress=None,
            )
            self.journal.set_stage(row_id, Stage.VALIDATE, message=f"complete: {verdict.reason}")
            log.info("%s: complete (%s); taking it", name, verdict.reason)
            self.on_ready(row_id)
            return None

        # a stable wording (no counters), written only when it changes: shown by `status`
        reason = verdict.reason.split(" (")[0]
        if hist.extra.get("reason") != reason:
            hist.extra["reason"] = reason
            self.journal.update(row_id, progress={"kind": "waiting", "reason": reason})
        stale = self.drop.readiness.stale_after
        if stale and not hist.stale_reported and now - hist.first_seen >= stale:
            hist.stale_reported = True
            message = (
                f"not complete after {_human_duration(stale)}: {verdict.reason}. It keeps waiting; "
                "check the instrument transfer, or remove the folder"
            )
            self.journal.update(row_id, error=message)
            self.journal.event(row_id, message, level="warning")
            log.warning("%s: %s", name, message)
        delays = [d for d in (verdict.recheck,) if d is not None]
        if stale and not hist.stale_reported:
            delays.append(max(0.0, hist.first_seen + stale - now))
        return min(delays) if delays else None

    def _warn_changed(self, ds: Dataset, fingerprint: str | None) -> None:
        if (ds.id, fingerprint) in self._warned:
            return
        self._warned.add((ds.id, fingerprint))
        message = (
            f"the dataset changed after it was taken (at stage {ds.stage}); the new content is "
            "not mixed into this run: it will be taken as a new run when this one ends"
        )
        self.journal.event(ds.id, message, level="warning")
        log.warning("%s: %s", ds.name, message)


def _human_duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} day(s)"
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
