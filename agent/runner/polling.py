"""When to ask the server again about a dataset's running executions.

Short at first, then a tenth of the time the executions have run, between the dataset's
``poll`` minimum and maximum. While other launches wait for a slot (other datasets, or this
dataset's further runs), the running execution is checked every :data:`BUSY_POLL` seconds on
a grid of the dataset's own (:func:`agent.runner.common.on_grid`), so the next launch follows
its end within about a second; the status requests of one server then stay under
:data:`MAX_POLL_RATE` per second however many executions run, and, once the journal holds
:data:`HISTORY_MIN_RUNS` runs of the pipeline, only from shortly before the shortest of them.
"""

from __future__ import annotations

import time

from agent.journal import Dataset, Execution
from agent.runner.common import (
    BUSY_POLL,
    HISTORY_MIN_RUNS,
    HISTORY_RUNS,
    HISTORY_TTL,
    MAX_POLL_RATE,
    Context,
    Tuning,
    is_ended,
    on_grid,
)


def poll_interval(ctx: Context, ds: Dataset, executions: list[Execution]) -> float:
    """Seconds until the next status request for a dataset whose executions run."""
    tuning = ctx.tuning_for(ds) if ctx.tuning_for else Tuning()
    low = tuning.poll_min if tuning.poll_min is not None else ctx.poll_min
    high = max(low, tuning.poll_max if tuning.poll_max is not None else ctx.poll_max)
    # ``launched`` is a wall time stored in the journal (it must survive a restart, where no
    # monotonic reading would mean anything): a wall-clock jump can only move the interval
    # between the dataset's poll minimum and maximum, never decide anything
    now = ctx.clock()
    launched = [e.launched for e in executions if e.launched]
    elapsed = now - min(launched) if launched else 0.0
    interval = min(max(low, elapsed / 10), high)
    if interval > BUSY_POLL and launches_waiting(ctx, ds, executions):
        running = max(1, ctx.journal.running_executions(ds.server))
        busy = max(BUSY_POLL, running / MAX_POLL_RATE)
        quiet = quiet_for(ctx, ds, executions, busy)
        if quiet > busy:
            # no end expected yet: the usual interval, but look again when one may come
            interval = min(interval, quiet)
        else:
            interval = min(interval, on_grid(busy, ds.id, now))
    return interval


def quiet_for(ctx: Context, ds: Dataset, executions: list[Execution], busy: float) -> float:
    """Seconds before this dataset's running executions may end, judging by the shortest
    run of their pipeline seen on this server (less one busy interval, since an end is seen
    up to one poll late); 0 when no history says so."""
    pipeline = str((ds.job or {}).get("pipeline") or "")
    shortest = shortest_run(ctx, ds.server, pipeline)
    starts = [e.launched for e in executions
              if e.vip_id and e.launched and not is_ended(ctx, ds, e)]
    if shortest is None or not starts:
        return 0.0
    return max(0.0, min(starts) + shortest - busy - ctx.clock())


def shortest_run(ctx: Context, server: str, pipeline: str) -> float | None:
    """The shortest launch-to-end time among the latest runs of ``pipeline`` on ``server``;
    None until there are :data:`HISTORY_MIN_RUNS`. Cached :data:`HISTORY_TTL` seconds."""
    now = time.monotonic()
    with ctx.lock:
        cached = ctx.run_times.get(server)
    if cached is None or cached[0] < now:
        by_pipeline: dict[str, list[float]] = {}
        for name, seconds in ctx.journal.run_times(server, limit=4 * HISTORY_RUNS):
            by_pipeline.setdefault(name, []).append(seconds)
        cached = (now + HISTORY_TTL, by_pipeline)
        with ctx.lock:
            ctx.run_times[server] = cached
    runs = cached[1].get(pipeline, [])[:HISTORY_RUNS]
    return min(runs) if len(runs) >= HISTORY_MIN_RUNS else None


def launches_waiting(ctx: Context, ds: Dataset, executions: list[Execution]) -> bool:
    if any(not e.vip_id for e in executions):
        return True
    return ctx.journal.waiting_launches(ds.server) > 0
