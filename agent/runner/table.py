"""The one table of the stages: legal next stages, public state, worker pool, step function.

The legal changes and the public states are the journal's (``agent.journal.TRANSITIONS``,
``PUBLIC_STATE``: it enforces them on every write); the table puts them beside what the
runner adds, so that every fact about a stage is read from one row. A non-final stage
without a step is a bug that ``tests/test_runner_table.py`` catches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.journal import FINAL_STAGES, PUBLIC_STATE, TRANSITIONS, Dataset, Stage
from agent.runner import cleanup, extract, launch, mirror, monitor, upload, validate
from agent.runner.common import Context, Next, Wait

StepFn = Callable[[Context, Dataset], Next]


def _waiting(ctx: Context, ds: Dataset) -> Next:
    """A dataset still being written: the watcher admits it (to ``validate``), not the runner."""
    return Wait(1.0)


@dataclass(frozen=True)
class StageRow:
    stage: Stage
    #: what ``vip-agent status`` shows
    state: str
    #: the scheduler's worker pool for a step of this stage
    pool: str
    #: the stages this one may change to (the journal refuses any other)
    to: frozenset[Stage]
    #: performs one bounded slice of the stage; None for the final stages
    step: StepFn | None


def _row(stage: Stage, pool: str, step: StepFn | None) -> StageRow:
    return StageRow(stage, PUBLIC_STATE[stage.value], pool, TRANSITIONS[stage], step)


TABLE: dict[Stage, StageRow] = {
    row.stage: row
    for row in (
        _row(Stage.WAITING, "local", _waiting),
        _row(Stage.VALIDATE, "local", validate.step),
        _row(Stage.UPLOAD, "upload", upload.step),
        _row(Stage.LAUNCH, "launch", launch.step),
        _row(Stage.MONITOR, "monitor", monitor.step),
        _row(Stage.MIRROR, "download", mirror.step),
        _row(Stage.EXTRACT, "local", extract.step),
        _row(Stage.CLEANUP, "local", cleanup.step),
        *(_row(s, "local", None) for s in sorted(FINAL_STAGES)),
    )
}

#: which worker pool a stage needs (the scheduler limits each pool)
STAGE_POOL: dict[str, str] = {s.value: row.pool for s, row in TABLE.items() if row.step}
