"""A hostile VIP for tests: a real HTTP server on 127.0.0.1 that misbehaves on purpose.

It sits in front of an upstream VIP (normally :class:`agent.localvip.LocalVip`) and forwards
every request unchanged, except those matched by a :class:`Rule`, which get one of the
answers a broken or malicious server could give:

* ``error_body``: HTTP 200 carrying ``{"errorCode": ..., "errorMessage": ...}``;
* ``json``: HTTP 200 with a fixed JSON body;
* ``transform``: the upstream answer, its JSON passed through a function first (a nonsense
  or ``InitializationFailed`` status, relative or ``..`` result paths);
* ``drip``: headers announcing ``size`` bytes, then one byte every ``interval`` seconds;
* ``hang``: reads the request and never answers (until the server stops or ``max_wait``);
* ``close``: reads the request and closes the connection without a word (what a client sees
  when a server drops an idle keep-alive connection just as a request goes out);
* ``answer_then_close``: the upstream answer, then the connection closed without a
  ``Connection: close`` header (a server whose keep-alive timeout ends before the next request).

``tls=(cert, key)`` serves HTTPS with that certificate instead of HTTP.

Drips and hangs are bounded in time so a failing test never hangs the suite. The agent's
real client talks to it over real sockets: only the answers are fake, never the client.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class _QuietServer(ThreadingHTTPServer):
    """A client dropping its connection is what these tests do on purpose: no traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


@dataclass
class Rule:
    """Which requests to spoil (``method`` and a regex searched in the path) and how."""

    method: str
    path: str
    action: str
    times: int | None = None  # None: every matching request
    code: int = 8000
    message: str = "An error has been encountered on the VIP API"
    body: Any = None
    transform: Callable[[Any], Any] | None = None
    interval: float = 0.2
    size: int = 1000
    max_bytes: int = 200
    max_wait: float = 30.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return method == self.method and re.search(self.path, path) is not None


@dataclass
class HostileVip:
    """The server; use as a context manager. ``url`` is its portal URL."""

    upstream: str | None = None
    rules: list[Rule] = field(default_factory=list)
    #: (method, path) of every request received, in order
    seen: list[tuple[str, str]] = field(default_factory=list)
    #: called with (method, path) before a request is answered (to check invariants then)
    before: Callable[[str, str], None] | None = None
    #: (certificate, key) files: serve HTTPS
    tls: tuple[Path, Path] | None = None
    #: connections accepted so far
    connections: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def add(self, method: str, path: str, action: str, **options: Any) -> Rule:
        rule = Rule(method, path, action, **options)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def requests(self, method: str, path: str = "") -> list[str]:
        """Paths of the requests received with ``method`` whose path matches ``path``."""
        with self._lock:
            return [p for m, p in self.seen if m == method and re.search(path, p)]

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HostileVip:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def setup(self) -> None:
                with hostile._lock:
                    hostile.connections += 1
                super().setup()

            def do_GET(self) -> None:
                hostile._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, name="hostile-vip", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> HostileVip:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one request ------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = urlsplit(h.path).path
        if self.before is not None:
            self.before(h.command, path)
        with self._lock:
            self.seen.append((h.command, path))
            rule = next((r for r in self.rules if r.matches(h.command, path)), None)
            if rule is not None:
                rule.hits += 1
        if rule is None:
            status, ctype, data = self._forward(h, body)
        elif rule.action == "error_body":
            status, ctype = 200, "application/json"
            data = json.dumps({"errorCode": rule.code, "errorMessage": rule.message}).encode()
        elif rule.action == "json":
            status, ctype, data = 200, "application/json", json.dumps(rule.body).encode()
        elif rule.action == "transform":
            status, ctype, data = self._forward(h, body)
            if 200 <= status < 300 and rule.transform is not None:
                data = json.dumps(rule.transform(json.loads(data))).encode()
        elif rule.action == "drip":
            self._drip(h, rule)
            return
        elif rule.action == "close":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        elif rule.action == "answer_then_close":
            status, ctype, data = self._forward(h, body)
            h.close_connection = True
        elif rule.action == "hang":
            self._stopping.wait(rule.max_wait)
            h.close_connection = True
            return
        else:
            raise AssertionError(f"unknown action {rule.action}")
        h.send_response(status)
        if ctype:
            h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _drip(self, h: BaseHTTPRequestHandler, rule: Rule) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(rule.size))
        h.end_headers()
        h.wfile.flush()
        try:
            for _ in range(min(rule.size, rule.max_bytes)):
                if self._stopping.wait(rule.interval):
                    break
                h.wfile.write(b"x")
                h.wfile.flush()
        except OSError:
            pass  # the client gave up: what the test expects
        h.close_connection = True

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, str | None, bytes]:
        if self.upstream is None:
            return 404, "application/json", b'{"errorCode":8000,"errorMessage":"no upstream"}'
        target = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=30)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        try:
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheader("Content-Type"), data
        finally:
            conn.close()

