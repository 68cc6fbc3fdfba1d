"""Stage ``cleanup``: delete what the dataset left on the server, then end it.

Deletes are idempotent and polled until gone (platforms may delete asynchronously, and drop
a failed delete). Outputs that could not be mirrored stay on the server with their execution
(the dataset ends ``incomplete``, ``LEFT_ON_VIP.txt`` says which).

A delete slower than ``DELETE_DEADLINE`` never fails the dataset (its outputs are mirrored):
it is reported once, shown on the dataset (``cleaning``, with what VIP has not deleted yet),
asked again every :data:`LATE_DELETE_RETRY` seconds, and the dataset ends once it is gone.
When the server answered a transfer timeout in this process (an upload VIP gave up on may
still land, even into a deleted folder), the targets are looked at once more
:data:`LANDING_SWEEP` seconds after the delete, and deleted again if something landed.
"""

from __future__ import annotations

from pathlib import Path

from agent.backend.errors import NotFoundError, VipError
from agent.backend.port import Backend, RunState
from agent.journal import Dataset, Stage
from agent.leftovers import remove_left_file, summary, write_left_file
from agent.pacer import policy
from agent.runner.common import (
    DELETE_DEADLINE,
    LOGS_DIR,
    Context,
    Finish,
    Next,
    Wait,
    duration,
)
from agent.runner.failure import MAX_QUOTED, redactor, stderr_excerpt
from agent.runner.mirror import max_download
from agent.runner.settings import settings_of
from agent.session_data import write_session_data

#: seconds after a confirmed delete when the server is looked at once more for uploads that
#: land late (only after a transfer timeout; VIP's own wait is 45 s, GRIDA reschedules)
LANDING_SWEEP = 10.0
#: seconds between new delete requests once a delete took longer than ``DELETE_DEADLINE``
LATE_DELETE_RETRY = 60.0


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
        if wait is None:
            wait = landing_sweep(ctx, ds, backend, targets)
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
    if memo.sweep_due is not None:  # gone once, back now: an upload landed late
        reappeared(ctx, ds, pending)
    if now - memo.delete_started > DELETE_DEADLINE:
        return late_delete(ctx, ds, backend, pending, now - memo.delete_started)
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


def late_delete(
    ctx: Context, ds: Dataset, backend: Backend, pending: list[str], waited: float
) -> float:
    """VIP has not deleted ``pending`` within ``DELETE_DEADLINE``: never a failure (the
    outputs are mirrored); said once, kept on the dataset, asked again now and then."""
    memo = ctx.memo(ds.id)
    names = ", ".join(pending[:2]) + (f" and {len(pending) - 2} more" if len(pending) > 2 else "")
    if not memo.delete_late:
        memo.delete_late = True
        ctx.journal.event(
            ds.id,
            f"VIP has not deleted {names} after {duration(waited)} (it deletes in the "
            f"background); the outputs are mirrored, the delete is asked again every "
            f"{duration(LATE_DELETE_RETRY)} and the dataset ends once it is gone",
            level="warning",
        )
    memo.notice = (
        f"outputs mirrored in {ds.output_dir}; waiting for VIP to delete {names} (asked "
        f"{duration(waited)} ago, asked again every {duration(LATE_DELETE_RETRY)})"
    )
    for target in pending:
        try:
            backend.storage.delete(target)
        except NotFoundError:
            pass  # deleted meanwhile
    return LATE_DELETE_RETRY


def landing_sweep(
    ctx: Context, ds: Dataset, backend: Backend, targets: list[str]
) -> float | None:
    """Once the delete is confirmed: None when the server is clean for good, else the wait.

    Only after a transfer timeout on this server (this process): VIP may still land an
    upload it answered with a timeout, recreating its folder after the delete. The targets
    are looked at once more :data:`LANDING_SWEEP` seconds later; a path back is deleted
    again (by the next step) and swept again.
    """
    if not ctx.budget(ds.server).snapshot().get("transfer_timeouts_total"):
        return None
    memo = ctx.memo(ds.id)
    now = ctx.monotonic()
    if memo.sweep_due is None:
        memo.sweep_due = now + LANDING_SWEEP
        memo.notice = "cleaning: looking once more for uploads VIP may still land"
        return LANDING_SWEEP
    if now < memo.sweep_due:
        return memo.sweep_due - now
    back = [t for t in targets if backend.storage.exists(t)]
    if not back:
        return None
    reappeared(ctx, ds, back)
    memo.delete_started, memo.delete_polls = None, 0  # the next step deletes and polls
    return 0.1


def reappeared(ctx: Context, ds: Dataset, paths: list[str]) -> None:
    """Say that deleted paths came back (a late landing); the sweep starts over after."""
    ctx.memo(ds.id).sweep_due = None
    ctx.journal.event(
        ds.id,
        f"{', '.join(paths)} reappeared on VIP after the delete (an upload VIP had answered "
        "with a timeout landed late); deleting it again",
        level="warning",
    )


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
    quoted = 0  # failed executions whose stderr is quoted (the others: their logs)
    for e in journal.executions(ds.id):
        status = backend.engine.classify(e.status or "")
        if not e.vip_id:
            problems.append(f"execution {e.name} was not launched: VIP refused it (see the "
                            "dataset's events for VIP's words)")  # fmt: skip
        elif status.state is not RunState.FINISHED:
            why = (
                " (killed by vip-agent: VIP reported it Unknown for longer than the limit)"
                if e.key in killed and not ds.cancel_requested else ""
            )
            logs = Path(ds.output_dir or ".") / LOGS_DIR / e.key
            problem = f"execution {e.name} ({e.vip_id}) ended {e.status}{why}; its logs are in {logs}"
            if status.state is RunState.FAILED and e.vip_id and quoted < MAX_QUOTED:
                # the job's own words (its stderr's last lines), not only "it failed"
                excerpt = stderr_excerpt(
                    logs, e, backend.engine.job_problems(e.jobs or {}), engine=backend.engine,
                    redact=redactor(backend),
                )
                if excerpt:
                    problem += "\n" + excerpt
                    quoted += 1
            problems.append(problem)
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
        # one line each, unless a problem carries a stderr block: then one per line
        joiner = "\n" if any("\n" in p for p in problems) else "; "
        return Finish(Stage.FAILED, error=joiner.join(problems))
    note = " (remote data kept)" if kept_remote else " and the server is clean"
    return Finish(Stage.DONE, message=f"outputs in {ds.output_dir}{note}")
