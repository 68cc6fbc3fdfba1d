"""HTTP front end of the local VIP server, and :class:`LocalVip`.

Stdlib ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive. Request bodies
(Content-Length or chunked) are streamed to a temp file under
``<root>/.localvip/tmp`` and linked into place; downloads use ``sendfile``
(falling back to 1 MiB chunks), so memory stays flat for multi-GB files.

Deliberate differences from VIP (VIP-portal 4.x behaviour, see docs/vip-rest.md), made so the
official ``vip-client`` 0.1.10 works end to end:

* a trailing ``/`` on a ``/rest/path`` URL is ignored: the client's ``create_dir``
  sends ``PUT /rest/path/vip/Home/dir/``;
* ``PUT /rest/platform`` (the client's key check) behaves like GET, as VIP's
  method-less mapping does; a valid key therefore gets 200 + platform JSON;
* ``/vip/Home``, ``/vip/Trash`` and the group folders given at start exist; API key *i*
  belongs to user *i* (``user@localvip``, ``user2@localvip``...), all with one password.

The ``production`` profile (``LocalVip(profile="production")``, docs/localvip.md) adds
VIP's slowness and strictness: staged transfers under a platform-wide cap, slow
``/results``, engine refusals, an http->"https" redirect listener, late landings, GASW
job statuses, a configurable listing cap.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

from agent.localvip.codes import (
    EXEC_NAME_VALID_CHARS,
    GENERIC,
    ApiFailure,
    coded,
    generic,
    platform_errors,
    uncoded,
)
from agent.localvip.executions import Engine
from agent.localvip.faults import FaultSpec
from agent.localvip.pipelines import Pipeline, load_pipelines
from agent.localvip.state import State
from agent.localvip.storage import Storage

log = logging.getLogger("agent.localvip")

CHUNK = 1 << 20
MAX_JSON_BODY = 64 << 20
MAX_LIST_LIMIT = 500
LOCK_AFTER_FAILURES = 5
DROP_STATUSES = [500, 502]


@dataclass
class User:
    email: str
    folder: str
    key: str = field(repr=False)
    failures: int = 0
    locked: bool = False


class _Dropped(Exception):
    """The connection was dropped on purpose (fault injection)."""


class BodyReader:
    """Reads a request body framed by Content-Length or chunked encoding."""

    def __init__(self, rfile: Any, headers: Any) -> None:
        self.rfile = rfile
        te = (headers.get("Transfer-Encoding") or "").lower()
        self.chunked = "chunked" in te
        length = headers.get("Content-Length")
        try:
            self.remaining = 0 if self.chunked else max(0, int(length or 0))
        except ValueError:
            raise generic(400) from None
        self.chunk_left = 0
        self.done = not self.chunked and self.remaining == 0

    def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes; b"" at the end of the body."""
        if self.done:
            return b""
        if not self.chunked:
            data = self.rfile.read(min(n, self.remaining))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            self.remaining -= len(data)
            self.done = self.remaining == 0
            return data
        if self.chunk_left == 0:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise generic(400) from None
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = self.rfile.readline(8192)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                self.done = True
                return b""
            self.chunk_left = size
        data = self.rfile.read(min(n, self.chunk_left))
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        self.chunk_left -= len(data)
        if self.chunk_left == 0:
            self.rfile.readline(8)  # CRLF after the chunk
        return data

    def read_all(self, limit: int = MAX_JSON_BODY) -> bytes:
        parts, total = [], 0
        while chunk := self.read():
            total += len(chunk)
            if total > limit:
                raise generic(400)
            parts.append(chunk)
        return b"".join(parts)

    def drain(self) -> int:
        total = 0
        while chunk := self.read():
            total += len(chunk)
        return total


