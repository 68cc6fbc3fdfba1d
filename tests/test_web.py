"""The status page's interface and security, the metrics, and notifications end to end.

``vip-agent watch --http 127.0.0.1:0`` runs as a real process against the local VIP
server; notifications go to a real webhook receiver, a real SMTP server and a real
command; the API key is searched for in everything they receive and everything the
page serves. The security rules are each checked on a service in this process.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from agenthelpers import agent_env, wait_for, write_dataset
from receivers import Receiver, Smtp
from webhelpers import Page, make_drop, page_service

from agent.config import NotifyRule
from agent.journal import Journal
from agent.localvip import LocalVip
from agent.web.server import _is_loopback, ensure_token

#: every metric docs/monitoring.md promises
METRICS = (
    "vip_agent_datasets", "vip_agent_uploaded_bytes_total", "vip_agent_downloaded_bytes_total",
    "vip_agent_stage_duration_seconds_bucket", "vip_agent_executions_launched_total",
    "vip_agent_failures_total", "vip_agent_queue_depth", "vip_agent_paused_servers",
    "vip_agent_last_success_timestamp_seconds", "vip_agent_observer_native",
    "vip_agent_free_disk_bytes", "vip_agent_server_reachable",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "VIP_AGENT_SMTP_PASSWORD"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def status_json(state: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--state", str(state)],
        capture_output=True, text=True, timeout=30, env=agent_env("unused"), check=True,
    )  # fmt: skip
    return list(json.loads(out.stdout))


def test_watch_serves_page_api_metrics_and_notifies_without_the_key(
    tmp_path: Path, vip_server: LocalVip, receiver: Receiver
) -> None:
    key = vip_server.api_key
    smtp = Smtp(tmp_path, "smtp-pw-7")
    drop = make_drop(tmp_path)
    env_dump = tmp_path / "command-env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    config = {
        "state": str(tmp_path / "state"),
        "drops": [{
            "path": str(drop), "output": str(tmp_path / "out"), "server": vip_server.url,
            "readiness": {"settle_seconds": 0.3}, "poll_interval": 0.1, "poll": {"min": 0.2, "max": 0.5},
            "notify": [
                {"on": ["failed"], "webhook": receiver.url},
                {"on": ["failed", "done"], "command": [sys.executable, "-c", script, str(env_dump)]},
                {"on": ["failed"], "email": {
                    "host": "127.0.0.1", "port": smtp.port, "to": "pi@example.org",
                    "user": "lab@example.org", "ca_file": str(smtp.ca)}},
            ],
        }],
    }  # fmt: skip
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = tmp_path / "agent.log"
    state = tmp_path / "state"
    with log_path.open("w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "watch", "--config", str(tmp_path / "agent.yaml"),
             "--http", "127.0.0.1:0"],
            env=agent_env(key, VIP_AGENT_SMTP_PASSWORD="smtp-pw-7"), stdout=log_fh, stderr=log_fh,
            cwd=tmp_path, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: (state / "http-url").exists(), timeout=30, what="http-url written")
        url_lines = (state / "http-url").read_text().splitlines()
        assert len(url_lines) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/", url_lines[0])
        assert url_lines[0] in log_path.read_text()
        assert stat.S_IMODE((state / "http-token").stat().st_mode) == 0o600
        page = Page(state)

        write_dataset(drop / "good", {"data.txt": "hello\n"})
        write_dataset(drop / "broken", {"date.txt": "typo\n"})
        wait_for(lambda: {d["name"]: d["state"] for d in page.get("/api/datasets").json()}
                 == {"good": "done", "broken": "failed"}, timeout=60, interval=0.2)  # fmt: skip

        # the JSON API is exactly `vip-agent status --json`
        assert page.get("/api/datasets").json() == status_json(state)

        metrics = page.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
        text = metrics.text
        assert re.search(r'^vip_agent_datasets\{[^}]*state="done"[^}]*\} 1\.0$', text, re.M), text
        assert re.search(r'^vip_agent_datasets\{[^}]*state="failed"[^}]*\} 1\.0$', text, re.M)
        assert re.search(r'^vip_agent_failures_total\{[^}]*kind="validation"[^}]*\} 1\.0$', text, re.M)
        assert re.search(r"^vip_agent_executions_launched_total\{[^}]*\} 1\.0$", text, re.M)
        for name in METRICS:
            assert re.search(rf"^{name}[{{ ]", text, re.M), f"{name} missing"

        # notifications: webhook, e-mail and command all told, none with the key
        wait_for(lambda: receiver.bodies and smtp.messages and env_dump.exists(), timeout=30,
                 what="webhook, e-mail and command")  # fmt: skip
        hook = receiver.bodies[0]
        assert hook["name"] == "broken" and hook["state"] == "failed"
        assert "date.txt" in hook["error"] and "broken failed" in hook["text"]
        env = json.loads(env_dump.read_text())
        assert env["VIP_AGENT_NAME"] in ("broken", "good")
        assert "Subject: vip-agent: dataset broken failed" in smtp.messages[0].decode()
        assert smtp.logins == [("lab@example.org", "smtp-pw-7")]
        received = [*receiver.raw, *smtp.messages, env_dump.read_bytes()]
        assert not [r for r in received if key.encode() in r]
        assert "smtp-pw-7" not in env_dump.read_text()

        # failed datasets are logged at ERROR (journald priority 3)
        assert re.search(r"ERROR +broken failed: the dataset cannot be run", log_path.read_text())

        # the key is in no response: every page, file, API answer, error and header
        ids = [d["id"] for d in page.get("/api/datasets").json()]
        responses = [page.get(p) for p in (
            "/", "/static/app.js", "/static/style.css", "/static/favicon.svg", "/api/state",
            "/api/health", "/api/timeline", "/metrics", "/nope", "/static/../agent.yaml",
            *(f"/api/datasets/{i}" for i in ids),
        )]  # fmt: skip
        responses += [page.post(f"/api/datasets/{ids[0]}/retry"), page.get("/api/datasets", Host="evil.example")]
        for r in responses:
            blob = r.content + repr(dict(r.headers)).encode()
            assert key.encode() not in blob, r.url
        assert [r.status_code for r in responses[-2:]] == [401, 403]

        detail = page.get(f"/api/datasets/{ids[0]}").json()
        assert detail["name"] == "good" and detail["runs"] and detail["segments"]
        assert [s["phase"] for s in detail["segments"]][:3] == ["waiting", "validate", "upload"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        smtp.close()
    assert not (state / "http-url").exists()
    assert key not in log_path.read_text()


@pytest.fixture
def served(tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Page, Journal]]:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    service = page_service(tmp_path, vip_server.url, drop)
    service.start()
    try:
        write_dataset(drop / "broken", {"date.txt": "typo\n"})
        journal = Journal.in_state_dir(tmp_path / "state")
        wait_for(lambda: any(d.stage == "failed" for d in journal.datasets()), timeout=30)
        yield Page(tmp_path / "state"), journal
    finally:
        service.stop()


def test_actions_need_the_token(served: tuple[Page, Journal]) -> None:
    page, journal = served
    (ds,) = journal.datasets()
    path = f"/api/datasets/{ds.id}/retry"
    # what a hostile page could send: a plain form post, no token
    r = page.post(path, **{"Content-Type": "application/x-www-form-urlencoded", "Origin": page.url.rstrip("/")})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert page.post(path, token="not-the-token").status_code == 401
    assert journal.get(ds.id).attempts == 0
    r = page.post(path, token=page.token)
    assert r.status_code == 200 and r.json()["ok"]
    wait_for(lambda: journal.get(ds.id).attempts == 1, what="retry recorded")
    assert page.post(f"/api/datasets/{ds.id}/explode", token=page.token).status_code == 404
    assert page.post("/api/datasets/999/retry", token=page.token).status_code == 404


def test_cross_site_requests_are_refused_even_with_the_token(served: tuple[Page, Journal]) -> None:
    page, journal = served
    (ds,) = journal.datasets()
    path = f"/api/datasets/{ds.id}/retry"
    assert page.post(path, token=page.token, Origin="http://evil.example").status_code == 403
    assert page.post(path, token=page.token, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    pre = page.http.options(page.url + path.lstrip("/"), headers={"Origin": "http://evil.example",
                            "Access-Control-Request-Method": "POST"}, timeout=10)  # fmt: skip
    assert pre.status_code == 405 and "Access-Control-Allow-Origin" not in pre.headers
    assert journal.get(ds.id).attempts == 0


def test_foreign_host_header_is_refused(served: tuple[Page, Journal]) -> None:
    page, _ = served
    port = page.url.rsplit(":", 1)[1].strip("/")
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{int(port) + 1}", "127.0.0.1"):
        for path in ("/", "/api/datasets", "/metrics", "/static/app.js"):
            assert page.get(path, Host=host).status_code == 403, (host, path)
        assert page.post("/api/datasets/1/retry", token=page.token, Host=host).status_code == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert page.get("/api/datasets", Host=host).status_code == 200
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    conn.putrequest("GET", "/api/datasets", skip_host=True)
    conn.endheaders()
    assert conn.getresponse().status == 403  # no Host at all
    conn.close()


def test_headers_forbid_outside_content_and_framing(served: tuple[Page, Journal]) -> None:
    page, _ = served
    for path in ("/", "/api/datasets", "/metrics", "/nope"):
        r = page.get(path)
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    html = page.get("/").text
    assert "http://" not in html and "https://" not in html  # nothing from outside
    assert "<script src=\"/static/app.js\"" in html and "<script>" not in html


def test_reading_can_require_the_token(tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    service = page_service(tmp_path, vip_server.url, make_drop(tmp_path), read_token=True)
    service.start()
    try:
        page = Page(tmp_path / "state")
        for path in ("/api/datasets", "/api/state", "/metrics"):
            assert page.get(path).status_code == 401
            assert page.get(path, Authorization=f"Bearer {page.token}").status_code == 200
        assert page.get("/").status_code == 200  # the page itself holds no data; it asks for the token
    finally:
        service.stop()


def test_token_file_is_private_and_replaced_when_not(tmp_path: Path) -> None:
    token = ensure_token(tmp_path)
    path = tmp_path / "http-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 40
    assert ensure_token(tmp_path) == token  # kept across restarts
    path.chmod(0o644)
    fresh = ensure_token(tmp_path)
    assert fresh != token and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and not _is_loopback("192.0.2.1")


def test_paused_and_disk_low_are_notified(
    tmp_path: Path, vip_server: LocalVip, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIP_API_KEY", "refused-key-" + "x" * 20)
    rule = NotifyRule(frozenset({"paused", "disk_low"}), webhook=receiver.url)
    service = page_service(
        tmp_path, vip_server.url, make_drop(tmp_path), notify=(rule,), disk_low=10**18,
    )  # fmt: skip
    service.start()
    try:
        wait_for(lambda: {b["event"] for b in receiver.bodies} == {"paused", "disk_low"}, timeout=20,
                 what="paused and disk_low webhooks")  # fmt: skip
        paused = next(b for b in receiver.bodies if b["event"] == "paused")
        assert paused["server"] == vip_server.url and "refused" in paused["text"]
        health = Page(tmp_path / "state").get("/api/health").json()
        assert health["servers"][0]["paused"] and health["servers"][0]["key"] == "refused"
        assert health["drops"][0]["disk_low"] is True
        metrics = Page(tmp_path / "state").get("/metrics").text
        assert re.search(r"^vip_agent_paused_servers 1\.0$", metrics, re.M)
        assert re.search(r"^vip_agent_disk_low\{[^}]*\} 1\.0$", metrics, re.M)
        n = len(receiver.bodies)
        wait_for(lambda: service.oversight.checker.get(vip_server.url).checked, what="a health check")
        assert len(receiver.bodies) == n  # told once per change, not at every check
    finally:
        service.stop()
    assert "refused-key" not in json.dumps(receiver.bodies)
    assert os.environ["VIP_API_KEY"].encode() not in b"".join(receiver.raw)


def test_http_flag_rejects_a_bad_address(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "watch", str(tmp_path), "--http", "localhost:http"],
        capture_output=True, text=True, timeout=30, env=agent_env("unused"),
    )  # fmt: skip
    assert out.returncode == 2 and "expected [HOST:]PORT" in out.stderr


def test_page_port_in_use_is_a_clear_error(tmp_path: Path, vip_server: LocalVip) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        drop = make_drop(tmp_path)
        out = subprocess.run(
            [sys.executable, "-m", "agent", "watch", str(drop), "--server", vip_server.url,
             "--state", str(tmp_path / "state"), "--http", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30, env=agent_env(vip_server.api_key),
        )  # fmt: skip
    assert out.returncode == 2 and f"cannot serve the status page on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr




def test_page_state_is_bounded_however_long_the_history(tmp_path: Path) -> None:
    from agent.health import Health
    from agent.web.source import JournalSource

    journal = Journal.in_state_dir(tmp_path)
    busy = journal.add_dataset(name="old-but-running", path="/drop/x", server="http://s", output_root="/o",
                               drop_dir="/drop")  # fmt: skip
    for i in range(6):
        journal.add_dataset(name=f"d{i}", path=f"/drop/d{i}", server="http://s", output_root="/o",
                            drop_dir="/drop", stage="done")  # fmt: skip
    source = JournalSource(journal, lambda: Health("x", 0.0, str(tmp_path), None))
    records, counts = source.recent(2)
    assert {r["name"] for r in records} == {"old-but-running", "d5", "d4"}
    assert counts["*"] == {"done": 6, "validating": 1} and counts["/drop"] == counts["*"]
    full = {r["id"]: r for r in source.datasets()}
    assert all(full[r["id"]] == r for r in records) and len(full) == 7 and busy in full


class _Errors(logging.Handler):
    """Every record at WARNING or above that reaches the agent's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_clients_gone_early_and_bad_requests_are_no_errors(
    served: tuple[Page, Journal], capfd: pytest.CaptureFixture[str]
) -> None:
    """A browser tab closed mid-answer is routine (no ERROR, no traceback); malformed
    requests get a 4xx with a reason, never a 500."""
    page, _ = served
    errors = _Errors()
    logger = logging.getLogger("vip_agent.web")
    logger.addHandler(errors)
    port = int(page.url.rsplit(":", 1)[1].strip("/"))
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET /api/datasets HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            # close with a reset at once: the server's answer meets a closed connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        for path, code in (
            ("/api/timeline?limit=abc", 400), ("/api/timeline?limit=-3", 400),
            ("/api/timeline?limit=5", 200), ("/api/datasets/" + "9" * 40, 404),
            ("/api/datasets/99999999999999999999", 404),
        ):  # fmt: skip
            r = page.get(path)
            assert r.status_code == code, (path, r.status_code, r.text)
            if code == 400:
                assert "limit" in r.json()["error"]
        r = page.post("/api/datasets/" + "9" * 40 + "/retry", token=page.token)
        assert r.status_code == 404
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/api/datasets/1/retry")
        conn.putheader("Content-Length", "abc")
        conn.putheader("Authorization", f"Bearer {page.token}")
        conn.endheaders()
        answer = conn.getresponse()
        assert answer.status == 400 and b"Content-Length" in answer.read()
        conn.close()
        assert page.get("/api/datasets").status_code == 200  # still serving
    finally:
        logger.removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == []
    assert "Traceback" not in capfd.readouterr().err


