"""HTTP server of the status page (see ``agent.web`` for the security rules)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from agent.errors import AgentError
from agent.fsutil import write_atomic

log = logging.getLogger("vip_agent.web")

TOKEN_FILE = "http-token"
URL_FILE = "http-url"
ACTIONS = ("retry", "cancel", "rerun", "pause", "resume")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# at most 18 digits: a longer id is no dataset (404), never an integer SQLite cannot hold
_DATASET = re.compile(r"^/api/datasets/(\d{1,18})$")
_ACTION = re.compile(r"^/api/datasets/(\d{1,18})/([a-z]+)$")
#: pause or resume the whole agent, or one drop folder with ``?drop=PATH``
_SCOPE = re.compile(r"^/api/(pause|resume)$")
#: a client that goes away mid-answer: nothing to report above DEBUG (a closed browser tab)
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class BadRequest(Exception):
    """A request the page cannot answer as asked (400, with this message)."""


def _limit(query: str, default: int = 30, most: int = 200) -> int:
    """``?limit=N`` as an integer in 1..most; BadRequest when it is not a whole number."""
    values = parse_qs(query).get("limit")
    if not values:
        return default
    text = values[0].strip()
    if not text.isdigit() or len(text) > 9:
        raise BadRequest(f"limit must be a whole number from 1 to {most}, not {text[:40]!r}")
    return max(1, min(int(text), most))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone mid-request is routine (DEBUG); anything else is one ERROR line."""
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, _GONE):
            log.debug("status page: client %s went away: %s", client_address[0], err)
            return
        log.error("status page: error serving %s", client_address[0], exc_info=True)


