"""Routing: which rule takes each series, why, and whether the study is complete for it.

Rules are tried in order; the first whose ``match:`` fits a series takes it. A
series no rule takes stays in the spool and is reported (never dropped).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.dicom.config import MATCH_REGEX, Route


@dataclass
class Series:
    """One series of a study as the spool knows it."""

    series_uid: str
    info: dict[str, Any]
    calling_ae: str = ""
    called_ae: str = ""
    objects: list[Any] = field(default_factory=list)

    @property
    def number(self) -> int:
        return int(self.info.get("SeriesNumber") or 0)

    @property
    def count(self) -> int:
        return len(self.objects)

    def label(self) -> str:
        desc = self.info.get("SeriesDescription") or self.info.get("ProtocolName") or ""
        return f"series {self.number} {desc!r} ({self.info.get('Modality', '?')}, {self.count} object(s))"


def group_series(objects: Iterable[Any]) -> list[Series]:
    """Objects (rows with ``series_uid`` and ``info``) grouped by series, in order."""
    out: dict[str, Series] = {}
    for obj in objects:
        s = out.get(obj.series_uid)
        if s is None:
            info = obj.info
            s = out[obj.series_uid] = Series(obj.series_uid, info, info.get("CallingAE", ""),
                                             info.get("CalledAE", ""))  # fmt: skip
        s.objects.append(obj)
    return sorted(out.values(), key=lambda s: (s.number, s.series_uid))


def _value(series: Series, key: str) -> Any:
    if key == "CallingAE":
        return series.calling_ae
    if key == "CalledAE":
        return series.called_ae
    return series.info.get(key)


def check(route: Route, series: Series) -> tuple[bool, str]:
    """Whether ``route`` takes ``series``, and the reason in words."""
    for key, wanted in route.match:
        value = _value(series, key)
        if key in MATCH_REGEX:
            text = "" if value is None else str(value)
            if not any(re.search(w, text) for w in wanted):
                return False, f"{key} {text!r} does not match {' or '.join(wanted)}"
        elif key == "ImageType":
            values = [value] if isinstance(value, str) else (value or [])
            have = {str(v).upper() for v in values}
            if not any({p.upper() for p in w.split("\\") if p} <= have for w in wanted):
                shown = "\\".join(sorted(have)) or "none"
                return False, f"ImageType {shown} lacks {' or '.join(wanted)}"
        elif str(value or "") not in wanted:
            return False, f"{key} {value!r} is not {' or '.join(wanted)}"
    if not route.match:
        return True, "the rule matches everything"
    return True, "matches " + ", ".join(f"{k}={'|'.join(v)}" for k, v in route.match)


def choose(routes: Sequence[Route], series: Series) -> tuple[Route | None, list[str]]:
    """The first route taking ``series`` and, for each route tried, why (not)."""
    reasons = []
    for route in routes:
        ok, why = check(route, series)
        reasons.append(f"{route.label}: {why}")
        if ok:
            return route, reasons
    return None, reasons


def waiting_for(route: Route, study_series: Sequence[Series], taken: Sequence[Series]) -> str | None:
    """Why a complete-by-quiet study is not complete yet for ``route`` (None: it is)."""
    for pattern in route.require_series:
        if not any(re.search(pattern, str(s.info.get("SeriesDescription") or ""))
                   or re.search(pattern, str(s.info.get("ProtocolName") or "")) for s in study_series):  # fmt: skip
            return f"no series matching {pattern!r} yet"
    if route.expect_counts:
        for s in taken:
            expected = s.info.get("NumberOfSeriesRelatedInstances")
            if expected and s.count < int(expected):
                return f"series {s.number}: {s.count} of {expected} objects announced"
        total = sum(s.count for s in study_series)
        announced = max((int(s.info.get("NumberOfStudyRelatedInstances") or 0) for s in study_series), default=0)
        if announced and total < announced:
            return f"{total} of {announced} objects announced for the study"
    return None


def plan(routes: Sequence[Route], series: Sequence[Series]) -> tuple[dict[int, list[Series]], list[Series]]:
    """Series grouped by the route that takes them, and the series no route takes."""
    taken: dict[int, list[Series]] = {}
    unrouted: list[Series] = []
    for s in series:
        route, _ = choose(routes, s)
        if route is None:
            unrouted.append(s)
        else:
            taken.setdefault(route.index, []).append(s)
    return taken, unrouted
