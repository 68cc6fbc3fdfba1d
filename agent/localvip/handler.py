"""The local server's request handler: one method per CARMIN endpoint (``/authenticate``,
``/pipelines``, ``/path``, ``/executions``), answers shaped as VIP's."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

from agent.localvip.codes import (
    EXEC_NAME_VALID_CHARS,
    GENERIC,
    ApiFailure,
    coded,
    generic,
    uncoded,
)
from agent.localvip.plumbing import (
    CHUNK,
    DROP_STATUSES,
    MAX_LIST_LIMIT,
    BodyReader,
    Dropped,
    copy_to_socket,
    land_quietly,
)

if TYPE_CHECKING:
    from agent.localvip.server import LocalVip, User, _HTTPServer

log = logging.getLogger("agent.localvip")




class Handler(BaseHTTPRequestHandler):
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
            raise Dropped()
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
                    app.stats.count("latency")
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
        except Dropped:
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
        except Dropped:
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
            copy_to_socket(f, self.connection, self.wfile, limit)
            if self._drop_response:
                raise Dropped()
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
                    timer = threading.Timer(app.faults.transfer_land_delay, land_quietly,
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
                    raise Dropped()
        if drop_at is not None:
            raise Dropped()
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
            raise Dropped()
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
                app.stats.count("results delayed")
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


