"""What the service shows and tells: health, notifications, metrics, the status page.

:class:`Oversight` hangs off a running :class:`agent.daemon.WatchService`. It

* logs a dataset that ends ``failed`` or ``incomplete`` at ERROR (journald priority 3)
  and sends the drop folder's ``notify:`` alerts (``agent.alerts``) for final states;
* checks every ``interval`` seconds for servers that became paused (key refused) and
  output folders whose free space fell below ``disk_low``, and alerts once per change;
* builds the :class:`agent.health.Health` snapshot;
* serves the status page, its JSON API and ``/metrics`` when ``http:`` is configured.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.alerts import Alert, Alerts
from agent.config import DropConfig
from agent.health import DropHealth, Health, ServerChecker, ServerHealth, free_bytes
from agent.journal import Dataset
from agent.runner.failure import headline

if TYPE_CHECKING:
    from agent.daemon import WatchService
    from agent.web import StatusServer

log = logging.getLogger("vip_agent.watch")

#: final states that are the user's problem: logged at ERROR and alerted by default
BAD_FINAL = ("failed", "incomplete")


class Oversight:
    """Health, alerts, metrics and the status page of one service."""

    def __init__(self, service: WatchService, *, interval: float = 30.0, check_interval: float = 60.0) -> None:
        self.service = service
        self.interval = interval
        self.started = time.time()
        self.alerts = Alerts(secrets=self._secrets)
        self.checker = ServerChecker(service._probe, interval=check_interval)
        self.last_rescan: dict[str, float] = {}
        self.server: StatusServer | None = None
        self._paused: set[str] = set()
        self._low: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        http = self.service.config.http
        if http is not None:
            self.start_http(
                http.host, http.port, read_token=http.read_token, allowed_hosts=http.allowed_hosts,
                refresh=http.refresh,
            )  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name="vip-agent oversight", daemon=True)
        self._thread.start()

    def start_http(
        self, host: str, port: int, *, read_token: bool, allowed_hosts: tuple[str, ...], refresh: float = 1.0
    ) -> None:
        from agent.metrics import Metrics
        from agent.web import StatusServer
        from agent.web.source import JournalSource

        journal = self.service.journal
        assert journal is not None
        metrics = Metrics(journal, self.health)
        source = JournalSource(journal, self.health, metrics=metrics.render, after_action=self._after_action)
        try:
            self.server = StatusServer(
                source, state=self.service.config.state, host=host, port=port,
                read_token=read_token, allowed_hosts=allowed_hosts, poll_ms=int(refresh * 1000),
            )  # fmt: skip
        except OSError as err:
            from agent.errors import ConfigError

            raise ConfigError(
                f"cannot serve the status page on {host}:{port}: {err.strerror or err} "
                "(another program uses the port? change http: listen or --http)",
                detail="http.listen",
            ) from None
        self.server.start()

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.alerts.stop(timeout=2.0)

    # -- events from the service ---------------------------------------------------------
    def rescanned(self, drop_key: str) -> None:
        self.last_rescan[drop_key] = time.time()

    def dataset_final(self, ds: Dataset, drop: DropConfig | None) -> None:
        """A dataset reached a final state: log bad ends at ERROR, alert who asked."""
        state = ds.state
        if state in BAD_FINAL:
            log.error(
                "%s %s: %s%s", ds.name, state, headline(ds.error) or "no reason recorded",
                f" (outputs: {ds.output_dir})" if ds.output_dir else "",
            )  # fmt: skip
        if drop is None or not drop.notify:
            return
        self.alerts.send(drop.notify, Alert(
            event=state, name=ds.name, state=state, error=ds.error or "", output=ds.output_dir or "",
            drop=str(drop.path), server=ds.server, dataset_id=ds.id,
        ))  # fmt: skip

    def _after_action(self, dataset_id: int) -> None:
        scheduler = self.service.scheduler
        if scheduler is not None:
            scheduler.submit(dataset_id)
            scheduler.wake(dataset_id)

    def _secrets(self) -> list[str]:
        provider = self.service.provider
        if provider is None:
            return []
        return [key for key, _client in list(provider._clients.values())]

    # -- periodic checks -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.interval if self.interval > 0 else 30.0):
            try:
                self.check()
            except Exception:  # a check must never stop the agent
                log.exception("health check failed")

    def check(self) -> None:
        """Alert on servers newly paused and output folders newly low on disk."""
        scheduler = self.service.scheduler
        drops = list(self.service.config.drops)
        paused = scheduler.paused_servers() if scheduler is not None else {}
        for server, reason in paused.items():
            if server not in self._paused:
                for d in drops:
                    if d.server == server and d.notify:
                        self.alerts.send(d.notify, Alert(
                            event="paused", name=server, state="paused", error=reason,
                            drop=str(d.path), server=server,
                        ))  # fmt: skip
        self._paused = set(paused)
        low = set()
        for d in drops:
            free = free_bytes(d.output)
            if free is not None and free < d.disk_low:
                low.add(str(d.path))
                if str(d.path) not in self._low:
                    message = (
                        f"only {free / 1e9:.2f} GB free for {d.output} (disk_low: {d.disk_low / 1e9:g} GB); "
                        "datasets wait when the disk is full"
                    )
                    log.warning("%s", message)
                    if d.notify:
                        self.alerts.send(d.notify, Alert(
                            event="disk_low", name=str(d.output), state="disk_low", error=message,
                            output=str(d.output), drop=str(d.path), server=d.server,
                        ))  # fmt: skip
        self._low = low

    # -- health --------------------------------------------------------------------------
    def health(self) -> Health:
        service = self.service
        paused = service.scheduler.paused_servers() if service.scheduler is not None else {}
        drops = []
        for d in service.config.drops:
            key = str(d.path)
            other = service.claimed_by.get(key)
            idle = f"not watched: claimed by agent {other}" if other else "not watched"
            observer = service.observers.get(key, (None, idle))[1]
            free = free_bytes(d.output)
            drops.append(DropHealth(
                path=key, server=d.server, output=str(d.output), observer=observer, free_bytes=free,
                disk_low=free is not None and free < d.disk_low, last_rescan=self.last_rescan.get(key),
                max_running=d.limits.max_running,
            ))  # fmt: skip
        servers = []
        for url in sorted({d.server for d in service.config.drops}):
            c = self.checker.get(url)
            key_state = "refused" if url in paused else c.key
            servers.append(ServerHealth(
                url=url, reachable=c.reachable, key=key_state, paused=paused.get(url), checked=c.checked,
                message=c.message,
            ))  # fmt: skip
        state = service.config.state
        return Health(
            version=__version__, started=self.started, state=str(state), state_free=free_bytes(state),
            drops=drops, servers=servers,
        )

    def describe(self) -> dict[str, Any]:
        return self.health().to_json()
