"""Stage ``mirror``: list each execution's results, save its logs, download every output.

Downloads go to ``<file>.part`` and are renamed when complete; a local file of the expected
size that the journal has not marked yet is adopted (finished before a crash). An output
above the platform's direct-transfer limit stays there (the dataset ends ``incomplete``).
"""

from __future__ import annotations

import threading
from pathlib import Path, PurePosixPath

from agent import failpoints
from agent.backend.errors import (
    AuthError,
    TooLargeError,
    UnsafePathError,
    VipError,
    check_server_path,
)
from agent.backend.port import Backend, Engine, RunState
from agent.errors import AgentError
from agent.fsutil import write_atomic
from agent.journal import Dataset, Output, Stage
from agent.progress import human_size
from agent.runner.common import LOGS_DIR, Advance, Context, Interrupted, Next, inside, parallel
from agent.session_data import write_session_data


def max_download(backend: Backend, *, refresh: bool = False) -> int | None:
    """The platform's direct-transfer limit (cached by the backend), None if unknown."""
    try:
        return backend.max_transfer_size(refresh=refresh)
    except AuthError:
        raise
    except VipError:
        return None


def step(ctx: Context, ds: Dataset) -> Next:
    backend = ctx.backend(ds.server)
    journal = ctx.journal
    assert ds.output_dir and ds.remote_root
    out_dir = Path(ds.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs_root = PurePosixPath(backend.layout(ds.remote_root).outputs)
    # outputs already known and not mirrored: a retry of an incomplete dataset (or a
    # resume); the server's limit may have been raised since it was cached
    limit = max_download(backend, refresh=any(not o.downloaded for o in journal.outputs(ds.id)))
    for e in journal.executions(ds.id):
        if not e.vip_id or e.cleaned:
            continue  # a cleaned one is deleted: its outputs were all mirrored
        if e.status is not None and backend.engine.classify(e.status).state is RunState.LOST:
            continue
        for info in backend.engine.results(e.vip_id):
            if not info.exists or info.is_dir:
                continue
            try:
                remote = PurePosixPath(check_server_path(info.path, under=str(outputs_root)))
            except UnsafePathError as err:
                raise AgentError(
                    f"execution {e.vip_id} ({e.key}): {err.message}. Nothing was written "
                    "for it; its outputs and inputs stay on the server (see them on the VIP "
                    "portal, then `vip-agent cancel` or `retry`)",
                    detail=err.detail,
                ) from None
            local = inside(out_dir, remote.relative_to(outputs_root))
            journal.add_output(
                ds.id, remote=str(remote), exec_key=e.key, size=info.size, local=str(local)
            )
            if e.results_dir is None:
                journal.update_execution(ds.id, e.key, results_dir=str(remote.parent))
        if not e.logs_saved:
            save_logs(ds, backend.engine, e.vip_id, e.key, e.jobs or {})
            journal.update_execution(ds.id, e.key, logs_saved=1)

    todo = [o for o in journal.outputs(ds.id) if not o.downloaded]
    too_big = [o for o in todo if limit and o.size and o.size > limit]
    todo = [o for o in todo if o not in too_big]
    refused = _download(ctx, ds, backend, todo)
    for o in too_big + refused:
        size = human_size(o.size) if o.size is not None else "of unknown size"
        journal.event(
            ds.id,
            f"output {o.remote} is {size}, above VIP's direct-transfer limit"
            f"{f' of {human_size(limit)}' if limit else ''}: it stays on VIP (listed in the "
            "output folder's LEFT_ON_VIP.txt)",
            level="warning",
        )
    write_session_data(journal, ds.id)
    if (ds.job or {}).get("extract", True):
        return Advance(Stage.EXTRACT, "outputs mirrored")
    return Advance(Stage.CLEANUP, "outputs mirrored")


def _download(ctx: Context, ds: Dataset, backend: Backend, todo: list[Output]) -> list[Output]:
    """Fetch ``todo`` in parallel; returns the outputs the platform refused as too large."""
    refused: list[Output] = []
    total = sum(o.size or 0 for o in todo)
    done_bytes = [0]
    lock = threading.Lock()

    def progress(n: int) -> None:
        if ctx.stop_event.is_set():
            raise Interrupted("stopping: download abandoned, it resumes on next start")
        with lock:
            done_bytes[0] += n
        ctx.report_progress(ds.id, "download", done_bytes[0], total)
        failpoints.hit("download:partial")

    def download(o: Output) -> None:
        local = Path(o.local)
        if local.exists() and not local.is_dir():
            if o.size is not None and local.stat().st_size == o.size:
                ctx.journal.update_output(ds.id, o.remote, downloaded=1)
                return  # finished before a crash, not yet recorded
            raise AgentError(
                f"{local} already exists and differs from the output {o.remote}; "
                "vip-agent never overwrites local files. Move it away and retry"
            )
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            backend.storage.get(o.remote, local, expected_size=o.size, progress=progress)
        except TooLargeError:
            with lock:
                refused.append(o)  # its size was unknown, or the limit went down
            return
        ctx.journal.update_output(ds.id, o.remote, downloaded=1)

    if todo:
        ctx.journal.event(ds.id, f"downloading {len(todo)} output file(s), {human_size(total)}")
        parallel(download, todo, ctx.threads(ds))
    return refused


def save_logs(ds: Dataset, engine: Engine, vip_id: str, key: str, jobs: dict[str, object]) -> None:
    """The execution's stdout/stderr (per job when it has several) into ``logs/<key>/``."""
    folder = Path(ds.output_dir or ".") / LOGS_DIR / key
    folder.mkdir(parents=True, exist_ok=True)
    job_ids: list[str | None] = [*sorted(jobs, key=lambda j: (len(j), j))] or [None]
    for job in job_ids:
        for stream in ("stdout", "stderr"):
            try:
                text = engine.log(vip_id, stream, job)
            except VipError as err:
                text = f"(not available: {err.message})\n"
            suffix = f"job{job}." if job is not None else ""
            write_atomic(folder / f"{suffix}{stream}.txt", text)
