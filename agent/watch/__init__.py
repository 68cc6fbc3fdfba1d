"""Drop-folder watching: detection (``detect``), readiness rules (``readiness``),
identity and waiting datasets (``drop``), what happens afterwards (``after``),
and the one-agent-per-state lock (``lock``)."""

from agent.watch.detect import Candidates, DeadlineQueue, DropEventHandler, start_observer
from agent.watch.drop import DropFolder
from agent.watch.readiness import History, Snapshot, Verdict, judge, take_snapshot

__all__ = [
    "Candidates",
    "DeadlineQueue",
    "DropEventHandler",
    "DropFolder",
    "History",
    "Snapshot",
    "Verdict",
    "judge",
    "start_observer",
    "take_snapshot",
]
