"""Readiness rules: when a dataset in a drop folder is complete.

A rule judges a :class:`Snapshot` (what the dataset looks like now, from
``agent.dataset``) together with its :class:`History` (when the content last
changed, as observed by the agent). Rules:

``settle``
    no file added, removed, resized or touched for ``settle_seconds`` (the
    fingerprint stayed the same while the agent watched), no partial file.
``marker``
    a marker file (``READY``) exists and no partial file is left. The marker is
    not an input. For one-file datasets the marker is ``<file>.<marker>``.
``manifest``
    every ``expect:`` glob of the dataset's job file matches a file, and the
    content has been quiet for ``settle_seconds``.

Partial names (``*.part``, ``*.tmp``...) always hold a dataset back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import dataset as ds
from agent.config import DropConfig, Readiness
from agent.errors import AgentError


@dataclass(frozen=True)
class Snapshot:
    """A dataset as seen now."""

    exists: bool
    fingerprint: str | None = None
    files: int = 0
    size: int = 0
    partial: tuple[str, ...] = ()
    has_marker: bool = False
    missing: tuple[str, ...] = ()  # manifest globs that match no file
    manifest_problem: str | None = None  # the job file could not be read
    changed_at: float | None = None  # newest ctime seen (system clock, seconds)


@dataclass
class History:
    """What the agent observed of one dataset over time (monotonic seconds)."""

    first_seen: float
    fingerprint: str | None = None
    since: float = 0.0  # when the fingerprint last changed
    stale_reported: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    def observe(self, snap: Snapshot, now: float, credit: float = 0.0) -> None:
        """Note what the dataset looks like at ``now`` (monotonic).

        ``credit``: how late the agent may be looking (its event debounce). A change is
        dated when the files say it happened (their newest ctime), up to ``credit``
        seconds before ``now``, so the debounce runs within the settle time instead of
        adding to it. Without credit (e.g. a network file system, whose clock may differ)
        a change is dated when the agent saw it.
        """
        if snap.fingerprint != self.fingerprint:
            self.fingerprint = snap.fingerprint
            self.since = now
            if credit > 0 and snap.changed_at is not None:
                ago = time.time() - snap.changed_at
                if ago > 0:
                    self.since = now - min(ago, credit)


@dataclass(frozen=True)
class Verdict:
    ready: bool
    reason: str  # for a lab user: why it is (not) ready
    recheck: float | None = None  # seconds after which the verdict may change without an event


def marker_path(path: Path, drop: DropConfig) -> Path:
    """Where the marker of this dataset is expected."""
    if drop.datasets == "files":
        return path.with_name(f"{path.name}.{drop.readiness.marker}")
    return path / drop.readiness.marker


def _missing_expected(path: Path, drop: DropConfig) -> tuple[str, ...] | str:
    """The job file's ``expect:`` patterns that match no file yet, or why it cannot be read."""
    from agent.jobfile import load_job

    template = drop.template if drop.template.is_file() else None
    try:
        spec = load_job(path, template)
        return tuple(spec.missing_expected())
    except AgentError as err:
        return err.message
    except (OSError, ValueError) as err:
        return str(err)


def take_snapshot(path: Path, drop: DropConfig) -> Snapshot:
    """Look at a dataset (a folder, or one file for ``datasets: files``)."""
    marker = marker_path(path, drop) if drop.readiness.rule == "marker" else None
    if drop.datasets == "files":
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return Snapshot(exists=False)
        except OSError as err:
            # a loop or a file we may not read: it settles, then validation says why
            why = ((path.name, ds.why_unreadable(err)),)
            return Snapshot(exists=True, fingerprint=ds.fingerprint([], why), files=1)
        if not path.is_file():
            return Snapshot(exists=False)
        entry = ds.FileEntry(path.name, st.st_size, st.st_mtime_ns)
        return Snapshot(
            exists=True,
            fingerprint=ds.fingerprint([entry]),
            files=1,
            size=st.st_size,
            has_marker=bool(marker and marker.is_file()),
            changed_at=st.st_ctime,
        )
    if not path.is_dir():
        return Snapshot(exists=False)
    scan = ds.scan(path)
    names = {f.rel for f in scan.files}
    has_marker = drop.readiness.rule == "marker" and drop.readiness.marker in names
    inputs = [f for f in scan.files if not (has_marker and f.rel == drop.readiness.marker)]
    missing: tuple[str, ...] = ()
    problem = None
    if drop.readiness.rule == "manifest":
        found = _missing_expected(path, drop)
        if isinstance(found, str):
            problem = found
        else:
            missing = found
    return Snapshot(
        exists=True,
        # the full scan's fingerprint: the runner computes the same one
        fingerprint=scan.fingerprint,
        files=len(inputs),
        size=sum(f.size for f in inputs),
        partial=scan.partial,
        has_marker=has_marker,
        missing=missing,
        manifest_problem=problem,
        changed_at=scan.newest_change_ns / 1e9 if scan.newest_change_ns else None,
    )


def judge(rule: Readiness, snap: Snapshot, hist: History, now: float) -> Verdict:
    """Is the dataset complete? ``hist`` must already have observed ``snap``."""
    settle = rule.settle_seconds
    if not snap.exists:
        return Verdict(False, "the dataset is gone")
    if snap.partial:
        shown = ", ".join(snap.partial[:3]) + (" ..." if len(snap.partial) > 3 else "")
        return Verdict(False, f"partial files still being written: {shown}", max(settle, 1.0))
    if rule.rule == "marker":
        if not snap.has_marker:
            return Verdict(False, f"waiting for the marker file {rule.marker}", None)
        if snap.files == 0:
            return Verdict(False, f"the marker {rule.marker} is there but no data file", None)
        return Verdict(True, f"marker {rule.marker} present")
    if snap.files == 0:
        return Verdict(False, "the dataset is empty", max(settle, 1.0))
    if rule.rule == "manifest" and snap.missing and not snap.manifest_problem:
        shown = ", ".join(snap.missing[:3]) + (" ..." if len(snap.missing) > 3 else "")
        return Verdict(False, f"expected files missing: {shown}", max(settle, 1.0))
    quiet = now - hist.since
    if quiet + 1e-6 < settle:
        return Verdict(False, f"still changing (quiet for {quiet:.0f} s of {settle:g} s)", settle - quiet)
    if rule.rule == "manifest":
        if snap.manifest_problem:
            # let validation report the broken job file rather than wait forever
            return Verdict(True, f"quiet for {settle:g} s (job file unreadable: {snap.manifest_problem})")
        return Verdict(True, f"all expected files present and quiet for {settle:g} s")
    return Verdict(True, f"quiet for {settle:g} s")


def file_stem(name: str) -> str:
    """The dataset name of a one-file dataset: the name without its extension(s)."""
    lower = name.lower()
    for ext in (".nii.gz", ".tar.gz", ".tar.bz2", ".tar.xz", ".mnc.gz", ".fits.gz"):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    stem, _ = os.path.splitext(name)
    return stem or name


def current_fingerprint(path: Path) -> str | None:
    """The fingerprint of a dataset (folder or one file) as it is now; None if it is gone."""
    if path.is_dir():
        return ds.scan(path).fingerprint
    try:
        st = path.stat()
    except OSError:
        return None
    return ds.fingerprint([ds.FileEntry(path.name, st.st_size, st.st_mtime_ns)])