def test_rows_say_what_they_wait_for(tmp_path: Path) -> None:
    """Issue 17 #16, every rule of web.source.waiting_for on a real journal: the running
    cap, a full output disk, a pause (and whose), a paused server, VIP's own queue."""
    from agent.health import DropHealth, Health, ServerHealth
    from agent.web.source import JournalSource

    journal = Journal.in_state_dir(tmp_path / "state")
    servers = {"a": "http://127.0.0.1:9", "b": "http://127.0.0.1:10"}

    def add(name: str, stage: str, server: str = "a", **fields: object) -> int:
        ds = journal.add_dataset(name=name, path=f"/drop/{name}", server=servers[server],
                                 output_root="/out", fingerprint=f"fp-{name}", drop_dir="/drop", stage=stage)  # fmt: skip
        if fields:
            journal.update(ds, **fields)
        return ds

    running = add("running", "monitor")
    journal.add_execution(running, key="default-r1", name="r", variant="default", run=1, inputs={})
    journal.update_execution(running, "default-r1", vip_id="workflow-R", status="Running")
    waiting = add("behind-cap", "launch")
    journal.add_execution(waiting, key="default-r1", name="w", variant="default", run=1, inputs={})
    on_vip = add("on-vip", "launch", "b")
    journal.add_execution(on_vip, key="default-r1", name="v", variant="default", run=1, inputs={})
    journal.update_execution(on_vip, "default-r1", vip_id="workflow-V", status="Initializing")
    add("full", "mirror", error="the disk is full (/out/full); the dataset waits and resumes when space is freed")
    add("held", "upload", paused="paused by alice with `vip-agent pause held`")
    refused = add("refused", "launch", "b")
    journal.add_execution(refused, key="default-r1", name="x", variant="default", run=1, inputs={})

    def health(server_b_paused: str | None) -> Health:
        return Health(
            version="t", started=0.0, state=str(tmp_path / "state"), state_free=None,
            drops=[DropHealth("/drop", servers["a"], "/out", "native", None, False, None, max_running=1)],
            servers=[ServerHealth(servers["b"], True, "refused" if server_b_paused else "accepted",
                                  server_b_paused, None)],
        )  # fmt: skip

    source = JournalSource(journal, lambda: health(None))
    said = {r["name"]: r.get("waiting_for") for r in source.recent(10)[0]}
    assert said["behind-cap"] == (
        "waiting for a free slot: 1 of 1 execution(s) running on 127.0.0.1:9 (max_running: 1)"
    )
    assert said["running"] is None
    assert said["on-vip"] == "queued on VIP (Initializing)"
    assert said["full"] is not None and said["full"].startswith("waiting for disk space: the disk is full")
    assert said["held"] == "paused: paused by alice with `vip-agent pause held`"
    assert said["refused"] == "waiting for its turn to launch"
    source = JournalSource(journal, lambda: health("API key refused by http://127.0.0.1:10"))
    said = {r["name"]: r.get("waiting_for") for r in source.recent(10)[0]}
    assert said["refused"] == "waiting for the server: API key refused by http://127.0.0.1:10"
