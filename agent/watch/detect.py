"""Detection: which paths of a drop folder are datasets, and when to look at them.

* :class:`DropEventHandler` maps watchdog events to dataset names (never
  blocks: it only pushes a deadline).
* :func:`start_observer` starts a native observer (inotify, FSEvents,
  ReadDirectoryChangesW), or a polling one on network file systems, on request,
  or when the native one cannot start (inotify limits), saying why.
* :func:`list_candidates` is the catch-up scan and the periodic rescan.
* :class:`DeadlineQueue` debounces events and holds re-check times: one thread
  waits on it with a timeout, so an idle agent uses no CPU.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import heapq
import itertools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, EventEmitter

from agent import dataset as ds
from agent.config import DropConfig

# watchdog's inotify backend warns when a folder created inside a watched tree is added
# twice (a fast copy of a dataset with subfolders); re-adding is harmless (see watchdog
# PR #1278). Events it may miss there are caught by readiness scans and the rescan.
warnings.filterwarnings(
    "ignore", message=r"Callback with id .* already exists", category=RuntimeWarning,
    module=r"watchdog\.observers\.inotify",
)

#: events that can change a dataset (opens and read-only closes are left out:
#: the runner reading files during upload must not re-trigger readiness checks)
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
    DirCreatedEvent, DirDeletedEvent, DirModifiedEvent, DirMovedEvent,
]  # fmt: skip

#: file systems on which inotify/FSEvents do not see changes made by other machines
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph", "glusterfs",
     "fuse.glusterfs", "lustre", "gpfs", "beegfs", "fuse.rclone", "davfs", "fuse.s3fs"}
)  # fmt: skip

K = TypeVar("K", bound=Hashable)


class Candidates:
    """Which names of a drop folder are datasets."""

    def __init__(self, drop: DropConfig) -> None:
        self.drop = drop
        self.root = drop.path
        self._own = [p for p in drop.own_folders() if self.root in p.parents]
        #: top-level names holding one of the agent's own folders
        self._own_tops = {p.relative_to(self.root).parts[0] for p in self._own}

    def _own_folder(self, top: Path) -> bool:
        return any(top == p or top in p.parents for p in self._own)

    def key_for(self, path: str | Path, is_directory: bool) -> str | None:
        """The dataset name an event path belongs to, or None."""
        try:
            rel = Path(os.fsdecode(path)).relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if not parts:
            return None
        top = parts[0]
        if self.drop.datasets == "folders":
            if len(parts) == 1 and not is_directory:
                return None  # a top-level file (job.yaml, litter): not a dataset
            return top if self.accept(top) else None
        if len(parts) != 1 or is_directory:
            return None
        marker = "." + self.drop.readiness.marker
        if self.drop.readiness.rule == "marker" and top.endswith(marker):
            top = top[: -len(marker)]
        return top if self.accept(top) else None

    def accept(self, name: str) -> bool:
        """Whether a top-level name can be a dataset (not hidden, partial or the agent's)."""
        if ds.is_ignored(name) or ds.is_partial(name) or name == ds.JOB_FILE:
            return False
        if name.endswith(".ERROR.txt"):  # the error report of a one-file dataset
            return False
        if name in self._own_tops:
            return False
        if self.drop.datasets == "files":
            if not fnmatch.fnmatchcase(name, self.drop.pattern):
                return False
            if self.drop.readiness.rule == "marker" and name.endswith("." + self.drop.readiness.marker):
                return False
        return True

    def list(self) -> list[str]:
        """Every dataset name present now (the catch-up scan and the periodic rescan)."""
        names = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if self.drop.datasets == "folders" and not is_dir:
                continue
            if self.drop.datasets == "files" and (is_dir or not entry.is_file()):
                continue
            if self.accept(entry.name):
                names.append(entry.name)
        return sorted(names)


class DropEventHandler(FileSystemEventHandler):
    """Turns watchdog events into ``notify(name)`` calls (kept apart from the observer)."""

    def __init__(self, candidates: Candidates, notify: Callable[[str], None]) -> None:
        super().__init__()
        self.candidates = candidates
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path]
        if getattr(event, "dest_path", ""):
            paths.append(event.dest_path)
        seen = set()
        for p in paths:
            key = self.candidates.key_for(os.fsdecode(p), event.is_directory)
            if key is not None and key not in seen:
                seen.add(key)
                self.notify(key)


