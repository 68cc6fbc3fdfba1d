"""What the status page shows and does, on top of the journal (``agent.web.StatusSource``).

Reads go through :mod:`agent.queries` (so ``/api/datasets`` is exactly ``vip-agent
status --json``) and actions through :mod:`agent.actions` (the same as the CLI's).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.backend.port import ENGINE_WAIT
from agent.dicom.status import dicom_view
from agent.health import Health
from agent.journal import PUBLIC_STATE, UPLOAD_HELD, Dataset, Journal
from agent.timeline import segments

#: bytes of each execution log shown on the page (its end)
LOG_TAIL = 64 * 1024
MAX_LOGS = 20


class JournalSource:
    """A :class:`agent.web.StatusSource` for a running service."""

    def __init__(
        self,
        journal: Journal,
        health: Callable[[], Health],
        *,
        metrics: Callable[[], bytes] | None = None,
        after_action: Callable[[int], None] | None = None,
    ) -> None:
        self.journal = journal
        self._health = health
        self._metrics = metrics
        #: tells the scheduler to look at a dataset now (instead of at its next journal poll)
        self.after_action = after_action

    def datasets(self) -> list[dict[str, Any]]:
        from agent.queries import list_records

        return list_records(self.journal)

    def recent(self, limit: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
        from agent.queries import record

        rows = self.journal.datasets(
            where="finished IS NULL OR id IN (SELECT id FROM datasets WHERE finished IS NOT NULL"
            " ORDER BY id DESC LIMIT ?)",
            params=(limit,),
        )
        counts: dict[str, dict[str, int]] = {"*": {}}
        sql = (
            "SELECT drop_dir, stage, paused IS NOT NULL AND finished IS NULL AS p, COUNT(*) AS n"
            " FROM datasets GROUP BY drop_dir, stage, p"
        )
        for r in self.journal._db().execute(sql):
            state = "paused" if r["p"] else PUBLIC_STATE.get(r["stage"], r["stage"])
            for key in {"*", r["drop_dir"] or ""}:
                counts.setdefault(key, {})
                counts[key][state] = counts[key].get(state, 0) + int(r["n"])
        records = [record(self.journal, d) for d in rows]
        health = self.health()
        running: dict[str, int] = {}
        for ds, rec in zip(rows, records, strict=True):
            if ds.server not in running and not ds.final:
                running[ds.server] = self.journal.running_executions(ds.server)
            unlaunched = rec.get("state") == "queued" and any(
                not e.vip_id for e in self.journal.executions(ds.id)
            )
            why = waiting_for(ds, rec, health, running.get(ds.server, 0), unlaunched)
            if why:
                rec["waiting_for"] = why
        return records, counts

    def dataset(self, dataset_id: int) -> dict[str, Any]:
        from agent.queries import detail

        ds = self.journal.get(dataset_id)  # KeyError: 404
        rec = detail(self.journal, ds)
        rec["segments"] = [s.to_json() for s in segments(self.journal.events(ds.id, limit=100_000))]
        rec["log_texts"] = [_tail(Path(p)) for p in list(rec.get("logs") or [])[:MAX_LOGS]]
        return rec

    def timeline(self, limit: int) -> list[dict[str, Any]]:
        rows = self.journal.datasets(
            where="id IN (SELECT id FROM datasets WHERE stage != 'waiting' ORDER BY id DESC LIMIT ?)",
            params=(limit,),
        )
        out = []
        for ds in rows:
            segs = segments(self.journal.events(ds.id, limit=5000))
            out.append({
                "id": ds.id, "name": ds.name, "state": ds.state, "created": ds.created,
                "finished": ds.finished, "segments": [s.to_json() for s in segs],
            })  # fmt: skip
        return out

    def health(self) -> dict[str, Any]:
        from agent import pause
        from agent.bandwidth import current_limits

        out = self._health().to_json()
        # what users paused, and each server's bandwidth limit now (bytes/s; None: none)
        out["pauses"] = [p.to_json() for p in pause.read(self.journal).rows]
        out["bandwidth"] = current_limits()
        out["dicom"] = dicom_view(self.journal.path)  # None: no DICOM node
        return out

    def pause_scope(self, action: str, drop: str | None) -> str:
        """Pause or resume a drop folder (its path) or, with None, the whole agent."""
        from agent import pause

        target = None
        if drop is not None:
            target = pause.drop_target(self.journal, drop, [d.path for d in self._health().drops])
        return pause.request(self.journal, action, drop=target, by="a status page user", via="status page")

    def act(self, action: str, dataset_id: int) -> str:
        from agent.actions import cancel, rerun, retry

        ds = self.journal.get(dataset_id)
        if action in ("pause", "resume"):
            from agent import pause

            message = pause.request(self.journal, action, dataset=ds, by="a status page user", via="status page")
        elif action == "retry":
            retry(self.journal, ds)
            message = (
                f"{ds.name}: fetching the outputs left on VIP" if ds.stage == "incomplete"
                else f"{ds.name}: retry requested (a new attempt starts within seconds)"
            )
        elif action == "rerun":
            rerun(self.journal, ds)
            message = f"{ds.name}: runs again as a new attempt"
        elif action == "cancel":
            outcome = cancel(self.journal, ds)
            message = {
                "final": f"{ds.name} had already ended ({ds.state})",
                "cancelled": f"{ds.name}: cancelled",
                "incomplete": f"{ds.name} is incomplete: nothing deleted; `vip-agent cancel "
                              f"{ds.name} --discard` deletes the outputs left on VIP",
            }.get(outcome, f"{ds.name}: cancel requested (the agent stops it and cleans the server)")
        else:
            raise KeyError(action)
        if self.after_action is not None:
            self.after_action(dataset_id)
        return message

    def metrics(self) -> bytes:
        if self._metrics is None:
            return b""
        return self._metrics()


#: how the runner's error starts when the output disk is full (the dataset waits, not fails)
DISK_FULL = "the disk is full"


def waiting_for(
    ds: Dataset, rec: dict[str, Any], health: dict[str, Any], running: int, unlaunched: bool
) -> str | None:
    """What a dataset that is not moving waits for, in words (the page's queued rows), or None.

    ``health`` is :meth:`JournalSource.health`'s; ``running`` how many executions the
    journal believes run on the dataset's server; ``unlaunched`` whether some of its
    executions are still to be launched. A full output disk (the runner waits and retries)
    counts in any state. The rules, first match wins: a pause
    (of the dataset, its drop folder or the agent: ``paused`` says whose), a paused server
    (key refused), the server's running cap (``max_running``), VIP's own queue. A dataset
    held back before its upload (``upload_ahead``), or whose launch VIP's engine refused for
    now (2003, 8000 "no ressources"), says so in the scheduler's or the runner's words.
    """
    if ds.final:
        return None
    if ds.paused:
        return f"paused: {ds.paused}"
    if (ds.error or "").startswith(DISK_FULL):  # the runner's words: it retries every minute
        return f"waiting for disk space: {ds.error}"
    if rec.get("state") != "queued":
        return None
    if (ds.error or "").startswith((UPLOAD_HELD, ENGINE_WAIT)):  # upload_ahead; a busy engine
        return ds.error
    server = next((s for s in health.get("servers") or [] if s.get("url") == ds.server), None)
    if server is not None and server.get("paused"):
        return f"waiting for the server: {server['paused']}"
    statuses = [s for s in (rec.get("execution_status") or {}).values()]
    caps = [int(d.get("max_running") or 1) for d in health.get("drops") or [] if d.get("server") == ds.server]
    cap = max(caps) if caps else None
    if unlaunched or not statuses:
        if cap is not None and running >= cap:
            return (
                f"waiting for a free slot: {running} of {cap} execution(s) running on "
                f"{_host(ds.server)} (max_running: {cap})"
            )
        return "waiting for its turn to launch"
    return f"queued on VIP ({', '.join(sorted({str(s) for s in statuses}))})"


def _host(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _tail(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            if size > LOG_TAIL:
                fh.seek(size - LOG_TAIL)
            data = fh.read(LOG_TAIL)
    except OSError as err:
        return {"path": str(path), "size": None, "text": f"(cannot read: {err.strerror or err})"}
    text = data.decode("utf-8", errors="replace")
    if size > LOG_TAIL:
        text = f"… (last {LOG_TAIL // 1024} KiB of {size} bytes)\n" + text
    return {"path": str(path), "size": size, "text": text}
