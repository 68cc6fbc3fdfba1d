"""A dataset's stages as time segments, read from its journal events.

The journal records the stage of every event, so the moment a dataset entered a stage
is the first event carrying that stage after one carrying another. The status page
draws these segments (Gantt chart, stage timeline) and the metrics turn them into
stage-duration histograms. Only the latest attempt counts: a return from a final
stage to an early one (retry, run again) starts a new list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.journal import FINAL_STAGES

#: internal stage -> phase drawn on the timeline (several stages may share one)
PHASES = {
    "waiting": "waiting",
    "validate": "validate",
    "upload": "upload",
    "launch": "queue",
    "monitor": "run",
    "mirror": "download",
    "extract": "download",
    "cleanup": "cleanup",
}
#: phase -> failure kind for ``vip_agent_failures_total``
FAILURE_KIND = {
    "waiting": "input",
    "validate": "validation",
    "upload": "upload",
    "queue": "launch",
    "run": "execution",
    "download": "download",
    "cleanup": "cleanup",
}


class EventLike(Protocol):
    @property
    def time(self) -> float: ...
    @property
    def stage(self) -> str | None: ...


@dataclass
class Segment:
    stage: str
    start: float
    end: float | None  # None: still in it

    @property
    def phase(self) -> str:
        return PHASES.get(self.stage, self.stage)

    def duration(self, now: float) -> float:
        return max(0.0, (self.end if self.end is not None else now) - self.start)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "phase": self.phase, "start": self.start, "end": self.end}


def all_segments(events: Iterable[EventLike]) -> list[Segment]:
    """Every stage the events went through, final ones and earlier attempts included.

    A segment ends when the next one begins; the last one is still open (``end`` None).
    """
    out: list[Segment] = []
    for ev in events:
        if ev.stage is None or (out and out[-1].stage == ev.stage):
            continue
        if out:
            out[-1].end = ev.time
        out.append(Segment(ev.stage, ev.time, None))
    return out


def segments(events: Iterable[EventLike]) -> list[Segment]:
    """The stages of the latest attempt, in order; a final stage closes the last one."""
    segs = all_segments(events)
    # a return from a final stage to an earlier one starts a new attempt
    start = max(
        (i for i in range(1, len(segs))
         if segs[i - 1].stage in FINAL_STAGES and segs[i].stage not in FINAL_STAGES),
        default=0,
    )  # fmt: skip
    return [seg for seg in segs[start:] if seg.stage not in FINAL_STAGES]


def final_from(events: Iterable[EventLike]) -> str | None:
    """The phase a dataset was in when it reached its final stage (its failure kind)."""
    segs = segments(events)
    return segs[-1].phase if segs else None
