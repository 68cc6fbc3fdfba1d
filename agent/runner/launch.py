"""Stage ``launch``: launch the first execution (the others launch from ``monitor`` as
slots free up), exactly once across crashes.

The announcement ``launching NAME`` is committed before any launch request: without it no
earlier attempt can have reached the server, and the lookup by (deterministic) name is
saved; with it, the execution is looked up before launching again.

A refusal that means "try later" (the account's cap, 2001; a busy engine, 2003 or VIP 4.6's
8000 "no ressources available") is a ``CapacityError``: the machine reports it to the
server's budget and every launch there waits its backoff. Any other refusal (2004
LAUNCH_ERROR, a bad input...) is permanent: the dataset fails with VIP's words and, when
nothing of it was launched, its inputs are deleted from the server.
"""

from __future__ import annotations

from agent import failpoints
from agent.backend.errors import ApiError, LaunchUncertain, NotFoundError, VipError
from agent.backend.port import ExecutionInfo
from agent.errors import AgentError
from agent.journal import Dataset, Execution, Stage
from agent.runner.cleanup import record_removed
from agent.runner.common import Advance, Context, Finish, Next, Wait
from agent.runner.polling import poll_interval

#: the status recorded for a planned execution the platform refused for good (it has no id)
REFUSED_LABEL = "Refused"


class LaunchRefused(AgentError):
    """The platform refused a launch for good (not "try later"): VIP's words in the message."""


def step(ctx: Context, ds: Dataset) -> Next:
    pending = [e for e in ctx.journal.executions(ds.id) if not e.vip_id]
    if pending:
        if not ctx.slot_free(ds.server):
            return Wait(ctx.poll_min)
        # the server refused a launch lately (its cap): wait, do not ask again every poll
        backoff = ctx.budget(ds.server).launch_wait()
        if backoff > 0:
            return Wait(backoff)
        try:
            launch_one(ctx, ds, pending[0])
        except LaunchRefused as err:
            return refused(ctx, ds, err)
    return Advance(
        Stage.MONITOR, "execution launched",
        wait=poll_interval(ctx, ds, ctx.journal.executions(ds.id)),
    )


def launch_one(ctx: Context, ds: Dataset, e: Execution) -> None:
    """Launch one planned execution, exactly once (idempotent across crashes).

    A refusal for capacity (``CapacityError``) is the caller's to report to the server's
    budget (``launch_refused``): every launch on that server then waits its backoff.
    """
    backend = ctx.backend(ds.server)
    engine = backend.engine
    job = ds.job or {}
    announce = f"launching {e.name}"
    tried = ctx.journal.has_event(ds.id, announce)
    info: ExecutionInfo | None = engine.find(e.name) if tried else None
    if info is None:
        if not tried:
            ctx.journal.event(ds.id, announce)
        # several executions of one dataset: one results folder each (VIP names the folder
        # after the launch second: two launches in one second would share it)
        several = len(ctx.journal.executions(ds.id)) > 1
        where = backend.layout(ds.remote_root or "").results_location(e.key, several)
        try:
            info = engine.launch(e.name, str(job.get("pipeline")), e.inputs, where)
        except LaunchUncertain:
            info = engine.find(e.name)
            if info is None:
                raise
        except (ApiError, NotFoundError) as err:
            raise LaunchRefused(
                f"VIP refused to launch {e.name}: {err.message}", detail=err.detail
            ) from None
        failpoints.hit("launch:posted")
        ctx.budget(ds.server).launch_accepted()
    else:
        ctx.journal.event(ds.id, f"found execution {info.id} already launched")
    ctx.journal.update_execution(
        ds.id, e.key, vip_id=info.id, status=info.status.label, launched=ctx.clock(),
    )



def refused(ctx: Context, ds: Dataset, err: LaunchRefused) -> Finish:
    """Fail the dataset with VIP's words; delete its inputs when nothing of it was launched
    (nothing can run on them, and a lab's quota is not kept by a dataset that ended)."""
    message = err.message
    launched = [e for e in ctx.journal.executions(ds.id) if e.vip_id]
    if ds.remote_root and not launched:
        try:
            ctx.backend(ds.server).storage.delete(ds.remote_root, missing_ok=True)
            record_removed(ctx, ds.id, path=ds.remote_root)
            message += "; its inputs were deleted from VIP"
        except VipError as cleanup_err:
            message += f"; its inputs stay on VIP ({cleanup_err.message})"
    return Finish(Stage.FAILED, error=message)
