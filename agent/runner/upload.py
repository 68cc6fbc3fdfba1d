"""Stage ``upload``: send the planned files, one put each, in parallel, progress committed
to the journal in groups; one listing per folder then proves every size.

A put answered OK means the file is stored (VIP answers 201 once it is), so each file costs
one request. A crash re-sends at most the last uncommitted group (the backend finds a file
already there at the right size and counts it as sent). Each file's size and mtime are
compared with the plan before and after it is sent: a file written to meanwhile fails the
dataset (the session is deleted, nothing is launched) instead of being "verified" at a size
nobody wrote.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path, PurePosixPath

from agent import failpoints
from agent.backend.errors import SourceChanged, VipError
from agent.backend.port import Storage
from agent.journal import Dataset, FileRow, Stage
from agent.progress import human_size
from agent.runner.common import (
    UPLOAD_GROUP_FILES,
    UPLOAD_GROUP_SECONDS,
    Advance,
    Context,
    InputChanged,
    Interrupted,
    Next,
    dataset_root,
    parallel,
    remote_parent,
)


def check_unchanged(local: Path, f: FileRow, *, during: bool = False) -> None:
    """Raise unless ``local`` still has the size and mtime recorded when the dataset was taken."""
    try:
        st = local.stat()
    except FileNotFoundError:
        raise InputChanged(
            f"input file {f.rel} was removed "
            + ("while it was being uploaded" if during else "after the dataset was taken")
            + "; drop the dataset again (complete) and it will run as a new dataset"
        ) from None
    if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
        if during:
            raise changed_during_upload(local, f, st.st_size)
        raise InputChanged(
            f"input file {f.rel} changed after the dataset was taken (size {f.size} -> "
            f"{st.st_size}); nothing was launched. Drop the dataset again when it is "
            "complete and it will run as a new dataset"
        )


def changed_during_upload(local: Path, f: FileRow, now: int | None = None) -> InputChanged:
    if now is None:
        try:
            now = local.stat().st_size
        except OSError:
            now = -1
    return InputChanged(
        f"input file {f.rel} was written to while it was being uploaded (size {f.size} when "
        f"taken, {now} now); the copy on VIP was discarded and nothing was launched. The "
        "dataset was still being written: drop it again when it is complete and it will run "
        "as a new dataset",
        detail=f"{local}: planned size {f.size}, mtime_ns {f.mtime_ns}",
    )


def step(ctx: Context, ds: Dataset) -> Next:
    storage = ctx.backend(ds.server).storage
    assert ds.remote_root
    files = ctx.journal.files(ds.id)
    todo = [f for f in files if not f.uploaded]
    root = dataset_root(ds)
    # refuse a dataset that changed since it was taken: never mix two versions
    for f in todo:
        check_unchanged(root / f.rel, f)
    if todo:
        folders = sorted({remote_parent(f) for f in todo})
        if len(todo) < len(files):
            # resuming: files that reached the server before the crash are not sent again
            todo = _adopt(ctx, ds, storage, todo, folders)
    if todo:
        total = sum(f.size for f in todo)
        ctx.journal.event(ds.id, f"uploading {len(todo)} file(s), {human_size(total)}")
        for folder in folders:
            storage.makedirs(folder)
        _send_files(ctx, ds, storage, root, todo, verify=False)
    # one listing per folder proves every size (and catches a file the server lost)
    wrong = _unverified(storage, files)
    if wrong:
        names = ", ".join(f.rel for f in wrong[:3]) + (" ..." if len(wrong) > 3 else "")
        ctx.journal.event(
            ds.id, f"{len(wrong)} file(s) not on VIP at the right size ({names}); sending again",
            level="warning",
        )
        ctx.journal.unmark_uploaded(ds.id, [f.rel for f in wrong])
        _send_files(ctx, ds, storage, root, wrong, verify=True)
    return Advance(Stage.LAUNCH, "inputs uploaded and verified")


def _adopt(
    ctx: Context, ds: Dataset, storage: Storage, todo: list[FileRow], folders: list[str]
) -> list[FileRow]:
    """Mark files already on the server at the right size as sent; return the others."""
    on_server = {folder: storage.sizes(folder) for folder in folders}
    found = [
        f for f in todo
        if on_server[remote_parent(f)].get(PurePosixPath(f.remote or "").name) == f.size
    ]
    if found:
        ctx.journal.mark_uploaded_many(ds.id, [(f.rel, None) for f in found])
    return [f for f in todo if f not in found]


def _unverified(storage: Storage, files: list[FileRow]) -> list[FileRow]:
    """Files that the server's listings do not show at their planned size."""
    by_folder: dict[str, list[FileRow]] = {}
    for f in files:
        by_folder.setdefault(remote_parent(f), []).append(f)
    wrong = []
    for folder, group in by_folder.items():
        sizes = storage.sizes(folder)
        wrong += [f for f in group if sizes.get(PurePosixPath(f.remote or "").name) != f.size]
    return wrong


def _send_files(
    ctx: Context, ds: Dataset, storage: Storage, root: Path, todo: list[FileRow], *,
    verify: bool,
) -> None:
    total = sum(f.size for f in todo)
    done_bytes = [0]
    lock = threading.Lock()
    pending: list[tuple[str, str | None]] = []
    last_commit = [time.monotonic()]

    def progress(n: int) -> None:
        if ctx.stop_event.is_set():
            raise Interrupted("stopping: upload abandoned, it resumes on next start")
        with lock:
            done_bytes[0] += n
            done = done_bytes[0]
        ctx.report_progress(ds.id, "upload", done, total)
        failpoints.hit("upload:partial")

    def commit(force: bool = False) -> None:
        with lock:
            due = force or len(pending) >= UPLOAD_GROUP_FILES or (
                time.monotonic() - last_commit[0] >= UPLOAD_GROUP_SECONDS
            )
            if not due or not pending:
                return
            batch = pending[:]
            pending.clear()
            last_commit[0] = time.monotonic()
        ctx.journal.mark_uploaded_many(ds.id, batch)
        failpoints.hit("upload:group")

    def upload(f: FileRow) -> None:
        local = root / f.rel
        check_unchanged(local, f)
        try:
            storage.put(local, f.remote or "", progress=progress, verify=verify)
        except SourceChanged:
            raise changed_during_upload(local, f) from None
        # before and after: a file written to meanwhile is not the file that was taken
        check_unchanged(local, f, during=True)
        with lock:
            pending.append((f.rel, None))
        commit()

    try:
        parallel(upload, todo, ctx.threads(ds))
    except InputChanged:
        commit(force=True)
        # nothing was launched: the partial session on the server is of no use to anyone
        try:
            storage.delete(ds.remote_root or "", missing_ok=True)
        except VipError:
            pass
        raise
    finally:
        commit(force=True)