def filesystem_type(path: Path) -> str | None:
    """The mounted file system type of ``path`` on Linux (``/proc/self/mounts``), else None."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, best_type = mount, fields[2]
    return best_type


def _native_observer() -> BaseObserver:
    from watchdog.observers import Observer

    return Observer()


class DatasetPollEmitter(EventEmitter):
    """Polls a drop folder at a cost that does not grow with its finished datasets.

    watchdog's polling emitter stats every file of the tree at every poll: with
    thousands of finished datasets that is most of an idle agent's CPU. This one, each
    poll: one ``stat`` of the drop folder (a listing only when it changed: a dataset
    added or removed), and a look inside the datasets that are not ``settled`` (taken
    with their current content, as the journal knows). Settled datasets are looked at
    again by the periodic rescan, or when their top-level entry is removed or re-added.
    """

    def __init__(
        self,
        event_queue: Any,
        watch: Any,
        *,
        timeout: float = 1.0,
        event_filter: list[type[FileSystemEvent]] | None = None,
        accept: Callable[[str], bool] = lambda name: True,
        settled: Callable[[], set[str]] = set,
        folders: bool = True,
    ) -> None:
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter)
        self._accept = accept
        self._settled_names = settled
        self._folders = folders
        self._top: tuple[int, int] | None = None
        self._names: set[str] = set()
        self._inside: dict[str, object] = {}

    def _signature(self, path: str) -> object:
        if self._folders:
            found = ds.scan(Path(path))
            return (found.fingerprint, found.partial)
        st = os.stat(path, follow_symlinks=False)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _look(self, emit: bool, deep: bool = True) -> None:
        root = os.fsdecode(self.watch.path)
        st = os.stat(root)
        top = (st.st_ino, st.st_mtime_ns)
        if top != self._top:
            self._top = top
            names = {n for n in os.listdir(root) if self._accept(n)}
            event_cls = DirCreatedEvent if self._folders else FileCreatedEvent
            gone_cls = DirDeletedEvent if self._folders else FileDeletedEvent
            settled = self._settled_names() if deep else set()
            for name in sorted(names - self._names):
                path = os.path.join(root, name)
                if deep and name not in settled:
                    # before the event: a change right after it must not be missed
                    with contextlib.suppress(OSError):
                        self._inside[name] = self._signature(path)
                if emit:
                    self.queue_event(event_cls(path))
            for name in sorted(self._names - names):
                self._inside.pop(name, None)
                if emit:
                    self.queue_event(gone_cls(os.path.join(root, name)))
            self._names = names
        if not deep:
            return
        changed_cls = DirModifiedEvent if self._folders else FileModifiedEvent
        # one set difference, not a call per finished dataset: thousands of them cost nothing
        active = self._names - self._settled_names()
        for name in list(self._inside):
            if name not in active:
                del self._inside[name]
        for name in sorted(active):
            path = os.path.join(root, name)
            try:
                sig = self._signature(path)
            except OSError:
                continue  # removed meanwhile: the next listing says so
            before = self._inside.get(name)
            self._inside[name] = sig
            if emit and before is not None and before != sig:
                self.queue_event(changed_cls(path))

    def on_thread_start(self) -> None:
        # the listing only: the agent's catch-up scan looks into every dataset right after
        with contextlib.suppress(OSError):
            self._look(emit=False, deep=False)

    def queue_events(self, timeout: float) -> None:
        if self.stopped_event.wait(timeout):
            return
        try:
            self._look(emit=True)
        except (FileNotFoundError, NotADirectoryError):
            self.queue_event(DirDeletedEvent(self.watch.path))
            self.stop()
        except OSError:
            pass  # a network share briefly unreachable: try again at the next poll


def _polling_observer(
    interval: float, drop: DropConfig, handler: FileSystemEventHandler,
    settled: Callable[[], set[str]],
) -> BaseObserver:
    candidates = getattr(handler, "candidates", None)
    accept = candidates.accept if isinstance(candidates, Candidates) else (lambda name: True)
    emitter = functools.partial(
        DatasetPollEmitter, accept=accept, settled=settled, folders=drop.datasets == "folders"
    )
    return BaseObserver(emitter, timeout=interval)  # type: ignore[arg-type]


def limit_hint(err: OSError) -> str:
    """A plain explanation of why the native observer could not start."""
    if err.errno == errno.ENOSPC:
        return (
            "the system's limit of inotify watches is reached (the kernel reports it as "
            "'no space left on device'; the disk is not full). Raise it with "
            "'sysctl fs.inotify.max_user_watches=524288' (make it permanent in /etc/sysctl.d/)"
        )
    if err.errno == errno.EMFILE:
        return (
            "the system's limit of inotify instances or open files is reached. Raise it with "
            "'sysctl fs.inotify.max_user_instances=1024' or close other watchers"
        )
    return f"the native file watcher could not start ({err.strerror or err})"


def start_observer(
    drop: DropConfig,
    handler: FileSystemEventHandler,
    log: logging.Logger,
    *,
    native_factory: Callable[[], BaseObserver] = _native_observer,
    settled: Callable[[], set[str]] = set,
) -> tuple[BaseObserver, str]:
    """Start watching ``drop.path``; returns the observer and ``"native"`` or ``"polling"``.

    ``auto`` uses polling on network file systems (their events are unreliable)
    and falls back to polling when the native observer cannot start.
    """
    recursive = drop.datasets == "folders"
    kind = drop.observer
    if kind == "auto":
        fs = filesystem_type(drop.path)
        if fs in NETWORK_FS:
            log.info(
                "%s is on a network file system (%s): watching by polling every %g s, "
                "since changes made by other machines raise no events",
                drop.path, fs, drop.poll_interval,
            )  # fmt: skip
            kind = "polling"
    if kind in ("auto", "native"):
        observer = native_factory()
        try:
            observer.schedule(handler, str(drop.path), recursive=recursive, event_filter=EVENT_FILTER)
            observer.start()
            return observer, "native"
        except OSError as err:
            with contextlib.suppress(Exception):
                observer.stop()
            log.warning(
                "cannot watch %s with native events: %s. Falling back to polling every %g s "
                "(new datasets are seen later and each poll costs a listing of the folder)",
                drop.path, limit_hint(err), drop.poll_interval,
            )  # fmt: skip
    observer = _polling_observer(drop.poll_interval, drop, handler, settled)
    observer.schedule(handler, str(drop.path), recursive=recursive, event_filter=EVENT_FILTER)
    observer.start()
    return observer, "polling"


class DeadlineQueue(Generic[K]):
    """Keys with due times; one consumer waits for the earliest one.

    ``touch`` debounces (each call pushes the key back by ``delay``, but never
    past ``max_delay`` after the first call); ``at`` asks for a check no later
    than a given time. Thread-safe; the consumer uses no CPU while waiting.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._due: dict[K, float] = {}
        self._first: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._woken = False

    def _push(self, key: K, when: float) -> None:
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        self._cond.notify()

    def touch(self, key: K, delay: float, max_delay: float | None = None) -> None:
        """Debounce: due ``delay`` after the last touch, at most ``max_delay`` after the first."""
        now = self._clock()
        with self._cond:
            first = self._first.setdefault(key, now)
            when = now + delay
            if max_delay is not None:
                when = min(when, first + max_delay)
            self._push(key, when)

    def at(self, key: K, when: float) -> None:
        """Due at ``when`` (monotonic) unless already due earlier."""
        with self._cond:
            current = self._due.get(key)
            if current is None or when < current:
                self._first.setdefault(key, self._clock())
                self._push(key, when)

    def soon(self, key: K) -> None:
        self.at(key, self._clock())

    def discard(self, key: K) -> None:
        with self._cond:
            self._due.pop(key, None)
            self._first.pop(key, None)

    def pending(self) -> int:
        with self._cond:
            return len(self._due)

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def pop_due(self, timeout: float | None = None) -> list[K]:
        """Wait until keys are due; return them, earliest first ([] on ``timeout`` or :meth:`wake`)."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._woken:
                    self._woken = False
                    return []
                now = self._clock()
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded entry
                if self._heap and self._heap[0][0] <= now:
                    out: list[K] = []
                    while self._heap and self._heap[0][0] <= now:
                        when, _, key = heapq.heappop(self._heap)
                        if self._due.get(key) == when:
                            del self._due[key]
                            self._first.pop(key, None)
                            out.append(key)
                    return out
                wait = None if not self._heap else self._heap[0][0] - now
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return []
                    wait = left if wait is None else min(wait, left)
                if not self._cond.wait(wait):
                    if deadline is not None and self._clock() >= deadline:
                        return []
