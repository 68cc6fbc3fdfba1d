"""Stage ``monitor``: follow the executions until every one has ended; launch the others as
slots free up; kill one that reads ``Unknown`` for longer than the limit.

Only a status that says so proves an execution ended: ``Unknown`` and words the platform
does not define count as running, so cleanup never deletes inputs under a running job.
"""

from __future__ import annotations

from typing import Any

from agent.backend.errors import CapacityError, NotFoundError
from agent.backend.port import LOST_LABEL, Engine, ExecStatus, ExecutionInfo, RunState
from agent.journal import Dataset, Execution, Stage
from agent.runner.common import (
    KILL_REPEAT,
    Advance,
    Context,
    Memo,
    Next,
    Wait,
    clock_text,
    duration,
    is_ended,
    status_of,
    wall_time,
)
from agent.runner.launch import REFUSED_LABEL, LaunchRefused, launch_one
from agent.runner.polling import poll_interval
from agent.runner.settings import settings_of


def step(ctx: Context, ds: Dataset) -> Next:
    engine = ctx.backend(ds.server).engine
    memo = ctx.memo(ds.id)
    for e in ctx.journal.executions(ds.id):
        if not e.vip_id or is_ended(ctx, ds, e):
            continue
        info = poll_execution(ctx, ds, engine, e)
        if info is not None:
            observe(ctx, ds, engine, memo, e, info.status, info.jobs)

    executions = ctx.journal.executions(ds.id)
    pending = [e for e in executions if not e.vip_id and e.status != REFUSED_LABEL]
    budget = ctx.budget(ds.server)
    if pending and ctx.slot_free(ds.server) and budget.launch_wait() <= 0:
        try:
            launch_one(ctx, ds, pending[0])
        except CapacityError as err:
            # the server's cap: every launch on it waits the backoff, not the next poll
            wait = budget.launch_refused(err.code)
            ctx.journal.event(ds.id, f"{err.message}; the next launch in {wait:.0f} s")
        except LaunchRefused as err:
            # refused for good: the runs not launched are given up (the dataset ends
            # failed, after the launched ones are mirrored and the server cleaned)
            for e in pending:
                ctx.journal.update_execution(ds.id, e.key, status=REFUSED_LABEL)
            ctx.journal.event(
                ds.id, f"{err.message}; {len(pending)} run(s) not launched, the others are "
                "followed to their end", level="error",
            )
        executions = ctx.journal.executions(ds.id)
    if all((e.vip_id and is_ended(ctx, ds, e)) or e.status == REFUSED_LABEL for e in executions):
        return Advance(Stage.MIRROR, "all executions ended")
    return Wait(poll_interval(ctx, ds, executions))


def poll_execution(ctx: Context, ds: Dataset, engine: Engine, e: Execution) -> ExecutionInfo | None:
    """The execution now, or None once it is certain the server no longer has it (then
    recorded ``Lost``: nothing of it runs)."""
    assert e.vip_id
    info = engine.status(e.vip_id)
    if info is not None:
        return info
    ctx.journal.update_execution(
        ds.id, e.key, status=LOST_LABEL, ended=ctx.clock()
    )
    ctx.journal.event(ds.id, f"execution {e.vip_id} vanished from the server", level="error")
    return None


def observe(
    ctx: Context, ds: Dataset, engine: Engine, memo: Memo, e: Execution, status: ExecStatus,
    jobs: dict[str, Any],
) -> None:
    """Record what the server says of one execution; kill one that reads Unknown too long.

    How long it has read Unknown is measured on the monotonic clock: a wall-clock jump (a
    +7 h correction during a 14 s blip) must not kill a healthy execution.
    """
    now = ctx.clock()  # recorded in the journal (``ended``): a wall time
    mono = ctx.monotonic()
    label = status.label
    fields: dict[str, Any] = {"status": label, "jobs": jobs}
    limit = settings_of(ds).unknown_limit or ctx.unknown_limit
    if status.state is RunState.UNKNOWN:
        since = memo.unknown_since.setdefault(e.key, mono)
        if e.status != label:
            ctx.journal.event(
                ds.id,
                f"execution {e.vip_id} ({e.key}) reads {label}: VIP lost track of it for now; "
                "it is treated as still running and its inputs stay on the server (it is "
                f"killed if this lasts {duration(limit)})",
                level="warning",
            )
        if mono - since >= limit:
            _kill_unknown(ctx, ds, engine, memo, e, since, mono, limit)
        else:
            since_wall = wall_time(ctx, since)
            memo.notice = (
                f"execution {e.vip_id} reads {label} since {clock_text(since_wall)}; treated "
                f"as running (killed at {clock_text(since_wall + limit)} if it lasts)"
            )
    else:
        memo.unknown_since.pop(e.key, None)
    if not status.recognised and e.key not in memo.strange_reported:
        memo.strange_reported.add(e.key)
        ctx.journal.event(
            ds.id,
            f"execution {e.vip_id} ({e.key}) reports the status {label[:80]!r}, which is not "
            "one VIP defines; treating it as still running",
            level="warning",
        )
    if status.ended:
        fields["ended"] = now
        if e.status is None or not status_of(ctx, ds, e.status).ended:
            # one of our executions on this server just ended: a slot is free, so a launch
            # refused for the cap may be tried at once instead of after its backoff
            ctx.budget(ds.server).slot_freed()
        if e.key in memo.kill_sent:
            ctx.journal.event(ds.id, f"VIP confirms execution {e.vip_id} ended ({label})")
    if label != e.status and status.state is not RunState.UNKNOWN:
        ctx.journal.event(ds.id, f"execution {e.vip_id} ({e.key}): {label}")
    ctx.journal.update_execution(ds.id, e.key, **fields)


def _kill_unknown(
    ctx: Context, ds: Dataset, engine: Engine, memo: Memo, e: Execution, since: float,
    now: float, limit: float,
) -> None:
    """Kill an execution stuck in Unknown; cleanup waits until the server says it ended.
    ``since`` and ``now`` are monotonic readings (``ctx.monotonic``)."""
    assert e.vip_id
    last = memo.kill_sent.get(e.key)
    if last is None or now - last >= KILL_REPEAT:
        if last is None:
            ctx.journal.event(
                ds.id,
                f"execution {e.vip_id} ({e.key}) has read Unknown since "
                f"{clock_text(wall_time(ctx, since))} "
                f"(limit {duration(limit)}): killing it; its inputs stay on the "
                "server until VIP confirms it ended",
                level="error",
            )
        try:
            engine.kill(e.vip_id)
        except NotFoundError:
            pass  # gone meanwhile: the next poll records it
        memo.kill_sent[e.key] = now
    memo.notice = (
        f"execution {e.vip_id} read Unknown since {clock_text(wall_time(ctx, since))}; "
        f"killed at {clock_text(wall_time(ctx, memo.kill_sent[e.key]))}, waiting for VIP to confirm it ended before "
        "cleaning up"
    )
