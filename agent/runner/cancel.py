"""A cancel request, at any stage: kill the executions, and clean the server only once it
confirms they all ended (never delete inputs under a running job)."""

from __future__ import annotations

from agent.backend.errors import NotFoundError, VipError
from agent.journal import Dataset, Stage
from agent.leftovers import remove_left_file
from agent.runner.cleanup import landing_sweep, reappeared, record_removed
from agent.runner.common import KILL_REPEAT, Context, Finish, Next, Wait, is_ended
from agent.runner.monitor import poll_execution
from agent.runner.settings import discard_requested, settings_of
from agent.session_data import write_session_data


def step(ctx: Context, ds: Dataset) -> Next:
    backend = ctx.backend(ds.server)
    engine = backend.engine
    journal = ctx.journal
    memo = ctx.memo(ds.id)
    waiting = []
    for e in journal.executions(ds.id):
        if not e.vip_id or is_ended(ctx, ds, e):
            continue
        now, mono = ctx.clock(), ctx.monotonic()  # wall: the journal's ``ended``
        last = memo.kill_sent.get(e.key)  # monotonic: when the kill is sent again
        if last is None or mono - last >= KILL_REPEAT:
            try:
                engine.kill(e.vip_id)
            except NotFoundError:
                pass  # gone: the poll below records it
            memo.kill_sent[e.key] = mono
            if last is None:
                journal.event(ds.id, f"execution {e.vip_id} killed")
        info = poll_execution(ctx, ds, engine, e)
        if info is None:
            continue
        ended = info.status.ended
        journal.update_execution(
            ds.id, e.key, status=info.status.label, **({"ended": now} if ended else {})
        )
        if not ended:
            waiting.append(e.vip_id)
    if waiting:
        memo.notice = (
            f"cancelling: waiting for VIP to confirm that {', '.join(waiting)} ended before "
            "deleting anything"
        )
        return Wait(1.0)
    discard = discard_requested(ds)
    keep = settings_of(ds).keep_remote and not discard
    if not keep and ds.remote_root:
        for e in journal.executions(ds.id):
            if e.vip_id and not e.cleaned:
                try:
                    engine.delete_execution(e.vip_id)
                    record_removed(ctx, ds.id, execution=e.vip_id)
                except VipError:
                    pass  # not deletable (failed) or already gone
                journal.update_execution(ds.id, e.key, cleaned=1)
        if backend.storage.exists(ds.remote_root):
            if memo.sweep_due is not None:  # gone once, back now: an upload landed late
                reappeared(ctx, ds, [ds.remote_root])
            try:
                backend.storage.delete(ds.remote_root)
            except NotFoundError:
                pass
            return Wait(2.0)
        # an upload VIP answered with a timeout may land after the delete: look once more
        sweep = landing_sweep(ctx, ds, backend, [ds.remote_root])
        if sweep is not None:
            return Wait(sweep)
        record_removed(ctx, ds.id, path=ds.remote_root)
    write_session_data(journal, ds.id)
    if discard:
        remove_left_file(ds)
        # a request, not a setting: a later attempt must not inherit it
        fresh = journal.get(ds.id).options or {}
        journal.update(ds.id, options={k: v for k, v in fresh.items() if k != "discard"})
        return Finish(
            Stage.CANCELLED,
            message="cancelled: the outputs left on VIP were deleted; the server is clean",
        )
    return Finish(Stage.CANCELLED, message="cancelled; the server is clean")
