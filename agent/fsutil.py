"""Small file-system helpers for durable writes."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

from agent.procs import pid_alive


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``f2`` before ``f10`` (numbers by value, the rest case-insensitively)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.casefold())
        for part in re.split(r"(\d+)", text) if part
    )  # fmt: skip


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every platform lets a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: readers see the old or the new file.

    A write that fails (a full disk) removes its temporary file before raising, and the
    next write beside ``path`` sweeps any temporary file of ours a dead or failed writer
    left there: nothing hidden stays in the user's output folder.
    """
    # one temporary file per writer: two threads rewriting the same file (a transfer's
    # progress and the end of its step both rewrite STATUS.json) never share one
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _SWEPT.discard(path.parent)  # sweep again at the next write, once the disk has room
        raise
    if path.parent not in _SWEPT:
        _SWEPT.add(path.parent)
        _sweep_leftovers(path.parent)


#: folders this process already swept (one listing per folder, not one per write)
_SWEPT: set[Path] = set()
#: ``.NAME.<pid>-<thread id>.tmp``: write_atomic's temporary files, and only those
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<tid>\d+)\.tmp$")


def _sweep_leftovers(folder: Path) -> None:
    """Remove :func:`write_atomic` temporaries in ``folder`` that no live write owns: a
    process that died mid-write, or a write of this process that could not clean up."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    live = {f"{os.getpid()}-{t.ident}" for t in threading.enumerate()}
    for name in names:
        m = _TMP_NAME.match(name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid():
            if f"{pid}-{m.group('tid')}" in live:
                continue  # a thread of ours may be writing it right now
        elif pid_alive(pid):
            continue  # a live writer
        with contextlib.suppress(OSError):
            os.unlink(folder / name)


class StreamingSync:
    """Flush a file being written to disk in the background, so the final fsync is small.

    A download that fsyncs only at the end waits for every dirty page at once (most of
    its time on a large file). Here, every ``every`` bytes written, a helper thread
    flushes what is already written (``fdatasync``) while the writer goes on; the
    writer never waits for it, and at most one flush runs at a time. :meth:`finish`
    then syncs only the tail. Call :meth:`wrote` after each write.
    """

    def __init__(self, fd: int, every: int = 32 << 20) -> None:
        self.fd = fd
        self.every = every
        self._since = 0
        self._wanted = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: OSError | None = None

    def wrote(self, n: int) -> None:
        self._since += n
        if self._since < self.every:
            return
        self._since = 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vip-agent fsync", daemon=True)
            self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            try:
                sync(self.fd)
            except OSError as err:  # reported by finish(): the final fsync decides
                self.error = err

    def stop(self) -> None:
        """Stop the helper thread (waits for a flush in progress); no final sync."""
        self._stop = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> None:
        """Stop the helper and make the whole file durable (``fsync``)."""
        self.stop()
        os.fsync(self.fd)
