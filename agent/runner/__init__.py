"""The per-dataset state machine: validate, upload, launch, monitor, mirror, extract, cleanup.

A small machine (:mod:`agent.runner.machine`: ``Runner.step``) over one table of the stages
(:mod:`agent.runner.table`), one module per stage (``validate``, ``upload``, ``launch``,
``monitor``, ``mirror``, ``extract``, ``cleanup``; ``cancel`` for a cancel request at any
stage). Each step returns what happens next (``Advance`` to a stage with a message, ``Wait``
N seconds, ``Finish`` in a final stage); only the machine writes a stage. The steps speak to
the platform through the backend port (:mod:`agent.backend.port`), never to a client.
"""

from agent.runner.common import (
    BUSY_POLL,
    DEFAULT_PARALLELISM,
    DEFAULT_POLL_MAX,
    DEFAULT_POLL_MIN,
    DELETE_DEADLINE,
    GIVE_UP_AFTER,
    HISTORY_MIN_RUNS,
    HISTORY_RUNS,
    HISTORY_TTL,
    KILL_REPEAT,
    LOGS_DIR,
    MAX_POLL_RATE,
    STATUS_FILE,
    UNKNOWN_LIMIT,
    UPLOAD_GROUP_FILES,
    UPLOAD_GROUP_SECONDS,
    Advance,
    Finish,
    GaveUp,
    Interrupted,
    Next,
    Tuning,
    Wait,
    admit,
    on_grid,
    safe_token,
)
from agent.runner.machine import Runner, StepOutcome, status_record
from agent.runner.table import STAGE_POOL, TABLE, StageRow
from agent.runner.validate import unknown_pipeline

#: the former private name, still imported by tests
_on_grid = on_grid

__all__ = [
    "BUSY_POLL",
    "DEFAULT_PARALLELISM",
    "DEFAULT_POLL_MAX",
    "DEFAULT_POLL_MIN",
    "DELETE_DEADLINE",
    "GIVE_UP_AFTER",
    "HISTORY_MIN_RUNS",
    "HISTORY_RUNS",
    "HISTORY_TTL",
    "KILL_REPEAT",
    "LOGS_DIR",
    "MAX_POLL_RATE",
    "STAGE_POOL",
    "STATUS_FILE",
    "TABLE",
    "UNKNOWN_LIMIT",
    "UPLOAD_GROUP_FILES",
    "UPLOAD_GROUP_SECONDS",
    "Advance",
    "Finish",
    "GaveUp",
    "Interrupted",
    "Next",
    "Runner",
    "StageRow",
    "StepOutcome",
    "Tuning",
    "Wait",
    "admit",
    "on_grid",
    "safe_token",
    "status_record",
    "unknown_pipeline",
]
