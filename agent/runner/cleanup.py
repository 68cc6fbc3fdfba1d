"""Stage ``cleanup``: delete what the dataset left on the server, then end it.

Deletes are idempotent and polled until gone (platforms may delete asynchronously, and drop
a failed delete). Outputs that could not be mirrored stay on the server with their execution
(the dataset ends ``incomplete``, ``LEFT_ON_VIP.txt`` says which).
"""

from __future__ import annotations

from pathlib import Path

from agent.backend.port import Backend, RunState
from agent.errors import AgentError
from agent.journal import Dataset, Stage
from agent.leftovers import remove_left_file, summary, write_left_file
from agent.pacer import policy
from agent.runner.common import DELETE_DEADLINE, LOGS_DIR, Context, Finish, Next, Wait
from agent.runner.mirror import max_download
from agent.runner.settings import settings_of
from agent.session_data import write_session_data
from agent.vip.errors import NotFoundError, VipError


def step(ctx: Context, ds: Dataset) -> Next:
    backend = ctx.backend(ds.server)
    journal = ctx.journal
    job = ds.job or {}
    outputs = journal.outputs(ds.id)
    left = [o for o in outputs if not o.downloaded]
    keep = settings_of(ds).keep_remote or not job.get("cleanup", True)
    if not keep and ds.remote_root:
        # outputs we could not mirror stay on the server with their execution (the portal
        # shows them there); the inputs, the other executions and the copies we hold go
        holding = {o.exec_key for o in left}
        if left:
            targets = [backend.layout(ds.remote_root).inputs] + [
                o.remote for o in outputs if o.downloaded and not o.remote_deleted
            ]
        else:
            targets = [ds.remote_root]
        for e in journal.executions(ds.id):
            if not e.vip_id or e.cleaned or e.key in holding:
                continue
            state = backend.engine.classify(e.status or "").state
            # a platform deletes only executions that finished or were killed
            if state in (RunState.FINISHED, RunState.KILLED):
                try:
                    backend.engine.delete_execution(e.vip_id)
                    record_removed(ctx, ds.id, execution=e.vip_id)
                except NotFoundError:
                    record_removed(ctx, ds.id, execution=e.vip_id)  # deleted before a crash
                except VipError as err:
                    journal.event(
                        ds.id, f"could not delete execution {e.vip_id}: {err.message}",
                        level="warning",
                    )
            journal.update_execution(ds.id, e.key, cleaned=1)
        wait = delete_remote(ctx, ds, backend, targets, {o.remote for o in outputs})
        if wait is not None:
            return Wait(wait)
    return finish(ctx, ds, backend, kept_remote=keep)


def delete_remote(
    ctx: Context, ds: Dataset, backend: Backend, targets: list[str], outputs: set[str]
) -> float | None:
    """Delete ``targets`` and poll until gone: None when gone, else the wait."""
    memo = ctx.memo(ds.id)
    storage = backend.storage
    now = ctx.monotonic()  # the delete deadline is a duration: never the wall clock
    if memo.delete_started is None:
        memo.delete_started = now
    pending = []
    for target in targets:
        if storage.exists(target):
            pending.append(target)
            continue
        if target in outputs:
            ctx.journal.update_output(ds.id, target, remote_deleted=1)
        record_removed(ctx, ds.id, path=target)
    if not pending:
        memo.delete_started, memo.delete_polls = None, 0
        return None
    if now - memo.delete_started > DELETE_DEADLINE:
        raise AgentError(
            f"the server has not deleted {pending[0]} after {DELETE_DEADLINE:.0f} s",
            detail="VIP deletes asynchronously and may drop failed deletes",
        )
    if memo.delete_polls == 0:
        for target in pending:
            try:
                storage.delete(target)
            except NotFoundError:
                pass  # deleted meanwhile
    memo.delete_polls += 1
    if memo.delete_polls % 30 == 0:
        memo.delete_polls = 0  # the server may drop a failed delete: ask again now and then
    # deletes are asynchronous: look again soon, then less often (the ``delete`` policy)
    return policy("delete").delay(memo.delete_polls - 1)


def record_removed(
    ctx: Context, dataset_id: int, *, path: str | None = None, execution: str | None = None
) -> None:
    """Remember what cleanup removed from the server (for session_data.json)."""
    options = dict(ctx.journal.get(dataset_id).options or {})
    removed = dict(options.get("removed") or {})
    for key, value in (("paths", path), ("executions", execution)):
        if value is not None and value not in removed.get(key, []):
            removed[key] = [*removed.get(key, []), value]
    removed["time"] = ctx.clock()
    options["removed"] = removed
    ctx.journal.update(dataset_id, options=options)


def finish(ctx: Context, ds: Dataset, backend: Backend, *, kept_remote: bool) -> Finish:
    """How the dataset ends: done, incomplete (outputs left on the server) or failed."""
    journal = ctx.journal
    problems = []
    killed = ctx.memo(ds.id).kill_sent
    for e in journal.executions(ds.id):
        status = backend.engine.classify(e.status or "")
        if status.state is not RunState.FINISHED:
            why = (
                " (killed by vip-agent: VIP reported it Unknown for longer than the limit)"
                if e.key in killed and not ds.cancel_requested else ""
            )
            problems.append(
                f"execution {e.name} ({e.vip_id}) ended {e.status}{why}; its logs are in "
                f"{Path(ds.output_dir or '.') / LOGS_DIR / e.key}"
            )
        else:
            failed_jobs = backend.engine.job_problems(e.jobs or {})
            if failed_jobs:
                journal.event(
                    ds.id,
                    f"execution {e.vip_id} finished but job(s) {', '.join(failed_jobs)} "
                    "did not complete",
                    level="warning",
                )
    outputs = journal.outputs(ds.id)
    left = [o for o in outputs if not o.downloaded]
    for o in outputs:
        if o.downloaded and o.extracted == -1:
            problems.append(f"archive {o.local} was not extracted (unsafe or corrupt); kept as is")
    write_session_data(journal, ds.id)
    if left:
        limit = max_download(backend)
        write_left_file(ds, left, limit)
        if not problems:
            return Finish(Stage.INCOMPLETE, error=summary(left, limit), level="warning")
        problems.append(summary(left, limit))
    else:
        remove_left_file(ds)
    if problems:
        return Finish(Stage.FAILED, error="; ".join(problems))
    note = " (remote data kept)" if kept_remote else " and the server is clean"
    return Finish(Stage.DONE, message=f"outputs in {ds.output_dir}{note}")
