"""What holds datasets back in the scheduler: a user's pause (``vip-agent pause``, kept in
the journal by :mod:`agent.pause`) and a server whose API key was refused (its datasets wait
while the key is checked again on the ``auth_probe`` policy). Mixed into
:class:`agent.scheduler.Scheduler`, whose state it reads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import pause as user_pause
from agent.errors import CredentialError
from agent.journal import Journal
from agent.pacer import WaitPolicy
from agent.runner import Interrupted

if TYPE_CHECKING:
    from agent.scheduler import _Entry

log = logging.getLogger("vip_agent.scheduler")


@dataclass
class ServerPause:
    """A server whose key was refused: why, and when its key is checked again."""

    reason: str
    delay: float
    next_probe: float
    probing: bool = False
    attempts: int = 0  # failed probes so far (the auth_probe policy's attempt)


class Holds:
    """User pauses and refused keys: the scheduler's state they read and change."""

    journal: Journal
    stop_event: threading.Event
    clock: Callable[[], float]
    auth_retry: tuple[float, float]
    auth_policy: WaitPolicy
    probe: Callable[[str], None] | None
    _cond: threading.Condition
    _entries: dict[int, _Entry]
    _paused: dict[str, ServerPause]
    _held: user_pause.Pauses
    _cancels: set[int]

    def _spawn(self, fn: Callable[..., None], *args: Any, name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def probe_now(self) -> None:
        """Check paused servers' keys now (SIGHUP, or a key was fixed)."""
        with self._cond:
            for pause in self._paused.values():
                pause.next_probe = 0.0
                pause.delay, pause.attempts = self.auth_retry[0], 0
            self._cond.notify_all()

    def pause(self, server: str, reason: str) -> None:
        """Pause a server before any step failed (e.g. its key was refused at start-up)."""
        with self._cond:
            if server in self._paused:
                return
            first = self.auth_retry[0]
            self._paused[server] = ServerPause(reason, first, self.clock() + first)
            ids = []
            for x in self._entries.values():
                if x.server == server and x.state in ("ready", "timer"):
                    x.state = "paused"
                    ids.append(x.id)
        self._mark_paused(ids, reason)

    def paused_servers(self) -> dict[str, str]:
        with self._cond:
            return {s: p.reason for s, p in self._paused.items()}

    # -- user pauses (agent/pause.py) ----------------------------------------------------
    def refresh_pauses(self) -> None:
        """Re-read what users paused; mark the datasets it holds (``paused``) and free the others."""
        user_pause.sync(self.journal, self._read_pauses())

    def _read_pauses(self) -> user_pause.Pauses:
        current = user_pause.read(self.journal)
        with self._cond:
            before, self._held = self._held, current
            if current != before:
                self._cond.notify_all()
        if current != before:
            for p in current.rows:
                if p not in before.rows:
                    log.info("%s paused by %s (%s): nothing new starts there until `%s`",
                             p.what(), p.by, p.via, p.resume_command())  # fmt: skip
            for p in before.rows:
                if (p.scope, p.target) not in {(q.scope, q.target) for q in current.rows}:
                    log.info("%s resumed", p.what())
        return current

    def _holds(self, e: _Entry) -> bool:
        """Whether a user pause holds the dataset (a cancel request passes it)."""
        return e.id not in self._cancels and self._held.holding(e.id, e.group or None) is not None

    def check_transfer(self, dataset_id: int, *_progress: Any) -> None:
        """The runner's progress hook: a transfer of a dataset paused meanwhile stops at this
        chunk (files already sent are kept; the one in flight is sent again on resume)."""
        e = self._entries.get(dataset_id)
        if e is not None and self._holds(e) and not self.stop_event.is_set():
            raise Interrupted("paused: the transfer stops here and resumes on `vip-agent resume`")

    # -- authentication pause --------------------------------------------------------
    def _pause_locked(self, e: _Entry, err: CredentialError) -> str:
        e.state = "paused"
        if e.server in self._paused:
            return self._paused[e.server].reason
        reason = f"API key refused by {e.server}: {err.message}"
        first = self.auth_retry[0]
        self._paused[e.server] = ServerPause(reason, first, self.clock() + first)
        others = [x for x in self._entries.values() if x.server == e.server and x is not e]
        for x in others:
            if x.state in ("ready", "timer"):
                x.state = "paused"
        log.error(
            "%s; pausing every dataset of this server (%d). Fix the key (vip-agent login, the "
            "key file or VIP_API_KEY); the agent checks it again every %g s or at once on SIGHUP",
            reason, len(others) + 1, first,
        )  # fmt: skip
        ids = [x.id for x in others]
        self._spawn(self._mark_paused, ids, reason, name="pause")
        return reason

    def _mark_paused(self, ids: list[int], reason: str) -> None:
        for i in ids:
            self.journal.update(i, paused=reason)

    def _probe(self, server: str) -> None:
        ok = False
        try:
            if self.probe is not None:
                self.probe(server)
            ok = True
        except CredentialError as err:
            log.debug("key for %s still refused: %s", server, err.message)
        except Exception as err:  # outage while probing: keep paused, try later
            log.debug("could not check the key for %s: %s", server, err)
        resumed: list[_Entry] = []
        with self._cond:
            pause = self._paused.get(server)
            if pause is None:
                return
            pause.probing = False
            if not ok:
                pause.attempts += 1
                pause.delay = self.auth_policy.delay(pause.attempts)
                pause.next_probe = self.clock() + pause.delay
            else:
                del self._paused[server]
                for x in self._entries.values():
                    if x.server == server and x.state == "paused":
                        x.state = "ready"
                        resumed.append(x)
            self._cond.notify_all()
        if ok:
            for x in resumed:
                self.journal.update(x.id, paused=None)
            user_pause.sync(self.journal, self._held)  # what users paused stays paused
            log.info("the API key for %s works again: resuming %d dataset(s)", server, len(resumed))
