"""Tell people: webhooks, commands and e-mail when a dataset fails (and other events).

Configured per drop folder (``notify:`` in agent.yaml, see ``agent.config.NotifyRule``).
Each delivery runs in a daemon thread of its own, so a slow or dead receiver never
blocks the agent; a failed delivery is logged (at WARNING) and never fails a dataset.
Not to be confused with ``agent.notify``, the systemd notify protocol.

The API key never leaves through here: the payload is built from the journal (which
never holds it), a command gets an environment built from scratch, and e-mail carries
the same text as the webhook.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import smtplib
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

from agent.config import EmailSettings, NotifyRule
from agent.errors import AgentError, CredentialError
from agent.pacer import policy

log = logging.getLogger("vip_agent.alerts")

#: at most this many deliveries in flight; more are dropped (and logged)
MAX_IN_FLIGHT = 32
#: environment variables copied into a command's environment (nothing else is)
_PASS_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT")
#: systemd credential holding the SMTP password (``LoadCredential=vip-agent-smtp:...``)
SMTP_CREDENTIAL = "vip-agent-smtp"
#: environment variable holding the SMTP password
SMTP_ENV = "VIP_AGENT_SMTP_PASSWORD"
#: keyring service of the SMTP password (username: ``user@host``)
SMTP_KEYRING = "vip-agent-smtp"


class NotificationError(AgentError):
    """A notification could not be delivered (logged; never fails a dataset)."""


@dataclass(frozen=True)
class Alert:
    """What happened: the payload of every notification."""

    event: str  # failed | incomplete | paused | done | disk_low
    name: str  # the dataset (or the server / folder for paused and disk_low)
    state: str
    error: str = ""
    output: str = ""
    drop: str = ""
    server: str = ""
    dataset_id: int | None = None
    time: float = 0.0

    @property
    def text(self) -> str:
        """The human text (Slack, Mattermost and Teams show the ``text`` field): a headline,
        the error (with a failed job's last stderr lines, one per line), the outputs."""
        head = {
            "failed": f"vip-agent: dataset {self.name} failed",
            "incomplete": f"vip-agent: dataset {self.name} is incomplete (outputs left on VIP)",
            "done": f"vip-agent: dataset {self.name} is done",
            "paused": f"vip-agent: paused: the API key is refused by {self.server or self.name}",
            "disk_low": f"vip-agent: disk low for {self.name}",
        }.get(self.event, f"vip-agent: {self.name}: {self.event}")
        parts = [head]
        if self.error:
            parts.append(self.error)
        if self.output and self.event in ("done", "incomplete", "failed"):
            parts.append(f"outputs: {self.output}")
        return "\n".join(parts)

    def payload(self) -> dict[str, Any]:
        body = asdict(self)
        body["text"] = self.text
        body["time"] = self.time or time.time()
        return body

    def environment(self) -> dict[str, str]:
        """``VIP_AGENT_*`` variables for a command."""
        return {
            "VIP_AGENT_EVENT": self.event,
            "VIP_AGENT_NAME": self.name,
            "VIP_AGENT_STATE": self.state,
            "VIP_AGENT_ERROR": self.error,
            "VIP_AGENT_OUTPUT": self.output,
            "VIP_AGENT_DROP": self.drop,
            "VIP_AGENT_SERVER": self.server,
            "VIP_AGENT_DATASET_ID": "" if self.dataset_id is None else str(self.dataset_id),
            "VIP_AGENT_TEXT": self.text,
        }


def safe_url(url: str) -> str:
    """A webhook URL fit for a log line: its path often is the secret (Slack, Teams)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/…"


def command_env(alert: Alert, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A command's environment, from scratch: a few harmless variables and the alert's."""
    source = os.environ if base is None else base
    env = {k: source[k] for k in _PASS_ENV if k in source}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(alert.environment())
    return env


def find_smtp_password(settings: EmailSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The SMTP password, looked for like the API key (:func:`agent.credentials.find_secret`):
    systemd credential, a 0600 ``password_file``, ``VIP_AGENT_SMTP_PASSWORD``, the OS keyring
    (``vip-agent-smtp`` / ``user@host``)."""
    from agent.credentials import SecretNotFound, find_secret

    if not settings.user:
        return None
    try:
        return find_secret(
            credential=SMTP_CREDENTIAL, env_var=SMTP_ENV, keyring_service=SMTP_KEYRING,
            keyring_user=f"{settings.user}@{settings.host}", key_file=settings.password_file,
            file_key="password_file", env=env,
        ).key  # fmt: skip
    except SecretNotFound as missing:
        raise CredentialError(
            f"no SMTP password for {settings.user}@{settings.host}: give it as the systemd credential "
            f"{SMTP_CREDENTIAL}, a chmod 600 file named by password_file:, {SMTP_ENV}, or the keyring "
            f"entry {SMTP_KEYRING}/{settings.user}@{settings.host}",
            detail=missing.detail,
        ) from None


class Alerts:
    """Deliver alerts in background threads; :meth:`send` never blocks."""

    def __init__(
        self,
        *,
        backoff: Sequence[float] | None = None,
        webhook_timeout: float = 10.0,
        secrets: Callable[[], Iterable[str]] = lambda: (),
    ) -> None:
        #: fixed pauses between webhook attempts (tests); None: the ``webhook`` wait policy
        #: (agent.pacer), re-sending until its deadline
        self.backoff = tuple(backoff) if backoff is not None else None
        self.webhook_timeout = webhook_timeout
        #: values that must never leave (the API keys in use): checked before anything is sent
        self.secrets = secrets
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        #: deliveries done, for tests and the status page: (kind, event, ok)
        self.delivered: list[tuple[str, str, bool]] = []

    def send(self, rules: Iterable[NotifyRule], alert: Alert) -> int:
        """Start delivering ``alert`` to every rule that wants its event; returns how many."""
        if not alert.time:
            alert = Alert(**{**asdict(alert), "time": time.time()})
        started = 0
        for rule in rules:
            if alert.event not in rule.on:
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("too many notifications in flight; dropping %s for %s", alert.event, alert.name)
                continue
            t = threading.Thread(
                target=self._deliver, args=(rule, alert), name=f"vip-agent notify {alert.event}", daemon=True
            )
            with self._lock:
                self._threads.add(t)
            t.start()
            started += 1
        return started

    def stop(self, timeout: float = 2.0) -> None:
        """Stop retrying; wait a little for deliveries in flight."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- delivery ------------------------------------------------------------------
    def _deliver(self, rule: NotifyRule, alert: Alert) -> None:
        kind = "webhook" if rule.webhook else "command" if rule.command else "email"
        ok = False
        try:
            self._check_clean(alert)
            if rule.webhook:
                self._webhook(rule.webhook, alert, rule.timeout)
            elif rule.command:
                self._command(rule.command, alert, rule.timeout)
            elif rule.email:
                self._email(rule.email, alert, rule.timeout)
            ok = True
        except AgentError as err:
            log.warning("notification (%s, %s of %s) not delivered: %s", kind, alert.event, alert.name, err.message)
        except Exception as err:  # a notification must never take anything down
            log.warning("notification (%s, %s of %s) not delivered: %s", kind, alert.event, alert.name, err)
        finally:
            with self._lock:
                self.delivered.append((kind, alert.event, ok))
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _check_clean(self, alert: Alert) -> None:
        text = repr(alert.payload())
        for secret in self.secrets():
            if secret and secret in text:
                raise NotificationError("refusing to send a notification that contains an API key")

    def _webhook(self, url: str, alert: Alert, limit: float) -> None:
        import requests

        body = alert.payload()
        rule = policy("webhook")
        pauses: Iterator[float | None]
        if self.backoff is not None:
            pauses, patience = iter((*self.backoff, None)), sum(self.backoff)
        else:
            pauses, patience = (rule.delay(a) for a in itertools.count()), rule.deadline or 0.0
        deadline = time.monotonic() + max(limit, 1.0) + patience
        problem = ""
        for attempt, pause in enumerate(pauses):
            try:
                r = requests.post(url, json=body, timeout=self.webhook_timeout, allow_redirects=False)
                if r.status_code < 300:
                    log.info("notified %s of %s (%s)", safe_url(url), alert.name, alert.event)
                    return
                problem = f"HTTP {r.status_code}"
                if r.status_code < 500 and r.status_code not in (408, 429):
                    break  # the receiver refuses this message: retrying would not help
            except requests.RequestException as err:
                problem = type(err).__name__
            if pause is None or self._stop.wait(pause) or time.monotonic() > deadline:
                break
            log.debug("webhook %s: %s; attempt %d again in %g s", safe_url(url), problem, attempt + 2, pause)
        raise NotificationError(f"webhook {safe_url(url)} failed: {problem}")

    def _command(self, argv: Sequence[str], alert: Alert, limit: float) -> None:
        try:
            proc = subprocess.Popen(
                list(argv),
                env=command_env(alert),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that a time-out kills its children too
            )
        except OSError as err:
            raise NotificationError(f"cannot start {argv[0]}: {err.strerror or err}") from None
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise NotificationError(f"{argv[0]} did not finish within {limit:g} s; killed") from None
        if proc.returncode != 0:
            tail = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
            raise NotificationError(
                f"{argv[0]} exited with {proc.returncode}" + (f": {tail[0]}" if tail else "")
            )
        log.info("notified %s of %s (%s)", argv[0], alert.name, alert.event)

    def _email(self, settings: EmailSettings, alert: Alert, limit: float) -> None:
        msg = EmailMessage()
        msg["Subject"] = alert.text.splitlines()[0]
        msg["From"] = settings.sender
        msg["To"] = ", ".join(settings.to)
        msg.set_content(alert.text + "\n")
        password = find_smtp_password(settings)
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        try:
            with smtplib.SMTP(settings.host, settings.port, timeout=limit) as smtp:
                smtp.ehlo()
                if settings.starttls:
                    smtp.starttls(context=context)
                    smtp.ehlo()
                if settings.user and password is not None:
                    smtp.login(settings.user, password)
                smtp.send_message(msg)
        except (smtplib.SMTPException, OSError, ssl.SSLError) as err:
            text = str(err)
            if password:
                text = text.replace(password, "***")
            raise NotificationError(f"e-mail via {settings.host}:{settings.port} failed: {text}") from None
        log.info("e-mailed %s about %s (%s)", ", ".join(settings.to), alert.name, alert.event)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True