class RequestStats:
    """What the server was asked, for tests and benchmarks (bounded: counts, not a log).

    ``counts`` maps a request kind (``upload``, ``mkdir``, ``properties``, ``list``,
    ``exists``, ``content``, ``delete``, ``GET /executions``...) to how many were received,
    and production events (``launch refused``, ``late landing``, ``transfer wait timeout``)
    to how many happened; ``peak_in_flight`` is the most requests handled at the same time;
    ``total`` every request, ``per_second`` requests by start second (the last hour),
    ``timeline`` the counts by second and kind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.total = 0
        self.per_second: Counter[int] = Counter()
        #: (second, kind) -> count, so a benchmark can attribute events to a time window
        self.timeline: Counter[tuple[int, str]] = Counter()

    def enter(self) -> None:
        second = int(time.time())
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.total += 1
            self.per_second[second] += 1
            if len(self.per_second) > 3600:
                del self.per_second[min(self.per_second)]

    def snapshot(self) -> dict[str, Any]:
        """Everything above as JSON-ready data (``--stats FILE`` writes it at exit)."""
        with self._lock:
            return {
                "total": self.total, "counts": dict(self.counts),
                "peak_in_flight": self.peak_in_flight,
                "peak_requests_per_second": max(self.per_second.values(), default=0),
                "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
                "timeline": [[sec, kind, n] for (sec, kind), n in sorted(self.timeline.items())],
            }

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def count(self, kind: str) -> None:
        second = int(time.time())
        with self._lock:
            self.counts[kind] += 1
            self.timeline[(second, kind)] += 1
            if len(self.timeline) > 100_000:
                del self.timeline[min(self.timeline)]

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.peak_in_flight = self.in_flight
            self.total = 0
            self.per_second.clear()
            self.timeline.clear()


class TransferGate:
    """The platform-wide pool of storage transfers (GRIDA's upload and download pools).

    ``limit`` is read at each acquire (0 = no cap), so a test may change the fault while
    the server runs. ``peak`` is the most transfers staged at once, ``timeouts`` how many
    transfers waited longer than allowed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.active = 0
        self.peak = 0
        self.timeouts = 0

    def acquire(self, limit: int, wait: float | None) -> bool:
        """Take a slot within ``wait`` seconds (None: however long it takes)."""
        deadline = None if wait is None else time.monotonic() + wait
        with self._cond:
            while limit > 0 and self.active >= limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.timeouts += 1
                    return False
                self._cond.wait(left)
            self.active += 1
            self.peak = max(self.peak, self.active)
            return True

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    app: LocalVip

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed, timed out) is routine, not a traceback on stderr."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def __init__(self, addr: tuple[str, int], app: LocalVip) -> None:
        self.app = app
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "localvip"
    sys_version = ""
    timeout = 300  # idle keep-alive connections end after this
    server: _HTTPServer

    # -- plumbing ----------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        with self.server.conns_lock:
            self.server.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("localvip %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    # -- responses ---------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str | None, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._sent = True
        if self.command == "HEAD" or status == 204:
            return
        if self._drop_response and body:
            self.wfile.write(body[: len(body) // 2])
            raise _Dropped()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        self._send(status, data, "application/json")

    def _text(self, text: str) -> None:
        self._send(200, text.encode("utf-8"), "text/plain;charset=UTF-8")

    def _error(self, err: ApiFailure) -> None:
        headers = {"WWW-Authenticate": "header; header-name=apikey"} if err.http_status == 401 else None
        body = json.dumps({"errorCode": err.code, "errorMessage": err.message}, separators=(",", ":"))
        self._send(err.http_status, body.encode("utf-8"), "application/json", headers)

    # -- dispatch ----------------------------------------------------------------
    def _dispatch(self) -> None:
        self._sent = False
        self._drop_response = False
        app = self.server.app
        self.body = None
        method = self.command.upper()
        app.stats.enter()
        try:
            self.body = BodyReader(self.rfile, self.headers)
            split = urlsplit(self.path)
            raw_path = split.path
            query = parse_qs(split.query, keep_blank_values=True)
            faults = app.faults
            if faults.active:
                if faults.latency > 0 and faults.targets(method, raw_path):
                    time.sleep(faults.latency)
                if faults.roll("error_rate", method, raw_path):
                    self.body.drain()
                    status = faults.choice(DROP_STATUSES)
                    page = f"<html><body><h1>{status} Proxy Error</h1></body></html>".encode()
                    self._send(status, page, "text/html")
                    return
                if faults.roll("drop_rate", method, raw_path):
                    self._drop_response = True
            self._route(app, method, raw_path, split.query, query)
        except ApiFailure as err:
            self._finish_error(err)
        except _Dropped:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("localvip: unexpected error on %s %s", method, urlsplit(self.path).path)
            self._finish_error(ApiFailure(8000, GENERIC, 500))
        finally:
            app.stats.leave()
            if self.body is not None and not self.body.done and not self.close_connection:
                try:
                    self.body.drain()
                except Exception:
                    self.close_connection = True

    def _finish_error(self, err: ApiFailure) -> None:
        if self._sent:
            self.close_connection = True
            return
        try:
            if self.body is not None and not self.body.done:
                self.body.drain()
            self._error(err)
        except _Dropped:
            self.close_connection = True
        except Exception:
            self.close_connection = True

    def _route(self, app: LocalVip, method: str, raw_path: str, raw_query: str, query: dict[str, list[str]]) -> None:
        if raw_path != "/rest" and not raw_path.startswith("/rest/"):
            raise generic(404)
        sub = raw_path[len("/rest"):]
        is_path = sub.startswith("/path/")
        route = sub if is_path else (sub.rstrip("/") or "/")
        user = self._auth(app)
        public = (
            route in ("/platform", "/authenticate")
            or (route == "/pipelines" and method in ("GET", "HEAD") and "public" in query)
        )
        if user is None and not public:
            raise ApiFailure(
                8003, "Full authentication is required to access this resource", 401, suffix=False
            )
        if route == "/platform":
            return self._json(app.platform())
        if route == "/authenticate":
            if method != "POST":
                raise generic(405)
            return self._authenticate(app)
        if route == "/pipelines" or route.startswith("/pipelines/"):
            return self._pipelines(app, user, route, raw_path, query)
        if is_path:
            assert user is not None
            return self._path(app, user, method, raw_path, query)
        if route == "/executions" or route.startswith("/executions/"):
            assert user is not None
            app.stats.count(f"{method} {'/executions' if route == '/executions' else '/executions/{id}'}")
            return self._executions(app, user, method, route, query)
        raise generic(404)

    def _auth(self, app: LocalVip) -> User | None:
        key = self.headers.get("apikey")
        if key is None:
            return None
        user = app.user_for_key(key.strip())
        if user is None:
            raise ApiFailure(8002, "Bad credentials", 401, suffix=False)
        if user.locked:
            raise ApiFailure(8004, "User account is locked", 401, suffix=False)
        return user

    def _json_body(self) -> Any:
        assert self.body is not None
        raw = self.body.read_all()
        if not raw.strip():
            raise generic(400)
        try:
            return json.loads(raw)
        except ValueError:
            raise generic(400) from None

    # -- /authenticate ---------------------------------------------------------------
    def _authenticate(self, app: LocalVip) -> None:
        body = self._json_body()
        if not isinstance(body, dict):
            raise generic(400)
        for key in ("username", "password"):
            if body.get(key) is None:
                raise ApiFailure(8009, f"Input field '{key}' is not valid. Cause : must not be null")
        key = app.authenticate(str(body["username"]), str(body["password"]))
        self._json({"httpHeader": "apikey", "httpHeaderValue": key})

    # -- /pipelines ------------------------------------------------------------------
    def _pipelines(self, app: LocalVip, user: User | None, route: str, raw_path: str,
                   query: dict[str, list[str]]) -> None:
        pipes = app.pipelines()
        if route == "/pipelines" and "pipelineId" not in query:
            self._json([p.summary() for p in pipes.values() if user is None or p.allowed(user.email)])
            return
        if route == "/pipelines":
            ident = unquote_plus(query["pipelineId"][0])
        else:
            raw = raw_path[len("/rest/pipelines/"):].rstrip("/")
            segs = raw.split("/")
            if len(segs) > 2 or not all(segs):
                raise generic(404)
            # Spring decodes the path once, the controller URL-decodes the id again
            ident = "/".join(unquote_plus(unquote(s)) for s in segs)
        if user is None:
            raise ApiFailure(8003, "Full authentication is required to access this resource", 401, suffix=False)
        pipeline = app.engine.resolve_pipeline(ident, user.email)
        if query.get("format", [""])[0] == "boutiques":
            self._json(pipeline.descriptor)
            return
        self._json(pipeline.detail(ident, legacy_defaults=app.faults.legacy_defaults))

    # -- /path -------------------------------------------------------------------------
    def _path(self, app: LocalVip, user: User, method: str, raw_path: str, query: dict[str, list[str]]) -> None:
        complete = unquote(raw_path[len("/rest/path"):])  # decoded once; '+' stays '+'
        storage = app.storage
        action = query.get("action")
        if action is not None:
            res = storage.resolve(user.folder, complete)
            act = action[0]
            app.stats.count(act)
            if act == "exists":
                return self._json({"exists": storage.exists(res)})
            if act == "properties":
                return self._json(storage.properties(res))
            if act == "list":
                return self._json(storage.list(res))
            if act == "md5":
                raise ApiFailure(8000, GENERIC)
            if act == "content":
                return self._download(app, method, res)
            raise generic(400)
        if method == "PUT":
            return self._upload(app, user, complete)
        if method == "DELETE":
            app.stats.count("delete")
            res = storage.resolve(user.folder, complete)
            storage.delete(res, app.effective_delete_delay())
            return self._send(204, b"", None)
        raise generic(400)  # missing 'action' parameter

    def _download(self, app: LocalVip, method: str, res: Any) -> None:
        local: Path | None = res.local
        if local is None or not local.is_file():
            raise ApiFailure(8000, f"The path '{res.vip_path}' does not exist or is not a file")
        size = local.stat().st_size
        if size > app.max_download:
            raise ApiFailure(8000, f"The file '{res.vip_path}' is too big to be downloaded directly")
        if app.faults.roll("transfer_timeout", method, urlsplit(self.path).path):
            raise ApiFailure(8000, f"Transfer of '{res.vip_path}' timed out")
        if method != "HEAD":
            # storage copies the file to the portal first (a staged operation), then it is sent
            app.stage_transfer(method, urlsplit(self.path).path)
        with open(local, "rb") as f:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self._sent = True
            if method == "HEAD":
                return
            limit = size // 2 if self._drop_response else size
            _copy_to_socket(f, self.connection, self.wfile, limit)
            if self._drop_response:
                raise _Dropped()
        with app._count_lock:
            app.downloads[res.vip_path] += 1

    def _upload(self, app: LocalVip, user: User, complete: str) -> None:
        storage = app.storage
        assert self.body is not None
        res = storage.resolve(user.folder, complete)
        target = storage.upload_target(res)
        app.stats.count("upload" if self.body.remaining or self.body.chunked else "mkdir")
        if target.exists():
            n = self.body.drain()
            if n == 0 and target.is_dir():
                return self._send(201, b"", None)
            raise ApiFailure(8000, f"File '{res.vip_path}' already exists")
        tmp: Path | None = storage.new_tmp()
        assert tmp is not None
        try:
            ctype = (self.headers.get("Content-Type") or "").lower()
            if ctype.startswith("application/carmin+json"):
                n = self._base64_body(tmp)
            else:
                n = self._stream_body(tmp)
            if n == 0:
                storage.mkdir(target, res.vip_path)
                return self._send(201, b"", None)
            url_path = urlsplit(self.path).path
            if app.faults.roll("late_landing", "PUT", url_path):
                # the storage upload failed and was rescheduled: VIP gives up after its wait
                # (400 8000), the file lands later, even into a folder deleted meanwhile
                landing_late: Path = tmp
                tmp = None
                app.stats.count("late landing")
                app.land_late(landing_late, target, res.vip_path)
                time.sleep(app.faults.transfer_wait)
                raise uncoded()
            if not app.transfers.acquire(app.faults.platform_transfers, app.faults.transfer_wait):
                # no storage slot within VIP's wait: the timeout answer, while the queued
                # storage operation still runs when a slot frees (and lands the file)
                queued: Path = tmp
                tmp = None
                app.stats.count("transfer wait timeout")
                app.land_when_free(queued, target, res.vip_path)
                raise uncoded()
            try:
                app.sleep_staging("PUT", url_path)
                if app.faults.roll("transfer_timeout", "PUT", url_path):
                    # VIP answers 400 after 45 s while GRIDA still lands the file
                    landing: Path = tmp
                    tmp = None
                    timer = threading.Timer(app.faults.transfer_land_delay, _land_quietly,
                                            args=(storage, landing, target, res.vip_path))
                    timer.daemon = True
                    timer.start()
                    raise ApiFailure(8000, f"Transfer of '{res.vip_path}' timed out")
                storage.land(tmp, target, res.vip_path)
                tmp = None
            finally:
                app.transfers.release()
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()
        self._send(201, b"", None)

    def _stream_body(self, tmp: Path) -> int:
        assert self.body is not None
        total = 0
        drop_at = None
        if self._drop_response:
            drop_at = max(1, self.body.remaining // 2) if not self.body.chunked else CHUNK
        with open(tmp, "wb", buffering=0) as f:
            while chunk := self.body.read(CHUNK):
                f.write(chunk)
                total += len(chunk)
                if drop_at is not None and total >= drop_at:
                    raise _Dropped()
        if drop_at is not None:
            raise _Dropped()
        return total

    def _base64_body(self, tmp: Path) -> int:
        body = self._json_body()
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise generic(400)
        kind = body["type"].lower()
        if kind == "archive":
            raise ApiFailure(8000, "Archive upload is not supported yet")
        if kind != "file":
            raise generic(400)
        try:
            data = base64.b64decode(str(body.get("base64Content") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise ApiFailure(8000, "Invalid base64 content") from None
        if self._drop_response:
            raise _Dropped()
        tmp.write_bytes(data)
        return len(data)

    # -- /executions ---------------------------------------------------------------
    def _executions(self, app: LocalVip, user: User, method: str, route: str,
                    query: dict[str, list[str]]) -> None:
        engine = app.engine
        parts = route.split("/")[2:]  # after '', 'executions'
        if not parts:
            if method == "POST":
                body = self._json_body()
                capacity = app.faults.roll("capacity", method, "/rest/executions")
                exec_id = engine.create(user.email, user.folder, body, capacity_fault=capacity,
                                        legacy_dates=app.faults.legacy_dates, refusal=app.engine_refusal)
                return self._json(engine.view(engine.owned(exec_id, user.email)))
            if method not in ("GET", "HEAD"):
                raise generic(405)
            if "offset" in query or "studyIdentifier" in query:
                raise ApiFailure(8000, "offset and studyIdentifier are not supported")
            cap = app.list_limit()
            try:
                limit = int(query.get("limit", [str(cap)])[0])
            except ValueError:
                raise generic(400) from None
            if limit > cap:
                if app.faults.list_limit is not None:
                    raise uncoded()  # VIP: ApiException("limit parameter too high"), no code
                raise ApiFailure(8000, f"The limit cannot exceed {MAX_LIST_LIMIT}")
            rows = app.state.executions(user.email, max(limit, 0))
            return self._json([engine.view(r, summary=True) for r in rows])
        if parts == ["count"]:
            return self._text(str(app.state.count(user.email)))
        if parts[0] == "examples":
            if len(parts) == 1:
                return self._json([])
            raise coded(8016, parts[1])
        row = engine.owned(parts[0], user.email)
        rest = parts[1:]
        if not rest:
            if method == "PUT":
                return self._update(app, user, row)
            path = urlsplit(self.path).path
            knob = {"Running": "unknown_blip", "Killed": "unknown_after_kill"}.get(row.status)
            blip = method == "GET" and knob is not None and app.faults.roll(knob, method, path)
            return self._json(engine.view(row, blip=blip, statuses=app.faults.job_statuses))
        if rest == ["results"]:
            out = []
            outputs = app.state.outputs(row.id)
            delay = app.faults.results_delay
            if delay > 0 and outputs and app.faults.targets(method, urlsplit(self.path).path):
                time.sleep(delay * len(outputs))  # about two storage calls per output file
            for _out_id, path in outputs:
                try:
                    out.append(app.storage.properties(app.storage.resolve(user.folder, path)))
                except ApiFailure:
                    continue
            return self._json(out)
        if rest in (["stdout"], ["stderr"]):
            jobs = app.state.jobs(row.id)
            if not jobs:
                return self._text("no log found")
            if len(jobs) > 1:
                return self._text("jobId is required when multiple tasks exist")
            log_file = engine.log_path(row.id, jobs[0].job, rest[0][3:])
            if not log_file.is_file():
                raise ApiFailure(8000, "Log file not found")
            return self._text(log_file.read_text(encoding="utf-8", errors="replace"))
        if len(rest) == 3 and rest[0] == "jobs" and rest[2] in ("stdout", "stderr"):
            try:
                job = int(rest[1])
            except ValueError:
                raise generic(400) from None
            log_file = engine.log_path(row.id, job, rest[2][3:])
            if not log_file.is_file():
                return self._text(f"no log found for job {rest[1]}")
            return self._text(log_file.read_text(encoding="utf-8", errors="replace"))
        if rest == ["kill"]:
            if method != "PUT":
                raise generic(405)
            engine.kill(row)
            return self._send(204, b"", None)
        if rest == ["play"]:
            if method != "PUT":
                raise generic(405)
            raise coded(8001, "playExecution")
        if rest == ["delete"]:
            if method != "PUT":
                raise generic(405)
            body = self._json_body()
            if not isinstance(body, dict):
                raise generic(400)
            engine.delete(row, user.folder, bool(body.get("deleteFiles")), app.effective_delete_delay())
            return self._send(204, b"", None)
        raise generic(404)

    def _update(self, app: LocalVip, user: User, row: Any) -> None:
        body = self._json_body()
        if not isinstance(body, dict):
            raise generic(400)
        for key in ("name", "pipelineIdentifier", "inputValues"):
            if body.get(key) is None:
                raise ApiFailure(8009, f"Input field '{key}' is not valid. Cause : must not be null")
        timeout = body.get("timeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            raise ApiFailure(8000, "Updating the timeout is not supported")
        from agent.localvip.executions import NAME_VALID

        name = str(body["name"])
        if not NAME_VALID.fullmatch(name):
            raise coded(8019, f"Authorized characters are {EXEC_NAME_VALID_CHARS}")
        app.state.rename(row.id, name)
        self._json(app.engine.view(app.engine.owned(row.id, user.email)))


def _land_quietly(storage: Storage, tmp: Path, target: Path, vip_path: str, *,
                  make_parents: bool = False) -> None:
    try:
        storage.land(tmp, target, vip_path, make_parents=make_parents)
        log.info("localvip: %s landed late", vip_path)
    except Exception as err:
        log.info("localvip: late landing of %s failed: %s", vip_path, err)
        if tmp.exists():
            tmp.unlink()


def _copy_to_socket(f: Any, sock: socket.socket, wfile: Any, count: int) -> None:
    """Send ``count`` bytes of ``f``: zero-copy sendfile, else 1 MiB chunks."""
    offset = 0
    try:
        fd = f.fileno()
        while offset < count:
            sent = os.sendfile(sock.fileno(), fd, offset, min(count - offset, 1 << 30))
            if sent == 0:
                raise ConnectionError("peer closed during download")
            offset += sent
        return
    except (AttributeError, OSError) as err:
        if isinstance(err, (BrokenPipeError, ConnectionError)):
            raise
    f.seek(offset)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while offset < count:
        n = f.readinto(view[: min(CHUNK, count - offset)])
        if not n:
            break
        wfile.write(view[:n])
        offset += n


class LocalVip:
    """A VIP-compatible REST server with local pipelines, in a background thread.

    ``root`` holds user storage (``<root>/<user folder>`` is ``/vip/Home``) and the
    server's private area ``<root>/.localvip`` (SQLite state, job work dirs, temp
    files). ``faults`` may be a :class:`FaultSpec` or a spec string.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: list[str] | None = None,
        pipelines_dir: str | os.PathLike[str] | None = None,
        max_running: int = 1,
        faults: FaultSpec | str | None = None,
        max_download: int = 15_000_000,
        delete_delay: float = 0.0,
        username: str = "user@localvip",
        password: str = "localvip",
        max_platform_running: int = 35,
        max_parallel_jobs: int = 4,
        kill_grace: float = 2.0,
        profile: str = "ideal",
        groups: dict[str, list[str]] | None = None,
    ) -> None:
        FaultSpec.for_profile(profile)  # unknown profile: ConfigError now, not at start
        self.profile = profile
        self.root = Path(root).resolve()
        self.host = host
        self.port = port
        keys = list(api_keys) if api_keys else [secrets.token_urlsafe(24)]
        if any(not k or k != k.strip() for k in keys):
            raise ValueError("API keys must be non-empty and without surrounding spaces")
        self.users: list[User] = []
        for i, key in enumerate(keys):
            local, _, domain = username.partition("@")
            email = username if i == 0 else f"{local}{i + 1}@{domain}" if domain else f"{local}{i + 1}"
            folder = email.replace("@", "_").replace(".", "_")
            self.users.append(User(email, folder, key))
        self._by_key = {u.key: u for u in self.users}
        #: group name -> member folders (``/vip/<name> (group)``)
        self.groups: dict[str, list[str]] = {}
        for gname, members in (groups or {}).items():
            self.groups[gname] = [self._member_folder(m, gname) for m in members]
        self._password = password
        self.pipelines_dir = Path(pipelines_dir) if pipelines_dir else None
        self.max_running = max_running
        #: read on every request: a test may raise it while the server runs
        self.max_download = max_download
        #: VIP path -> how many times its content was served in full (tests count downloads)
        self.downloads: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self.delete_delay = delete_delay
        self.max_platform_running = max_platform_running
        self.max_parallel_jobs = max_parallel_jobs
        self.kill_grace = kill_grace
        self._faults = _as_faults(faults, profile)
        #: the platform-wide pool of staged transfers (``platform_transfers``)
        self.transfers = TransferGate()
        self._redirect: _RedirectServer | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._pipes: dict[str, Pipeline] = {}
        self._auth_lock = threading.Lock()
        #: request counts and peak concurrency (tests, benchmarks)
        self.stats = RequestStats()

    # -- public API ------------------------------------------------------------------
    @property
    def api_key(self) -> str:
        return self.users[0].key

    @property
    def api_keys(self) -> list[str]:
        return [u.key for u in self.users]

    @property
    def faults(self) -> FaultSpec:
        return self._faults

    @faults.setter
    def faults(self, value: FaultSpec | str | None) -> None:
        """A FaultSpec as is; a spec string or None over this server's profile defaults."""
        self._faults = _as_faults(value, self.profile)

    @property
    def redirect_url(self) -> str | None:
        """``http://host:port`` of the listener answering 301 to :attr:`url` (``redirect_port``)."""
        if self._redirect is None:
            return None
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self._redirect.server_address[1]}"

    def group_dir(self, name: str) -> Path:
        """Local folder behind ``/vip/<name> (group)`` (for tests)."""
        return self.root / ".localvip" / "groups" / name

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LocalVip is not started")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    def home(self, user: int = 0) -> Path:
        """Local folder behind ``/vip/Home`` of user ``user`` (for tests)."""
        return self.root / self.users[user].folder

    def start(self) -> LocalVip:
        if self._httpd is not None:
            return self
        private = self.root / ".localvip"
        private.mkdir(parents=True, exist_ok=True)
        self.state = State(private / "state.sqlite3")
        self.storage = Storage(self.root, private)
        for u in self.users:
            self.state.set_user(u.email, u.folder, u.key)
            self.storage.home(u.folder)
        for gname, folders in self.groups.items():
            self.storage.add_group(gname, folders)
        self.reload_pipelines()
        self.engine = Engine(
            self.state, self.storage, lambda: self._pipes, private / "work",
            max_running=self.max_running, max_platform_running=self.max_platform_running,
            max_parallel_jobs=self.max_parallel_jobs, kill_grace=self.kill_grace,
        )
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name="localvip-http", daemon=True,
        )
        self._thread.start()
        if self._faults.redirect_port is not None:
            self._redirect = _RedirectServer((self.host, self._faults.redirect_port), self.url)
            threading.Thread(
                target=self._redirect.serve_forever, kwargs={"poll_interval": 0.05},
                name="localvip-redirect", daemon=True,
            ).start()
        log.info("localvip: serving %s (root %s, profile %s)", self.url, self.root, self.profile)
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        redirect, self._redirect = self._redirect, None
        if redirect is not None:
            redirect.shutdown()
            redirect.server_close()
        httpd.shutdown()
        httpd.server_close()
        with httpd.conns_lock:
            conns = list(httpd.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self.engine.stop()
        self.storage.flush_pending()
        self.state.close()

    def __enter__(self) -> LocalVip:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload_pipelines(self) -> None:
        """Re-read built-in and ``pipelines_dir`` descriptors."""
        self._pipes = load_pipelines(self.pipelines_dir)

    def pipelines(self) -> dict[str, Pipeline]:
        return self._pipes

    # -- used by the handler -----------------------------------------------------------
    def user_for_key(self, key: str) -> User | None:
        return self._by_key.get(key) if key else None

    def authenticate(self, username: str, password: str) -> str:
        with self._auth_lock:
            user = next((u for u in self.users if u.email == username), None)
            if user is None:
                raise ApiFailure(8002, "Bad credentials", 401)
            if user.locked:
                raise ApiFailure(8004, "User account is locked", 401)
            if not secrets.compare_digest(password.encode(), self._password.encode()):
                user.failures += 1
                if user.failures > LOCK_AFTER_FAILURES:
                    user.locked = True
                raise ApiFailure(8002, "Bad credentials", 401)
            user.failures = 0
            return user.key

    def effective_delete_delay(self) -> float:
        return max(self.delete_delay, self._faults.delete_delay)

    def stats_snapshot(self) -> dict[str, Any]:
        """Request statistics plus the staged-transfer pool's (``--stats FILE``)."""
        return {
            **self.stats.snapshot(), "profile": self.profile,
            "transfers": {"peak": self.transfers.peak, "timeouts": self.transfers.timeouts},
        }

    def list_limit(self) -> int:
        """Largest ``limit`` of GET /executions (VIP's configured default, 500)."""
        cap = self._faults.list_limit
        return MAX_LIST_LIMIT if cap is None else cap

    def engine_refusal(self) -> ApiFailure | None:
        """A launch refusal drawn for ``launch_refusal``, or None."""
        faults = self._faults
        if not faults.roll("launch_refusal", "POST", "/rest/executions"):
            return None
        code, text = faults.refusal()
        log.info("localvip: engine refuses a launch (%d)", code)
        self.stats.count("launch refused")
        return ApiFailure(code, text)

    def sleep_staging(self, method: str, path: str) -> None:
        """The storage operation's own time (``staging_delay``)."""
        delay = self._faults.staging_delay
        if delay > 0 and self._faults.targets(method, path):
            time.sleep(delay)

    def stage_transfer(self, method: str, path: str) -> None:
        """A download's storage operation: a platform slot within VIP's wait, then its time."""
        faults = self._faults
        if not self.transfers.acquire(faults.platform_transfers, faults.transfer_wait):
            self.stats.count("transfer wait timeout")
            raise uncoded()  # VIP: "Aborting operation : too long", no code: the generic 8000
        try:
            self.sleep_staging(method, path)
        finally:
            self.transfers.release()

    def land_late(self, tmp: Path, target: Path, vip_path: str) -> None:
        """Land ``tmp`` after VIP's wait plus ``late_landing_delay``, recreating its folder."""
        after = self._faults.transfer_wait + self._faults.late_landing_delay
        timer = threading.Timer(after, _land_quietly, args=(self.storage, tmp, target, vip_path),
                                kwargs={"make_parents": True})
        timer.daemon = True
        timer.start()

    def land_when_free(self, tmp: Path, target: Path, vip_path: str) -> None:
        """A storage upload still queued when VIP gave up: it runs once a slot frees."""
        def run() -> None:
            self.transfers.acquire(self._faults.platform_transfers, None)
            try:
                self.sleep_staging("PUT", "/rest/path" + vip_path)
                _land_quietly(self.storage, tmp, target, vip_path, make_parents=True)
            finally:
                self.transfers.release()

        threading.Thread(target=run, name="localvip-queued-upload", daemon=True).start()

    def _member_folder(self, member: str, group: str) -> str:
        for u in self.users:
            if member in (u.email, u.email.partition("@")[0]):
                return u.folder
        raise ValueError(
            f"group '{group}': no user '{member}' (users: {', '.join(u.email for u in self.users)})"
        )

    def platform(self) -> dict[str, Any]:
        errors = platform_errors()
        return {
            "platformName": "VIP",
            "platformDescription": "Virtual Imaging Platform (localvip test double)",
            "email": "localvip@localhost",
            "supportedTransferProtocols": ["https"],
            "supportedModules": ["Processing", "Data"],
            "defaultLimitListExecutions": self.list_limit(),
            "unsupportedMethods": ["playExecution"],
            "supportedAPIVersion": "0.3",
            "maxSizeDirectTransfer": self.max_download,
            "minAuthorizedExecutionTimeout": None,
            "maxAuthorizedExecutionTimeout": None,
            "defaultStudy": None,
            "oidcLoginProviders": [],
            "APIErrorCodesAndMessages": errors,
            "apierrorCodesAndMessages": errors,
        }


def _as_faults(value: FaultSpec | str | None, profile: str = "ideal") -> FaultSpec:
    if value is None:
        return FaultSpec.for_profile(profile)
    if isinstance(value, str):
        return FaultSpec.parse(value, profile)
    return value


class _RedirectHandler(BaseHTTPRequestHandler):
    """Answers every request 301 to the same path on the real address (as VIP's front
    server sends http to https); the body, if any, is not read."""

    protocol_version = "HTTP/1.1"
    server_version = "localvip-redirect"
    sys_version = ""
    server: _RedirectServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("localvip redirect %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        body = (
            b"<html><head><title>301 Moved Permanently</title></head><body>"
            b"<center><h1>301 Moved Permanently</h1></center></body></html>"
        )
        self.send_response(301)
        self.send_header("Location", self.server.target + self.path)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET


class _RedirectServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], target: str) -> None:
        self.target = target
        super().__init__(addr, _RedirectHandler)
