"""CARMIN's execution status labels as typed statuses (VIP speaks CARMIN; so may other servers).

The labels are also the journal's vocabulary (``executions.status``): every backend reports
one of them (or ``Lost``, the agent's word for an execution the server no longer has).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.backend.port import LOST_LABEL, ExecStatus, RunState

#: CARMIN label -> what it means; a label not here is "strange": treated as running
LABELS: dict[str, RunState] = {
    "Initializing": RunState.RUNNING,
    "Ready": RunState.RUNNING,
    "Running": RunState.RUNNING,
    "Finished": RunState.FINISHED,
    "InitializationFailed": RunState.FAILED,
    "ExecutionFailed": RunState.FAILED,
    "Killed": RunState.KILLED,
    # the engine lost track of it, or it is being killed: it may still run
    "Unknown": RunState.UNKNOWN,
    LOST_LABEL: RunState.LOST,
}
#: a job (GASW) that ended without a problem: completed, or a replica cancelled because
#: another replica of the same job completed
JOB_OK = frozenset({"COMPLETED", "CANCELLED_REPLICA"})


def classify(label: str | None) -> ExecStatus:
    """The typed status of a CARMIN label; an unknown word counts as running, since only
    a label that says so proves an execution ended."""
    text = str(label or "")
    state = LABELS.get(text)
    if state is None:
        return ExecStatus(RunState.RUNNING, text, recognised=False)
    return ExecStatus(state, text)


def job_problems(jobs: Mapping[str, Any]) -> list[str]:
    """The jobs of an execution that did not complete (VIP's per-job GASW statuses)."""
    return [
        str(j) for j, info in jobs.items()
        if isinstance(info, dict) and str(info.get("status")) not in JOB_OK
    ]