class StatusSource(Protocol):
    """What the page shows and does; the service provides it (agent/daemon.py)."""

    def datasets(self) -> list[dict[str, Any]]:
        """Exactly the list ``vip-agent status --json`` prints."""
        ...

    def recent(self, limit: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
        """Every unfinished dataset and the ``limit`` most recent others (``datasets()``'s
        records), and the counts by state of all datasets per drop folder (``"*"``: all)."""
        ...

    def dataset(self, dataset_id: int) -> dict[str, Any]:
        """One dataset in detail (events, executions, outputs, logs); KeyError if unknown."""
        ...

    def timeline(self, limit: int) -> list[dict[str, Any]]:
        """Recent datasets with their phase segments (``agent.timeline``)."""
        ...

    def health(self) -> dict[str, Any]:
        """The overview (``agent.health.Health.to_json()``)."""
        ...

    def act(self, action: str, dataset_id: int) -> str:
        """Retry, cancel, rerun, pause or resume; returns a message, raises AgentError with the reason."""
        ...

    def pause_scope(self, action: str, drop: str | None) -> str:
        """Pause or resume a drop folder (its path) or, with None, the whole agent."""
        ...

    def metrics(self) -> bytes:
        """Prometheus text format."""
        ...


def ensure_token(state: Path) -> str:
    """The token of ``<state>/http-token``, created (0600) if missing or readable by others."""
    path = state / TOKEN_FILE
    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o077 and (
            not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
        ):
            token = path.read_text(encoding="ascii").strip()
            if len(token) >= 20:
                return token
        log.warning("%s was not private (or not valid): a new token replaces it", path)
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    state.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Rates:
    """Transfer rate and ETA per dataset from the journal's progress samples."""

    def __init__(self, window: float = 20.0) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._samples: dict[int, deque[tuple[float, int]]] = {}

    def update(self, records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            alive = set()
            for rec in records:
                p = rec.get("progress") or {}
                if p.get("kind") not in ("upload", "download") or rec.get("state") not in ("uploading", "downloading"):
                    continue
                key = int(rec["id"])
                alive.add(key)
                t, done, total = float(rec.get("updated") or 0), int(p.get("done") or 0), int(p.get("total") or 0)
                q = self._samples.setdefault(key, deque(maxlen=64))
                if q and (done < q[-1][1] or t < q[-1][0]):
                    q.clear()  # a new transfer (or a resumed one)
                if not q or q[-1] != (t, done):
                    q.append((t, done))
                while len(q) > 2 and q[-1][0] - q[0][0] > self.window:
                    q.popleft()
                rate = None
                if len(q) >= 2 and q[-1][0] > q[0][0]:
                    rate = (q[-1][1] - q[0][1]) / (q[-1][0] - q[0][0])
                eta = (total - done) / rate if rate and rate > 0 and total > done else None
                out[str(key)] = {"kind": p["kind"], "done": done, "total": total, "rate": rate, "eta": eta}
            for key in set(self._samples) - alive:
                del self._samples[key]
        return out


class StatusServer:
    """Serve the page, the API and the metrics on ``host:port`` in background threads."""

    def __init__(
        self,
        source: StatusSource,
        *,
        state: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        read_token: bool = False,
        allowed_hosts: Iterable[str] = (),
        poll_ms: int = 1000,
        page_limit: int = 300,
    ) -> None:
        self.source = source
        self.state = Path(state)
        self.read_token = read_token
        self.poll_ms = poll_ms
        #: finished datasets the page shows (the most recent; unfinished ones always)
        self.page_limit = page_limit
        self.token = ensure_token(self.state)
        self.rates = Rates()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("_Server", (_Server,), {"address_family": family})
        self.httpd: ThreadingHTTPServer = server_cls((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        wildcard = host in ("0.0.0.0", "::", "")
        names = {host, *allowed_hosts}
        if _is_loopback(host) or wildcard:
            names |= {"127.0.0.1", "localhost", "::1"}
        if wildcard:
            names |= {socket.gethostname(), socket.getfqdn()}
        self.allowed = {f"{_url_host(n).lower()}:{self.port}" for n in names if n}
        local = "127.0.0.1" if wildcard else host
        self.url = f"http://{_url_host(local)}:{self.port}/"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="vip-agent http", daemon=True)
        self._thread.start()
        write_atomic(self.state / URL_FILE, self.url + "\n")
        log.info(
            "status page: %s (actions need the token in %s)", self.url, self.state / TOKEN_FILE
        )

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            (self.state / URL_FILE).unlink()
        except OSError:
            pass

    # -- decisions (kept here, out of the handler, so that each rule is one place) ---------
    def host_ok(self, host: str | None) -> bool:
        return bool(host) and str(host).strip().lower() in self.allowed

    def token_ok(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())

    def origin_ok(self, origin: str | None) -> bool:
        if origin is None:
            return True  # not a browser, or a same-origin GET
        parts = urlsplit(origin)
        return parts.scheme == "http" and parts.netloc.lower() in self.allowed

    def state_json(self) -> dict[str, Any]:
        # the page polls this every second: bounded work however long the journal's history
        datasets, counts = self.source.recent(self.page_limit)
        return {
            "health": self.source.health(),
            "datasets": datasets,
            "counts": counts,
            "limit": self.page_limit,
            "live": self.rates.update(datasets),
            "poll_ms": self.poll_ms,
            "read_token": self.read_token,
            "token_path": str(self.state / TOKEN_FILE),
        }


def _handler(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "vip-agent"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that stops talking frees its thread

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            log.debug("http %s: " + format, self.client_address[0], *args)

        # -- responses -------------------------------------------------------------
        def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, value: Any) -> None:
            self._send(code, json.dumps(value).encode(), "application/json")

        def _error(self, code: int, message: str) -> None:
            extra = {"WWW-Authenticate": 'Bearer realm="vip-agent"'} if code == 401 else None
            self._send(code, json.dumps({"error": message}).encode(), "application/json", extra)

        def _guard(self, write: bool) -> bool:
            """Host, token and origin rules; False when an error was sent."""
            if not server.host_ok(self.headers.get("Host")):
                self._error(403, "this address is not the one the agent serves (Host refused)")
                return False
            authorised = server.token_ok(self.headers.get("Authorization"))
            if write:
                if not server.origin_ok(self.headers.get("Origin")):
                    self._error(403, "refused: the request comes from another site")
                    return False
                if self.headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
                    self._error(403, "refused: the request comes from another site")
                    return False
                if not authorised:
                    self._error(401, f"this action needs the token in {server.state / TOKEN_FILE}")
                    return False
                return True
            if authorised:
                return True
            if server.read_token or not _is_loopback(self.client_address[0]):
                self._error(401, f"reading needs the token in {server.state / TOKEN_FILE}")
                return False
            return True

        # -- routes ----------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = urlsplit(self.path).path
            # the page and its files are the same for everyone: only the Host rule applies
            if path in ("/", "/index.html") or path.startswith("/static/"):
                if not server.host_ok(self.headers.get("Host")):
                    self._error(403, "this address is not the one the agent serves (Host refused)")
                    return
                name = "index.html" if path in ("/", "/index.html") else path[len("/static/") :]
                if name not in STATIC:
                    self._error(404, "no such file")
                    return
                body = resources.files("agent.web").joinpath("static").joinpath(name).read_bytes()
                self._send(200, body, STATIC[name])
                return
            if not self._guard(write=False):
                return
            try:
                if path == "/api/datasets":
                    self._json(200, server.source.datasets())
                elif path == "/api/state":
                    self._json(200, server.state_json())
                elif path == "/api/health":
                    self._json(200, server.source.health())
                elif path == "/api/timeline":
                    self._json(200, server.source.timeline(_limit(urlsplit(self.path).query)))
                elif m := _DATASET.match(path):
                    try:
                        self._json(200, server.source.dataset(int(m.group(1))))
                    except KeyError:
                        self._error(404, f"no dataset #{m.group(1)}")
                elif path == "/metrics":
                    from agent.metrics import CONTENT_TYPE

                    self._send(200, server.source.metrics(), CONTENT_TYPE)
                else:
                    self._error(404, "no such page")
            except BadRequest as err:
                self._error(400, str(err))
            except _GONE:
                raise  # the server's handle_error: a DEBUG line, no traceback
            except Exception:
                log.exception("status page: error answering %s", path)
                self._error(500, "internal error (see the agent's log)")

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            text = (self.headers.get("Content-Length") or "0").strip()
            if not text.isdigit():
                self.close_connection = True  # where the body ends is unknown: no keep-alive
                self._error(400, "Content-Length must be a number of bytes")
                return
            length = int(text)
            if length > 65536:
                self.close_connection = True  # its body is not read: the connection cannot go on
                self._error(413, "request too large")
                return
            if length:
                self.rfile.read(length)  # actions take no body; read it to keep the connection sane
            if not self._guard(write=True):
                return
            parts = urlsplit(self.path)
            if scope := _SCOPE.match(parts.path):
                drop = next(iter(parse_qs(parts.query).get("drop") or []), None)
                try:
                    message = server.source.pause_scope(scope.group(1), drop)
                except AgentError as err:
                    self._error(409, err.message)
                    return
                log.info("status page: %s %s: %s", scope.group(1), drop or "the whole agent", message)
                self._json(200, {"ok": True, "message": message, "time": time.time()})
                return
            m = _ACTION.match(parts.path)
            if m is None or m.group(2) not in ACTIONS:
                self._error(404, "no such action (retry, cancel, rerun, pause, resume)")
                return
            try:
                message = server.source.act(m.group(2), int(m.group(1)))
            except KeyError:
                self._error(404, f"no dataset #{m.group(1)}")
                return
            except AgentError as err:
                self._error(409, err.message)
                return
            except _GONE:
                raise
            except Exception:
                log.exception("status page: %s of #%s failed", m.group(2), m.group(1))
                self._error(500, "internal error (see the agent's log)")
                return
            log.info("status page: %s of #%s: %s", m.group(2), m.group(1), message)
            self._json(200, {"ok": True, "message": message, "time": time.time()})

        def do_PUT(self) -> None:  # noqa: N802 - stdlib name
            self._error(405, "method not allowed")

        do_DELETE = do_PUT  # noqa: N815 - stdlib naming
        do_PATCH = do_PUT  # noqa: N815
        do_OPTIONS = do_PUT  # noqa: N815 - no CORS preflight is ever granted

    return Handler
