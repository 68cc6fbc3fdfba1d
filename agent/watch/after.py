"""What happens to a dataset in the drop folder once its run has ended.

``after: keep`` (default) leaves it where it is: the journal remembers it and
it is never taken twice. ``archive`` moves it to the archive folder (never
overwriting: ``-1``, ``-2``... suffixes). ``delete`` removes it, only when the
run is ``done`` and every output is mirrored. A ``failed`` dataset gets an
``ERROR.txt`` saying what went wrong and how to retry, and moves to the failed
folder when one is configured. A dataset whose content changed since it was
taken is left in place: that new content is a new run.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import shutil
from pathlib import Path

from agent.config import DropConfig
from agent.errors import one_line
from agent.fsutil import write_atomic
from agent.journal import Dataset, Journal
from agent.watch.readiness import take_snapshot

log = logging.getLogger("vip_agent.watch")

ERROR_FILE = "ERROR.txt"


def error_file(path: Path) -> Path:
    """Where the error report of a dataset goes (inside a folder, beside a file)."""
    return path / ERROR_FILE if path.is_dir() else path.with_name(f"{path.name}.{ERROR_FILE}")


def unique_target(folder: Path, name: str, *, is_dir: bool = True) -> Path:
    """``folder/name``, or ``name-1``, ``name-2``... if taken (never overwrite).

    For a file the suffix goes before the extensions: ``scan-1.nii.gz``.
    """
    stem, dot, ext = (name, "", "") if is_dir else name.partition(".")
    target = folder / name
    n = 0
    while target.exists() or target.is_symlink():
        n += 1
        target = folder / f"{stem or name}-{n}{dot}{ext}"
    return target


def _move(ds: Dataset, src: Path, folder: Path, journal: Journal, what: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = unique_target(folder, src.name, is_dir=src.is_dir())
    companion = error_file(src) if src.is_file() else None
    os.replace(src, target)  # same file system in the usual layout; else fall back below
    if companion is not None and companion.exists():
        os.replace(companion, error_file(target))
    journal.update(ds.id, path=str(target))
    journal.event(ds.id, f"moved to the {what} folder: {target}")
    log.info("%s: moved to %s", ds.name, target)
    return target


def _move_any(ds: Dataset, src: Path, folder: Path, journal: Journal, what: str) -> Path:
    try:
        return _move(ds, src, folder, journal, what)
    except OSError as err:
        if err.errno != errno.EXDEV:  # another file system: copy, then delete
            raise
    target = unique_target(folder, src.name, is_dir=src.is_dir())
    if src.is_dir():
        shutil.copytree(src, target)
        shutil.rmtree(src)
    else:
        shutil.copy2(src, target)
        src.unlink()
    journal.update(ds.id, path=str(target))
    journal.event(ds.id, f"moved to the {what} folder: {target}")
    return target


def write_error_report(
    ds: Dataset, journal: Journal, path: Path, *, again: str | None = None
) -> Path:
    """Write ``ERROR.txt``: what went wrong, where the logs are, how to retry.

    ``again``: the command that runs it again (``vip-agent run`` gives its own);
    by default ``vip-agent retry`` for the watching agent.
    """
    events = [
        e for e in journal.events(ds.id, limit=200)
        if e.level in ("warning", "error") and e.message != ds.error  # not the error again
    ][-5:]
    when = dt.datetime.fromtimestamp(ds.finished or ds.updated).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        f"vip-agent could not process the dataset {ds.name!r}.",
        "",
        "What went wrong:",
        *(f"  {line}" for line in (ds.error or "unknown error (see the agent's log)").splitlines()),
    ]
    if ds.error_detail:
        lines.append(f"  (detail: {ds.error_detail})")
    lines += ["", f"When: {when}    Dataset: {path}    Run #{ds.id}, attempt {ds.attempt}"]
    if ds.output_dir:
        lines.append(f"Outputs and execution logs (if any): {ds.output_dir}")
    if events:
        lines += ["", "Recent warnings:"]
        lines += [f"  - {one_line(e.message)}" for e in events]
    lines += [
        "",
        "How to run it again:",
        "  1. fix the problem (the job.yaml, the data, or the server side as said above);",
    ]
    if again:
        lines += [f"  2. run the same command again:  {again}", ""]
    else:
        lines += [
            f"  2. run:  vip-agent retry {ds.name}",
            "     A running agent picks it up within a few seconds.",
            "  Or drop a corrected copy into the drop folder: new content always runs as a new "
            "dataset.",
            "",
        ]
    target = error_file(path)
    write_atomic(target, "\n".join(lines))
    return target


def update_error_report(
    ds: Dataset, journal: Journal, path: Path, *, again: str | None = None
) -> Path | None:
    """``ERROR.txt`` for a failed dataset; a stale one removed once it succeeded.

    The one place ``watch`` (through :func:`finish`) and ``run`` decide about it.
    """
    if ds.stage == "failed":
        return write_error_report(ds, journal, path, again=again)
    if ds.stage in ("done", "incomplete"):
        # a previous attempt's report no longer applies
        error_file(path).unlink(missing_ok=True)
    return None


def _present(local: str, extracted_to: str | None) -> bool:
    # an extracted archive is replaced by its folder
    return Path(local).exists() or bool(extracted_to and Path(extracted_to).exists())


def _unchanged(ds: Dataset, path: Path, drop: DropConfig) -> bool:
    snap = take_snapshot(path, drop)
    return snap.exists and snap.fingerprint == ds.fingerprint


def finish(ds: Dataset, drop: DropConfig, journal: Journal) -> Path | None:
    """Apply ``after:`` to a dataset that reached a final stage; returns where it now is."""
    path = Path(ds.path)
    if not path.exists():
        return None
    if ds.stage == "cancelled":
        return path
    if not _unchanged(ds, path, drop):
        log.info("%s: changed since it was taken; left in place to run as new content", ds.name)
        return path
    report = update_error_report(ds, journal, path)
    if ds.stage == "failed":
        first = one_line(ds.error) or "unknown error"
        # the ERROR line is the oversight's (one per failure); this one is for debugging
        log.debug("%s failed: %s (see %s)", ds.name, first, report)
        if drop.failed_dir is not None and path.parent == drop.path:
            return _move_any(ds, path, drop.failed_dir, journal, "failed")
        return path
    # done or incomplete (delete below keeps a dataset whose outputs are not all mirrored)
    if drop.after == "archive" and drop.archive_dir is not None:
        return _move_any(ds, path, drop.archive_dir, journal, "archive")
    if drop.after == "delete" and ds.stage == "incomplete":
        journal.event(ds.id, "kept in the drop folder until the outputs left on VIP are fetched")
        return path
    if drop.after == "delete":
        outputs = journal.outputs(ds.id)
        missing = [o for o in outputs if not o.downloaded or not _present(o.local, o.extracted_to)]
        if missing or not ds.output_dir or not Path(ds.output_dir).is_dir():
            journal.event(
                ds.id, "not deleted from the drop folder: the mirrored outputs could not be "
                "verified", level="warning",
            )  # fmt: skip
            log.warning("%s: outputs not verified; the dataset is kept", ds.name)
            return path
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        journal.event(ds.id, f"deleted from the drop folder (outputs verified in {ds.output_dir})")
        log.info("%s: deleted from the drop folder after a verified mirror", ds.name)
        return None
    return path

