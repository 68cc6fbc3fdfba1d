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

import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agent.localvip.codes import (
    ApiFailure,
    platform_errors,
    uncoded,
)
from agent.localvip.executions import Engine
from agent.localvip.faults import FaultSpec
from agent.localvip.handler import Handler
from agent.localvip.pipelines import Pipeline, load_pipelines
from agent.localvip.plumbing import (
    LOCK_AFTER_FAILURES,
    MAX_LIST_LIMIT,
    RequestStats,
    TransferGate,
    land_quietly,
)
from agent.localvip.redirect import RedirectServer
from agent.localvip.state import State
from agent.localvip.storage import Storage

log = logging.getLogger("agent.localvip")

@dataclass
class User:
    email: str
    folder: str
    key: str = field(repr=False)
    failures: int = 0
    locked: bool = False


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
        super().__init__(addr, Handler)


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
        self._redirect: RedirectServer | None = None
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
            self._redirect = RedirectServer((self.host, self._faults.redirect_port), self.url)
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
            self.stats.count("staged")
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
        timer = threading.Timer(after, land_quietly, args=(self.storage, tmp, target, vip_path),
                                kwargs={"make_parents": True})
        timer.daemon = True
        timer.start()

    def land_when_free(self, tmp: Path, target: Path, vip_path: str) -> None:
        """A storage upload still queued when VIP gave up: it runs once a slot frees."""
        def run() -> None:
            self.transfers.acquire(self._faults.platform_transfers, None)
            try:
                self.sleep_staging("PUT", "/rest/path" + vip_path)
                land_quietly(self.storage, tmp, target, vip_path, make_parents=True)
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
