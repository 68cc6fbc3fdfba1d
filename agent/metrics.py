"""Prometheus metrics at ``/metrics`` (``prometheus_client``, text format).

Everything is read from the journal and the health snapshot at scrape time, so no
other module has to report anything: gauges (datasets by state, queue depth, stage
ages, paused servers, disks, observers) are computed afresh; counters (bytes, launched
executions, failures) and stage-duration histograms grow by what changed in the
journal since the agent started. The names are listed in docs/monitoring.md.

``prometheus_client`` is used rather than hand-written text so that the exposition
format (escaping, histogram buckets, ``# TYPE`` lines, OpenMetrics) is right by
construction and matches what Prometheus expects of every other exporter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent import pause as user_pause
from agent.bandwidth import current_limits
from agent.dicom.status import NOT_HANDED, pending_studies, read_status
from agent.health import Health
from agent.journal import FINAL_STAGES, PUBLIC_STATE, Journal
from agent.pacer import budgets
from agent.timeline import FAILURE_KIND, segments

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: public states always exported (0 when none), so that alert rules never see "no data"
STATES = sorted({*PUBLIC_STATE.values(), "paused", "incomplete"})
#: stage durations: seconds to days
BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 3 * 86400)
#: stages in which a dataset has not started running yet (the queue)
QUEUED = ("waiting", "validate", "upload", "launch")
#: each server's budget (agent.pacer.ServerBudget.snapshot key -> metric name, help)
BUDGET_GAUGES = (
    ("max_rate", "vip_agent_server_max_requests_per_second",
     "The request ceiling on this server (0: none); docs/vip-rest.md, 'Pacing'"),
    ("tokens", "vip_agent_server_request_tokens", "Requests that may go at once now (the burst left)"),
    ("transfers_in_use", "vip_agent_server_transfers", "Transfers with this server in progress"),
    ("transfers_limit", "vip_agent_server_transfers_limit",
     "Concurrent transfers allowed now (below the maximum after the server's transfer timeouts)"),
    ("transfers_max", "vip_agent_server_transfers_max", "max_transfers_per_server for this server"),
    ("launch_wait", "vip_agent_server_launch_wait_seconds",
     "Seconds before launches on this server are tried again (backing off after 2001/2003)"),
)
BUDGET_COUNTERS = (
    ("requests_total", "vip_agent_server_requests", "Requests sent to this server"),
    ("waits_total", "vip_agent_server_request_waits", "Requests that waited for the request ceiling"),
    ("transfer_timeouts_total", "vip_agent_server_transfer_timeouts",
     "Transfers the server answered with its transfer timeout (400 8000)"),
    ("launches_refused_total", "vip_agent_server_launches_refused",
     "Launches refused for capacity or by a busy engine"),
)


def _public(stage: str, paused: bool) -> str:
    if paused and stage not in FINAL_STAGES:
        return "paused"
    return PUBLIC_STATE.get(stage, stage)


class Metrics:
    """The agent's metrics; :meth:`render` is the body of ``GET /metrics``."""

    def __init__(self, journal: Journal, health: Callable[[], Health]) -> None:
        self.journal = journal
        self.health = health
        self.started = time.time()
        # the *_created series double every counter for no use here
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self.uploaded = Counter(
            "vip_agent_uploaded_bytes", "Bytes of input files uploaded (verified) since start",
            ["drop"], registry=self.registry,
        )  # fmt: skip
        self.downloaded = Counter(
            "vip_agent_downloaded_bytes", "Bytes of outputs mirrored since start",
            ["drop"], registry=self.registry,
        )  # fmt: skip
        self.launched = Counter(
            "vip_agent_executions_launched", "Executions launched on VIP since start",
            ["drop", "server"], registry=self.registry,
        )  # fmt: skip
        self.failures = Counter(
            "vip_agent_failures", "Datasets that ended failed or incomplete, by the phase that failed",
            ["drop", "kind"], registry=self.registry,
        )  # fmt: skip
        self.finished = Counter(
            "vip_agent_datasets_finished", "Datasets that reached a final state since start",
            ["drop", "state"], registry=self.registry,
        )  # fmt: skip
        self.durations = Histogram(
            "vip_agent_stage_duration_seconds", "Time finished datasets spent in each phase",
            ["phase"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_Gauges(self))
        # what the journal already held at start: counted from here on only
        self._bytes_up = self._sums(_UPLOADED)
        self._bytes_down = self._sums(_DOWNLOADED)
        self._launched = self._sums(_LAUNCHED)
        self._seen_final: set[tuple[int, int]] = {
            (int(r["id"]), int(r["attempts"]))
            for r in self._rows("SELECT id, attempts FROM datasets WHERE finished IS NOT NULL")
        }

    # -- journal ---------------------------------------------------------------------
    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return list(self.journal._db().execute(sql, params))

    def _sums(self, sql: str) -> dict[tuple[int, int], tuple[str, str, int]]:
        return {
            (int(r[0]), int(r[1])): (r[2] or "", r[3] or "", int(r[4] or 0)) for r in self._rows(sql)
        }

    def _grow(self, sql: str, known: dict[tuple[int, int], tuple[str, str, int]],
              inc: Callable[[str, str, int], None]) -> None:  # fmt: skip
        for key, (drop, server, total) in self._sums(sql).items():
            before = known.get(key, ("", "", 0))[2]
            if total > before:
                inc(drop, server, total - before)
            known[key] = (drop, server, total)

    def refresh(self) -> None:
        """Grow counters and histograms by what the journal gained since the last scrape."""
        self._grow(_UPLOADED, self._bytes_up, lambda d, s, n: self.uploaded.labels(d).inc(n))
        self._grow(_DOWNLOADED, self._bytes_down, lambda d, s, n: self.downloaded.labels(d).inc(n))
        self._grow(_LAUNCHED, self._launched, lambda d, s, n: self.launched.labels(d, s).inc(n))
        rows = self._rows(
            "SELECT id, attempts, stage, drop_dir FROM datasets WHERE finished IS NOT NULL AND finished >= ?",
            (self.started - 1,),
        )
        for r in rows:
            key = (int(r["id"]), int(r["attempts"]))
            if key in self._seen_final:
                continue
            self._seen_final.add(key)
            drop, stage = r["drop_dir"] or "", r["stage"]
            self.finished.labels(drop, PUBLIC_STATE.get(stage, stage)).inc()
            segs = segments(self.journal.events(key[0], limit=5000))
            end = time.time()
            for seg in segs:
                self.durations.labels(seg.phase).observe(seg.duration(end))
            if stage in ("failed", "incomplete"):
                kind = "incomplete" if stage == "incomplete" else FAILURE_KIND.get(
                    segs[-1].phase if segs else "", "other"
                )
                self.failures.labels(drop, kind).inc()

    def render(self) -> bytes:
        with self._lock:
            self.refresh()
            return generate_latest(self.registry)


_UPLOADED = (
    "SELECT f.dataset_id, d.attempts, d.drop_dir, d.server, SUM(f.size) FROM files f"
    " JOIN datasets d ON d.id = f.dataset_id WHERE f.uploaded = 1 GROUP BY f.dataset_id"
)
_DOWNLOADED = (
    "SELECT o.dataset_id, d.attempts, d.drop_dir, d.server, SUM(COALESCE(o.size, 0)) FROM outputs o"
    " JOIN datasets d ON d.id = o.dataset_id WHERE o.downloaded = 1 GROUP BY o.dataset_id"
)
_LAUNCHED = (
    "SELECT e.dataset_id, d.attempts, d.drop_dir, d.server, COUNT(*) FROM executions e"
    " JOIN datasets d ON d.id = e.dataset_id WHERE e.vip_id IS NOT NULL GROUP BY e.dataset_id"
)


def _dicom_metrics(journal_path: Path) -> Iterator[Metric]:
    """The DICOM node's figures (only when one runs or ran with this state folder)."""
    node = read_status(journal_path.parent)
    if node is None:
        return
    counters = node.get("counters") or {}
    for name, key, text in (
        ("vip_agent_dicom_associations", "associations", "DICOM associations accepted since the agent started"),
        ("vip_agent_dicom_rejected_associations", "rejected", "DICOM associations rejected (allow-list)"),
        ("vip_agent_dicom_objects", "objects", "DICOM objects written to the spool since the agent started"),
        ("vip_agent_dicom_bytes", "bytes", "Bytes of DICOM objects written to the spool since the agent started"),
        ("vip_agent_dicom_refusals", "refusals", "DICOM objects refused (out of resources: disk below disk_low)"),
        ("vip_agent_dicom_duplicates", "duplicates", "DICOM objects received again (first copy kept)"),
        ("vip_agent_dicom_late_objects", "late", "DICOM objects arriving after their study was handed over"),
    ):  # fmt: skip
        c = CounterMetricFamily(name, text)
        c.add_metric([], float(counters.get(key, 0)))
        yield c
    up = GaugeMetricFamily("vip_agent_dicom_open_associations", "DICOM associations open now")
    up.add_metric([], float(node.get("open_associations", 0)))
    yield up
    prep = node.get("deidentify")
    if prep:
        for name, key, text in (
            ("vip_agent_dicom_deidentify_workers", "workers", "DICOM de-identification worker processes running"),
            ("vip_agent_dicom_deidentify_waiting", "waiting", "DICOM objects waiting to be de-identified ahead"),
        ):  # fmt: skip
            g = GaugeMetricFamily(name, text)
            g.add_metric([], float(prep.get(key, 0)))
            yield g
    studies = GaugeMetricFamily("vip_agent_dicom_studies_pending",
                                "DICOM studies in the spool not handed over, by state", labels=["state"])  # fmt: skip
    by_state: dict[str, int] = dict.fromkeys(NOT_HANDED, 0)
    for study in pending_studies(journal_path):
        by_state[study["state"]] = by_state.get(study["state"], 0) + 1
    for state, n in sorted(by_state.items()):
        studies.add_metric([state], n)
    yield studies


class _Gauges(Collector):
    """Gauges computed at scrape time from the journal and the health snapshot."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.m
        health = m.health()
        drops = [d.path for d in health.drops]
        counts: dict[tuple[str, str], int] = {}
        for r in m._rows(
            "SELECT drop_dir, stage, paused IS NOT NULL AS p, COUNT(*) AS n FROM datasets"
            " GROUP BY drop_dir, stage, paused IS NOT NULL"
        ):
            key = (r["drop_dir"] or "", _public(r["stage"], bool(r["p"])))
            counts[key] = counts.get(key, 0) + int(r["n"])
        g = GaugeMetricFamily("vip_agent_datasets", "Datasets in the journal by state", labels=["state", "drop"])
        for drop in sorted({*drops, *(k[0] for k in counts)}):
            for state in sorted({*STATES, *(k[1] for k in counts if k[0] == drop)}):
                g.add_metric([state, drop], counts.get((drop, state), 0))
        yield g

        queue = GaugeMetricFamily(
            "vip_agent_queue_depth", "Unfinished datasets not running yet (waiting to validate, "
            "uploading, or waiting for an execution slot)", labels=["drop"],
        )  # fmt: skip
        age = GaugeMetricFamily(
            "vip_agent_stage_age_max_seconds",
            "Longest time an unfinished dataset has been in its current state", labels=["state", "drop"],
        )  # fmt: skip
        unfinished = m._rows(
            "SELECT id, stage, drop_dir, paused IS NOT NULL AS p, created FROM datasets"
            " WHERE finished IS NULL"
        )
        depth: dict[str, int] = dict.fromkeys(drops, 0)
        oldest: dict[tuple[str, str], float] = {}
        now = time.time()
        for r in unfinished:
            drop = r["drop_dir"] or ""
            if r["stage"] in QUEUED:
                depth[drop] = depth.get(drop, 0) + 1
            segs = segments(m.journal.events(int(r["id"]), limit=200))
            since = segs[-1].start if segs else float(r["created"])
            key = (_public(r["stage"], bool(r["p"])), drop)
            oldest[key] = max(oldest.get(key, 0.0), now - since)
        for drop, n in sorted(depth.items()):
            queue.add_metric([drop], n)
        for (state, drop), seconds in sorted(oldest.items()):
            age.add_metric([state, drop], seconds)
        yield queue
        yield age

        last = GaugeMetricFamily(
            "vip_agent_last_success_timestamp_seconds",
            "When a dataset of this drop folder last ended done (Unix time)", labels=["drop"],
        )  # fmt: skip
        for r in m._rows("SELECT drop_dir, MAX(finished) AS t FROM datasets WHERE stage='done' GROUP BY drop_dir"):
            last.add_metric([r["drop_dir"] or ""], float(r["t"]))
        yield last

        paused = GaugeMetricFamily("vip_agent_paused_servers", "Servers whose API key is refused (datasets wait)")
        paused.add_metric([], sum(1 for s in health.servers if s.paused))
        yield paused
        yield from _dicom_metrics(m.journal.path)
        server_paused = GaugeMetricFamily(
            "vip_agent_server_paused", "1 when this server's datasets are paused (key refused)", labels=["server"]
        )  # fmt: skip
        up = GaugeMetricFamily(
            "vip_agent_server_reachable", "1 when the last check reached the server", labels=["server"]
        )  # fmt: skip
        key_ok = GaugeMetricFamily(
            "vip_agent_server_key_accepted", "1 when the server accepted the API key at the last check",
            labels=["server"],
        )  # fmt: skip
        for s in health.servers:
            server_paused.add_metric([s.url], 1 if s.paused else 0)
            if s.reachable is not None:
                up.add_metric([s.url], 1 if s.reachable else 0)
            if s.key in ("accepted", "refused", "missing"):
                key_ok.add_metric([s.url], 1 if s.key == "accepted" else 0)
        yield server_paused
        yield up
        yield key_ok

        observer = GaugeMetricFamily(
            "vip_agent_observer_native", "1: native file events; 0: polling; -1: not watched", labels=["drop"]
        )  # fmt: skip
        disk = GaugeMetricFamily(
            "vip_agent_free_disk_bytes", "Free space where outputs (or the state) are written",
            labels=["drop", "path"],
        )  # fmt: skip
        disk_low = GaugeMetricFamily(
            "vip_agent_disk_low", "1 when free space is below the drop folder's disk_low", labels=["drop"]
        )  # fmt: skip
        rescan = GaugeMetricFamily(
            "vip_agent_last_rescan_timestamp_seconds", "Last full scan of the drop folder", labels=["drop"]
        )  # fmt: skip
        for d in health.drops:
            observer.add_metric([d.path], {"native": 1, "polling": 0}.get(d.observer, -1))
            if d.free_bytes is not None:
                disk.add_metric([d.path, d.output], d.free_bytes)
            disk_low.add_metric([d.path], 1 if d.disk_low else 0)
            if d.last_rescan is not None:
                rescan.add_metric([d.path], d.last_rescan)
        if health.state_free is not None:
            disk.add_metric(["", health.state], health.state_free)
        yield observer
        yield disk
        yield disk_low
        yield rescan

        held = user_pause.read(m.journal)
        paused_by_user = GaugeMetricFamily(
            "vip_agent_paused", "1 while a user pause holds this scope (vip-agent pause): the whole agent "
            "(scope agent), a drop folder (scope drop), a dataset (scope dataset, target #ID)",
            labels=["scope", "target"],
        )  # fmt: skip
        paused_by_user.add_metric(["agent", ""], 1 if held.agent() else 0)
        for drop in sorted({*drops, *(p.target for p in held.rows if p.scope == "drop")}):
            paused_by_user.add_metric(["drop", drop], 1 if held.drop(drop) else 0)
        for p in held.rows:
            if p.scope == "dataset":
                paused_by_user.add_metric(["dataset", f"#{p.target}"], 1)
        yield paused_by_user
        limit = GaugeMetricFamily(
            "vip_agent_bandwidth_limit_bytes_per_second",
            "The bandwidth limit in force now per server and direction (0: none; agent.yaml bandwidth:)",
            labels=["server", "direction"],
        )  # fmt: skip
        for server, rates in sorted(current_limits().items()):
            for direction, rate in sorted(rates.items()):
                limit.add_metric([server, direction], rate or 0.0)
        yield limit
        yield from _budget_metrics()

        info = GaugeMetricFamily("vip_agent_info", "The agent's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        start = GaugeMetricFamily("vip_agent_start_time_seconds", "When the agent started (Unix time)")
        start.add_metric([], m.started)
        yield start


def _budget_metrics() -> Iterator[Metric]:
    """Each server's pacing budget (agent.pacer) as this process uses it."""
    snapshots = [(b.server, b.snapshot()) for b in budgets()]
    for key, name, text in BUDGET_GAUGES:
        gauge = GaugeMetricFamily(name, text, labels=["server"])
        for server, snap in snapshots:
            gauge.add_metric([server], snap[key])
        yield gauge
    for key, name, text in BUDGET_COUNTERS:
        counter = CounterMetricFamily(name, text, labels=["server"])
        for server, snap in snapshots:
            counter.add_metric([server], snap[key])
        yield counter
