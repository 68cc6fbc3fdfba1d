"""Notifications through real receivers: a local HTTP server for webhooks, a local SMTP
server with STARTTLS and AUTH (aiosmtpd), and real commands. None may receive the key."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import wait_for
from receivers import Receiver, Smtp

from agent.alerts import Alert, Alerts, command_env, find_smtp_password, safe_url
from agent.config import EmailSettings, NotifyRule, parse_config
from agent.errors import ConfigError

SECRET = "sekret-api-key-0123456789"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


ALERT = Alert(event="failed", name="scan01", state="failed", error="line one\nline two",
              output="/data/out/scan01", drop="/data/drop", server="http://vip", dataset_id=7)  # fmt: skip


def test_webhook_retries_with_backoff_and_never_blocks(receiver: Receiver) -> None:
    receiver.fail_first = 2
    receiver.gate = threading.Event()  # the receiver holds every request until released
    alerts = Alerts(backoff=(0.05, 0.05, 0.05))
    assert alerts.send([NotifyRule(frozenset({"failed"}), webhook=receiver.url)], ALERT) == 1
    # send() returned while the receiver still holds the first request: the caller never waits
    wait_for(lambda: receiver.calls == 1, timeout=10, what="first attempt reaches the receiver")
    assert receiver.bodies == [] and alerts.delivered == []
    receiver.gate.set()
    wait_for(lambda: receiver.bodies, timeout=10, what="webhook delivered")
    assert receiver.calls == 3
    body = receiver.bodies[0]
    assert body["name"] == "scan01" and body["state"] == "failed" and body["error"] == "line one\nline two"
    assert body["text"].startswith("vip-agent: dataset scan01 failed") and "line two" in body["text"]
    wait_for(lambda: alerts.delivered == [("webhook", "failed", True)], what="delivery recorded")


def test_webhook_failure_is_logged_without_its_secret_path(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.fail_first = 100
    alerts = Alerts(backoff=(0.01,))
    alerts.send([NotifyRule(frozenset({"failed"}), webhook=receiver.url)], ALERT)
    wait_for(lambda: alerts.delivered, timeout=10, what="delivery given up")
    assert alerts.delivered == [("webhook", "failed", False)]
    assert receiver.calls == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "not delivered" in logged and "HTTP 503" in logged
    assert "secret-path" not in logged and safe_url(receiver.url) in logged


def test_rules_filter_events(receiver: Receiver) -> None:
    alerts = Alerts(backoff=())
    rule = NotifyRule(frozenset({"done"}), webhook=receiver.url)
    assert alerts.send([rule], ALERT) == 0
    done = Alert(event="done", name="scan02", state="done", output="/o")
    assert alerts.send([rule], done) == 1
    wait_for(lambda: receiver.bodies, what="done webhook")
    assert receiver.bodies[0]["state"] == "done"


def test_alert_carrying_a_key_is_not_sent(receiver: Receiver) -> None:
    alerts = Alerts(backoff=(), secrets=lambda: [SECRET])
    leaky = Alert(event="failed", name="x", state="failed", error=f"oops {SECRET}")
    alerts.send([NotifyRule(frozenset({"failed"}), webhook=receiver.url)], leaky)
    wait_for(lambda: alerts.delivered, what="refusal recorded")
    assert alerts.delivered == [("webhook", "failed", False)] and receiver.calls == 0


def test_command_gets_the_alert_in_its_environment_and_never_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIP_API_KEY", SECRET)
    monkeypatch.setenv("SOME_TOKEN", SECRET)
    monkeypatch.setenv("UNRELATED_SETTING", "kept-out")
    out = tmp_path / "env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    argv = (sys.executable, "-c", script, str(out))
    alerts = Alerts()
    alerts.send([NotifyRule(frozenset({"failed"}), command=argv, timeout=20)], ALERT)
    wait_for(lambda: alerts.delivered, timeout=20, what="command ran")
    assert alerts.delivered == [("command", "failed", True)]
    env = json.loads(out.read_text())
    assert env["VIP_AGENT_NAME"] == "scan01" and env["VIP_AGENT_STATE"] == "failed"
    assert env["VIP_AGENT_ERROR"] == "line one\nline two" and env["VIP_AGENT_OUTPUT"] == "/data/out/scan01"
    assert SECRET not in json.dumps(env)
    assert "UNRELATED_SETTING" not in env and "VIP_API_KEY" not in env
    assert set(env) <= set(command_env(ALERT)) | {"PWD", "LC_CTYPE", "SHLVL", "_"}


def test_command_time_limit_kills_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "late"
    script = f"import time, pathlib; time.sleep(30); pathlib.Path({str(marker)!r}).write_text('x')"
    alerts = Alerts()
    t0 = time.monotonic()
    alerts.send([NotifyRule(frozenset({"failed"}), command=(sys.executable, "-c", script), timeout=0.5)], ALERT)
    wait_for(lambda: alerts.delivered, timeout=15, what="command killed")
    assert time.monotonic() - t0 < 10
    assert alerts.delivered == [("command", "failed", False)] and not marker.exists()
    assert "did not finish within 0.5 s" in caplog.text


def test_missing_command_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    alerts = Alerts()
    alerts.send([NotifyRule(frozenset({"failed"}), command=("/nonexistent/notify-me",))], ALERT)
    wait_for(lambda: alerts.delivered, what="failure recorded")
    assert alerts.delivered == [("command", "failed", False)]
    assert "cannot start /nonexistent/notify-me" in caplog.text


# -- e-mail ---------------------------------------------------------------------------------


def test_email_over_starttls_with_a_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIP_API_KEY", SECRET)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    pw_file = tmp_path / "smtp-password"
    pw_file.write_text("smtp-pass-42\n")
    pw_file.chmod(0o600)
    server = Smtp(tmp_path, "smtp-pass-42")
    try:
        settings = EmailSettings(
            host="127.0.0.1", port=server.port, to=("pi@example.org", "staff@example.org"),
            sender="lab@example.org", user="lab@example.org", password_file=pw_file, ca_file=server.ca,
        )  # fmt: skip
        alerts = Alerts(secrets=lambda: [SECRET])
        alerts.send([NotifyRule(frozenset({"failed"}), email=settings, timeout=10)], ALERT)
        wait_for(lambda: alerts.delivered, timeout=20, what="e-mail sent")
        assert alerts.delivered == [("email", "failed", True)]
        assert server.logins == [("lab@example.org", "smtp-pass-42")]
        assert len(server.messages) == 1
        text = server.messages[0].decode()
        assert "Subject: vip-agent: dataset scan01 failed" in text and "line two" in text
        assert "To: pi@example.org, staff@example.org" in text
        assert SECRET not in text
    finally:
        server.close()


def test_smtp_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("VIP_AGENT_SMTP_PASSWORD", raising=False)
    settings = EmailSettings(host="smtp.example.org", to=("a@b.c",), sender="a@b.c", user="lab")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vip-agent-smtp").write_text("from-systemd\n")
    assert find_smtp_password(settings, env={"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    assert find_smtp_password(settings, env={"VIP_AGENT_SMTP_PASSWORD": "from-env"}) == "from-env"
    loose = tmp_path / "loose"
    loose.write_text("pw")
    loose.chmod(0o644)
    from agent.errors import CredentialError

    with pytest.raises(CredentialError, match="chmod 600"):
        find_smtp_password(EmailSettings("h", ("a@b.c",), "a@b.c", user="lab", password_file=loose), env={})
    with pytest.raises(CredentialError, match="no SMTP password"):
        find_smtp_password(settings, env={})


def test_notify_config_errors_name_the_key() -> None:
    def parse(notify: Any) -> Any:
        return parse_config({"drops": [{"path": "/d", "output": "/o", "notify": notify}]}, source="a.yaml")

    with pytest.raises(ConfigError, match=r"drops\[0\]\.notify\[0\]\.on: must list events"):
        parse([{"on": ["exploded"], "webhook": "http://x"}])
    with pytest.raises(ConfigError, match="exactly one of"):
        parse([{"on": ["failed"]}])
    with pytest.raises(ConfigError, match="without a shell"):
        parse([{"on": ["failed"], "command": "mail -s x me"}])
    with pytest.raises(ConfigError, match=r"notify\[0\]\.email\.starttls"):
        parse([{"on": ["failed"], "email": {"host": "h", "to": "a@b.c", "user": "u", "starttls": False}}])
    rules = parse([{"on": "failed", "webhook": "https://hooks.example.org/x"}]).drops[0].notify
    assert rules[0].on == frozenset({"failed"}) and rules[0].webhook == "https://hooks.example.org/x"


def test_alert_env_is_built_from_scratch() -> None:
    env = command_env(ALERT, base={"PATH": "/bin", "VIP_API_KEY": SECRET, "AWS_SECRET": "x", "HOME": "/h"})
    assert env["PATH"] == "/bin" and env["HOME"] == "/h" and "VIP_API_KEY" not in env and "AWS_SECRET" not in env
    assert os.environ.get("VIP_AGENT_NAME") is None
