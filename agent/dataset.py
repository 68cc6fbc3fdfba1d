"""What a dataset is on disk: its files, the names that do not count, its fingerprint.

Shared by the watcher (readiness, identity) and the runner (what to upload), so
both agree on which files belong to a dataset.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ValidationError

#: the job file is configuration, never an input
JOB_FILE = "job.yaml"

#: names that never count as dataset files and hold a dataset back while present
#: (editors' lock files, partial downloads and copies, OS litter)
PARTIAL_PATTERNS: tuple[str, ...] = (
    "*.part",
    "*.partial",
    "*.tmp",
    "*.temp",
    "*.crdownload",
    "*.download",
    "~$*",
    ".~lock*",
    "*.swp",
    ".syncthing.*",
    "~syncthing~*",
)

#: names ignored silently (they neither count nor hold the dataset back)
IGNORED_NAMES: frozenset[str] = frozenset(
    {".DS_Store", "Thumbs.db", "desktop.ini", "STATUS.json", "ERROR.txt", ".vip-agent"}
)


#: the patterns above as one regular expression (a start-up scan tests thousands of names)
_PARTIAL = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in PARTIAL_PATTERNS))


def is_partial(name: str) -> bool:
    """A name that says a file is still being written (holds the dataset back)."""
    return _PARTIAL.match(name) is not None


def is_ignored(name: str) -> bool:
    """A name that is not part of a dataset: dot-files, OS litter, the agent's own files."""
    return name in IGNORED_NAMES or name.startswith(".")


@dataclass(frozen=True)
class FileEntry:
    """One file of a dataset, as seen by ``stat``."""

    rel: str  # POSIX path relative to the dataset root
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class DatasetScan:
    """A snapshot of a dataset's files."""

    root: Path
    files: tuple[FileEntry, ...]
    partial: tuple[str, ...]  # relative names of partial files that hold it back
    #: newest status change (ctime, ns) of the files and folders seen: when the content
    #: last changed, by the system clock (a copy that keeps old mtimes still sets ctime)
    newest_change_ns: int = 0
    #: (relative name, why) of entries that could not be read: never skipped in silence
    unreadable: tuple[tuple[str, str], ...] = ()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files, self.unreadable)

    def problems(self) -> list[str]:
        """One sentence per unreadable entry (empty when every file could be read)."""
        return [f"cannot read {rel} in {self.root}: {why}" for rel, why in self.unreadable]

    def raise_if_unreadable(self) -> None:
        """Raise :class:`ValidationError` naming every entry that could not be read."""
        if self.unreadable:
            raise ValidationError(self.problems())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def why_unreadable(err: OSError) -> str:
    """An OS error while reading a dataset, in words a lab user can act on."""
    if err.errno == errno.ELOOP:
        return "a loop of symbolic links (a link that leads back to itself); remove the link"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: the agent's user may not read it; fix its permissions"
    if err.errno == errno.ENAMETOOLONG:
        return "the name is too long for the file system"
    return f"{err.strerror or err} (error {err.errno})"


def _walk(
    root: Path, changes: list[int] | None = None
) -> Iterator[tuple[str, os.stat_result | str]]:
    """(relative name, stat) of every file under ``root``; (name, why) for what cannot be read.

    Files that vanish while the walk runs are left out; links to folders are not followed.
    ``changes`` collects the folders' ctimes.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
            if changes is not None:
                changes.append(os.stat(folder).st_ctime_ns)  # an entry added or removed
        except (FileNotFoundError, NotADirectoryError):
            continue  # vanished (or replaced by a file) while we looked
        except OSError as err:
            if folder == root:
                raise
            yield folder.relative_to(root).as_posix(), why_unreadable(err)
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not is_ignored(entry.name):
                        stack.append(path)
                    continue
                st = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                continue  # vanished, or a dangling link: validation reports links
            except OSError as err:
                yield rel, why_unreadable(err)
                continue
            if stat.S_ISDIR(st.st_mode):
                yield rel, "a link to a folder: links to folders are not followed; copy the files in"
                continue
            yield rel, st


def scan(
    root: Path, *, only: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> DatasetScan:
    """List the files of a dataset folder (or only the names in ``only``).

    ``job.yaml``, ignored names, the relative names in ``exclude`` (e.g. a
    readiness marker) and partial names are left out of ``files``; partial
    names are reported in ``partial``.
    """
    files: list[FileEntry] = []
    partial: list[str] = []
    unreadable: list[tuple[str, str]] = []
    wanted = set(only) if only is not None else None
    skip = set(exclude)
    changes: list[int] = []
    walked = _walk(root, changes)
    try:
        first = next(walked, None)
    except OSError as err:  # the dataset folder itself
        return DatasetScan(root, (), (), 0, ((".", why_unreadable(err)),))
    for rel, st in _chain(first, walked):
        if wanted is not None and rel not in wanted and not (
            isinstance(st, str) and any(w.startswith(rel + "/") for w in wanted)
        ):
            continue
        if rel in skip:
            continue
        name = rel.rsplit("/", 1)[-1]
        if rel == JOB_FILE:
            continue
        if is_partial(name):
            partial.append(rel)
            continue
        if any(is_ignored(part) for part in rel.split("/")):
            continue
        if isinstance(st, str):
            unreadable.append((rel, st))
            continue
        files.append(FileEntry(rel, st.st_size, st.st_mtime_ns))
        changes.append(st.st_ctime_ns)
    files.sort(key=lambda f: f.rel)
    return DatasetScan(
        root, tuple(files), tuple(sorted(partial)), max(changes, default=0),
        tuple(sorted(unreadable)),
    )  # fmt: skip


def _chain(first: tuple[str, os.stat_result | str] | None,
           rest: Iterable[tuple[str, os.stat_result | str]]) -> Iterable[tuple[str, os.stat_result | str]]:  # fmt: skip
    if first is not None:
        yield first
        yield from rest


def fingerprint(files: Iterable[FileEntry], unreadable: Iterable[tuple[str, str]] = ()) -> str:
    """A cheap identity of a dataset's content: names, sizes and modification times.

    A stat per file, no reading: re-dropping the same name with new content gives
    a new fingerprint, a restart of the agent gives the same one.
    """
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.rel):
        h.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\n".encode())
    for rel, _why in sorted(unreadable):
        h.update(f"{rel}\0unreadable\n".encode())
    return h.hexdigest()[:16]
