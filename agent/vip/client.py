"""HTTP client for VIP's REST API (CARMIN dialect as VIP implements it).

See docs/vip-rest.md (VIP-portal 4.x behaviour) and docs/server-behaviour.md for what this client copes with. The client
knows HTTP, paths, transfers, pipelines and executions; it knows nothing about datasets.

Thread safety: one :class:`VipClient` may be shared by several worker threads. It holds one
``requests.Session`` whose connection pool (``pool`` connections per host) is thread-safe in
urllib3; the client never mutates the session after construction and VIP sets no cookies, so
concurrent calls do not interfere. The only shared state (the cached transfer limit) is locked.

Deadlines: every request has a connect timeout, a read timeout (per socket read) and an
overall deadline enforced by a watchdog thread that shuts the socket down, so a server that
drip-feeds bytes or never finishes its answer cannot hold a caller forever. Transfers have no
overall deadline but a minimum-progress rule: at least ``transfer_min_bytes`` every
``transfer_window`` seconds, else the transfer is abandoned (and retried).

Strict answers: a 2xx whose body is a VIP error object, or is not what the endpoint returns,
raises a typed error (:class:`ProtocolError` unless the code says more) with the raw answer in
its ``detail``.

Security: the API key is attached by a ``requests`` auth hook as the ``apikey`` header. It is
never put in a URL, a log line, an exception, or ``repr``. Redirects are not followed, since
``requests`` would copy the custom header to the redirect target.
"""

from __future__ import annotations

import builtins
import heapq
import http.client
import itertools
import json
import logging
import os
import random
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, NoReturn
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from agent.fsutil import StreamingSync
from agent.fsutil import fsync_dir as _fsync_dir
from agent.vip.errors import (
    AccessDeniedError,
    ApiError,
    AuthError,
    CapacityError,
    DeadlineExceeded,
    DeleteTimeout,
    EmptyFileError,
    InvalidNameError,
    LaunchUncertain,
    NotFoundError,
    ProtocolError,
    SizeMismatch,
    SourceChanged,
    TooLargeError,
    TransferTimeout,
    TransientError,
    UnsafePathError,
    VipError,
)
from agent.vip.models import PathInfo, start_seconds
from agent.vip.smallput import NotConnected, SmallPut

log = logging.getLogger(__name__)

__all__ = ["VipClient", "Progress", "encode_path", "encode_pipeline_id"]

#: progress callback: bytes moved since its previous call (a retried transfer counts again);
#: it may raise to abandon the transfer (the exception propagates unchanged)
Progress = Callable[[int], None]

_CHUNK = 1 << 20  # download write size and upload read cap
_SENDFILE_MIN = 1 << 20  # uploads at least this large are sent with sendfile ...
_SENDFILE_PIECE = 1 << 20  # ... in pieces of this size (progress and stop checks between)
_READ_BUFFER = 1 << 20  # reused receive buffer of large downloads
_DIRECT_READ_MIN = 8 << 20  # downloads at least this large are read into that buffer
_SEND_BLOCK = 1 << 20  # socket send block (urllib3 default is 16 KiB)
_ERROR_BODY_MAX = 64 << 10  # never read more than this of an error body
_AUTH_CODES = frozenset({8002, 8003, 8004})
_CAPACITY_CODES = frozenset({2000, 2001})
_NOT_FOUND_CODES = frozenset({8007, 8015})
_ACCESS_CODE = 8013
_DELETED_CODE = 8015
_BACKOFF_CAP = 60.0
_RAW_MAX = 2000  # characters of a wrong answer kept in an error's detail
#: names VIP stores unchanged: printable ASCII without spaces (VIP turns spaces into "_"
#: and drops non-ASCII, without telling the client the new name)
_SAFE_NAME = re.compile(r"[\x21-\x7e]+")


def encode_path(path: str) -> str:
    """Percent-encode a VIP path for ``/rest/path``: each segment encoded, ``/`` kept.

    VIP decodes the raw URI once and does not turn ``+`` into a space, so plain single
    encoding is right (``%20`` for spaces, ``%25``, ``%23``, ``%3F``).
    """
    return quote(path, safe="/")


def encode_pipeline_id(identifier: str) -> str:
    """URL path for a pipeline id: ``name/version`` split at the last ``/``, each segment encoded.

    VIP's controller URL-decodes the id a second time, so ``+`` (which would become a space)
    and ``%`` are double-encoded (``%252B``, ``%2525``).
    """
    if "/" not in identifier:
        return _encode_pipeline_segment(identifier)
    name, version = identifier.rsplit("/", 1)
    return _encode_pipeline_segment(name) + "/" + _encode_pipeline_segment(version)


def _encode_pipeline_segment(segment: str) -> str:
    once = segment.replace("%", "%25").replace("+", "%2B")
    return quote(once, safe="")


def _norm_remote(path: str) -> str:
    """Check and normalise a remote path: absolute, no dot segments, no trailing slash."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise UnsafePathError(f"VIP paths are absolute (start with /vip/): {path!r}")
    trimmed = path.rstrip("/") or "/"
    # urllib3 would resolve dot segments in the URL and address another path
    if any(seg in (".", "..") for seg in trimmed.split("/")):
        raise UnsafePathError(f"VIP paths cannot contain '.' or '..' segments: {path!r}")
    return trimmed


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc`` (requests nests it deep), if any."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return item
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return None


def _check_name(remote: str) -> None:
    name = remote.rsplit("/", 1)[-1]
    if not _SAFE_NAME.fullmatch(name):
        raise InvalidNameError(
            f"cannot create '{name}' on VIP: VIP renames names with spaces or non-ASCII "
            "characters without saying so; rename it using ASCII letters, digits, '-', '_' or '.'",
            detail=f"remote path {remote!r}",
        )


class _ApiKeyAuth(AuthBase):
    """Adds the ``apikey`` header at send time; its repr never shows the key."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def header(self) -> dict[str, str]:
        """The header carrying the key (none for an empty key: VIP then answers 8003, not 8002)."""
        return {"apikey": self.key} if self.key else {}

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self.header())
        return request

    def __repr__(self) -> str:
        return "<apikey hidden>"


class _FileSlice:
    """A piece of an upload that the connection sends with ``sendfile``: no copy through Python.

    :class:`_UploadBody` hands these to urllib3 instead of bytes; urllib3 passes each to
    the connection's ``send``, which :class:`_SendfileMixin` turns into ``socket.sendfile``
    (the kernel copies from the page cache to the socket; over TLS Python falls back to
    reads and sends, as before).
    """

    __slots__ = ("handle", "offset", "count")

    def __init__(self, handle: BinaryIO, offset: int, count: int) -> None:
        self.handle, self.offset, self.count = handle, offset, count

    def __bool__(self) -> bool:
        return self.count > 0

    def __len__(self) -> int:
        return self.count


class _SendfileMixin:
    """Connection sending :class:`_FileSlice` pieces with ``sendfile``, and the request head
    together with the first piece of its body (one ``send`` instead of two for a small file)."""

    sock: Any
    _held: bytes | None = None
    _hold_head = False

    def request(self, method: str, url: str, body: Any = None, *args: Any, **kwargs: Any) -> None:
        self._hold_head = body is not None
        try:
            super().request(method, url, body, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._hold_head = False
            self._flush()

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held:
            super().send(held)  # type: ignore[misc]

    def send(self, data: Any) -> None:
        if self._hold_head and self._held is None and isinstance(data, bytes):
            self._held = data  # the head: sent with the first piece of the body
            self._hold_head = False
            return
        if isinstance(data, _FileSlice):
            self._flush()
            sent = self.sock.sendfile(data.handle, data.offset, data.count)
            if sent != data.count:
                raise SourceChanged(
                    f"{getattr(data.handle, 'name', 'the file')} shrank while it was being sent",
                    detail=f"sendfile sent {sent} of {data.count} bytes at offset {data.offset}",
                )
            return
        if self._held is not None and isinstance(data, (bytes, bytearray, memoryview)):
            held, self._held = self._held, None
            data = held + bytes(data)
        super().send(data)  # type: ignore[misc]


class _Guard:
    """Deadline of one HTTP exchange, watched by :data:`_WATCHDOG`.

    ``deadline``: seconds for the whole exchange. ``window``/``min_bytes``: the exchange must
    move at least ``min_bytes`` (reported through :meth:`progress`) in every ``window``
    seconds. On expiry the connection's socket is shut down, which wakes a blocked read or
    write with an error; ``expired`` then says why.
    """

    def __init__(
        self, *, deadline: float | None = None, window: float | None = None, min_bytes: int = 0
    ) -> None:
        now = time.monotonic()
        self.deadline = deadline
        self.window = window
        self.min_bytes = min_bytes
        self._hard = now + deadline if deadline else None
        self._window_end = now + window if window else None
        self._moved = 0
        self._conn: Any = None
        self._lock = threading.Lock()
        self.closed = False
        #: why the exchange was cut ("deadline" or "stalled"), None while it is fine
        self.expired: str | None = None
        first = self._next()
        if first is not None:
            _WATCHDOG.add(self, first)

    def _next(self) -> float | None:
        times = [t for t in (self._hard, self._window_end) if t is not None]
        return min(times) if times else None

    def attach(self, conn: Any) -> None:
        with self._lock:
            self._conn = conn
        if self.expired:
            self._shut()

    def progress(self, count: int) -> None:
        with self._lock:
            self._moved += count

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _WATCHDOG.closed_one()

    def _shut(self) -> bool:
        with self._lock:
            sock = getattr(self._conn, "sock", None)
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def check(self, now: float) -> float | None:
        """Called by the watchdog when due: the next time to check, or None when done."""
        if self.closed:
            return None
        if self.expired is None:
            if self._hard is not None and now >= self._hard:
                self.expired = "deadline"
            elif self._window_end is not None and now >= self._window_end:
                with self._lock:
                    moved, self._moved = self._moved, 0
                if moved < self.min_bytes:
                    self.expired = "stalled"
                else:
                    self._window_end = now + (self.window or 0)
        if self.expired is not None:
            # a socket still being opened is shut as soon as it exists
            return None if self._shut() else now + 0.2
        return self._next()


class _Watchdog:
    """One daemon thread that enforces every :class:`_Guard`'s deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = 0  # guards closed but still in the heap

    def closed_one(self) -> None:
        """A guard ended before its time: drop the dead ones once they are most of the heap
        (a transfer's guard is due minutes later; thousands of small uploads would keep
        thousands of them alive)."""
        with self._cond:
            self._closed += 1
            if self._closed > 256 and self._closed * 2 > len(self._heap):
                self._heap = [item for item in self._heap if not item[2].closed]
                heapq.heapify(self._heap)
                self._closed = 0

    def add(self, guard: _Guard, when: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="vip-client-deadlines", daemon=True
                )
                self._thread.start()
            # the thread sleeps until the earliest time: wake it only when that changed
            # (not once per request: thousands of small uploads would keep waking it)
            if self._heap[0][2] is guard:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, guard = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                if guard.closed:
                    self._closed = max(0, self._closed - 1)
                    continue
            following = guard.check(now)
            if following is not None:
                self.add(guard, following)


_WATCHDOG = _Watchdog()
#: the guard of the request being sent by this thread (read by the connection classes)
_CURRENT = threading.local()


def _attach_current(conn: Any) -> None:
    guard = getattr(_CURRENT, "guard", None)
    if guard is not None:
        guard.attach(conn)


class _GuardedHTTPConnection(_SendfileMixin, urllib3.connection.HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_current(self)
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(_SendfileMixin, urllib3.connection.HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_current(self)
        super().request(*args, **kwargs)


class _GuardedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_GUARDED_POOLS = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class _Adapter(HTTPAdapter):
    """HTTPAdapter sending request bodies in larger blocks (file bodies with ``sendfile``),
    over connections that the deadline watchdog can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("blocksize", _SEND_BLOCK)
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _GUARDED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools have their own classes
            manager.pool_classes_by_scheme = _GUARDED_POOLS  # deadlines through a proxy too
        return manager


class _NotSent(TransientError):
    """The connection could not be opened: the request never reached the server."""


class _UploadBody:
    """File body streamed in bounded reads, with an exact length and progress reports.

    ``requests`` takes the length from ``__len__`` and sends an explicit Content-Length
    (VIP treats a 0-byte body as mkdir, so chunked encoding is avoided); urllib3 pulls
    the data through ``read(blocksize)``. A read without a size is capped too, so the
    file is never held in memory whole. Never more than ``size`` bytes are sent (a file
    growing meanwhile cannot corrupt the request); a file that shrank raises
    :class:`SourceChanged` instead of leaving the server waiting for missing bytes.
    """

    def __init__(
        self, handle: BinaryIO, size: int, progress: Progress | None, *, zero_copy: bool = False
    ) -> None:
        self._handle = handle
        self._size = size
        self._progress = progress
        self._zero_copy = zero_copy
        self.sent = 0
        #: the transfer's progress guard (set by the sender)
        self.guard: _Guard | None = None

    def __len__(self) -> int:
        return self._size

    def read(self, size: int | None = -1) -> Any:
        if self._zero_copy:
            # a reference to the next piece, sent by the connection with sendfile
            count = min(_SENDFILE_PIECE, self._size - self.sent)
            if count <= 0:
                return b""
            piece = _FileSlice(self._handle, self.sent, count)
            self.sent += count
            if self.guard is not None:
                self.guard.progress(count)
            if self._progress is not None:
                self._progress(count)
            return piece
        if size is None or size < 0 or size > _CHUNK:
            size = _CHUNK
        size = min(size, self._size - self.sent)
        if size <= 0:
            return b""
        data = self._handle.read(size)
        if not data:
            raise SourceChanged(
                f"{getattr(self._handle, 'name', 'the file')} shrank while it was being sent "
                f"({self.sent:,} of {self._size:,} bytes read)",
            )
        self.sent += len(data)
        if self.guard is not None:
            self.guard.progress(len(data))
        if self._progress is not None:
            self._progress(len(data))
        return data

    def __iter__(self) -> Any:
        while True:
            data = self.read(_CHUNK)
            if not data:
                return
            yield data


class VipClient:
    """Typed client for one VIP portal.

    ``base_url`` is the portal URL (``https://vip.creatis.insa-lyon.fr`` or
    ``http://127.0.0.1:43127``); the REST root is ``base_url + "/rest/"``. Idempotent calls are
    retried ``retries`` times on :class:`TransientError` with exponential backoff starting at
    ``backoff`` seconds plus jitter; ``POST /executions`` never is.

    Time limits: ``connect_timeout`` (default ``min(timeout, 15)``) to open a connection,
    ``timeout`` for each socket read, ``deadline`` (default ``5 * timeout``) for a whole
    request and its answer; transfers instead must move ``transfer_min_bytes`` every
    ``transfer_window`` seconds (default ``2 * timeout``).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60,
        retries: int = 4,
        backoff: float = 1.0,
        pool: int = 16,
        user_agent: str = "vip-agent",
        transfer_grace: float = 60.0,
        connect_timeout: float | None = None,
        deadline: float | None = None,
        transfer_window: float | None = None,
        transfer_min_bytes: int = 64 << 10,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the VIP URL must start with http:// or https://: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._rest = self.base_url + "/rest"
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout or min(self.timeout, 15.0))
        self.deadline = float(deadline or 5 * self.timeout)
        self.transfer_window = float(transfer_window or 2 * self.timeout)
        self.transfer_min_bytes = max(0, int(transfer_min_bytes))
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        #: after a transfer timeout, how long to watch for the upload landing before re-sending
        self.transfer_grace = max(0.0, float(transfer_grace))
        self._auth = _ApiKeyAuth(api_key)  # the only holder of the key; its repr hides it
        self._session = requests.Session()
        self._session.auth = self._auth
        self._session.headers["User-Agent"] = user_agent
        self._session.max_redirects = 0
        # requests reads the proxy variables of the whole environment on every request
        # (a millisecond each: most of the cost of a small upload); read them once here
        self._session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        self._session.verify = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        )
        self._session.trust_env = False
        adapter = _Adapter(pool_connections=4, pool_maxsize=max(1, pool), max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # files below the sendfile size go through a lighter transport (same pool size,
        # timeouts, CA bundle and deadline guard; see agent/vip/smallput.py for why)
        self._small = SmallPut(
            self._rest, connect_timeout=self.connect_timeout, timeout=self.timeout,
            verify=self._session.verify, pool=max(1, pool), answer_max=_ERROR_BODY_MAX,
        )
        self._lock = threading.Lock()
        self._max_transfer: int | None = None
        self._max_transfer_known = False

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"VipClient({self.base_url!r})"

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()
        self._small.close()

    def __enter__(self) -> VipClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _scrub(self, text: str) -> str:
        """Defence in depth: a proxy page could echo request headers back."""
        key = self._auth.key
        if key and key in text:
            text = text.replace(key, "<apikey>")
        return text

    def _delay(self, attempt: int) -> float:
        base = min(_BACKOFF_CAP, self.backoff * (2**attempt))
        return base + random.uniform(0, self.backoff)

    def _sleep(self, attempt: int) -> None:
        time.sleep(self._delay(attempt))

    def _send(
        self,
        method: str,
        rest_path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Any = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        on_8000: type[VipError] = ApiError,
        what: str = "",
        guard: _Guard | None = None,
    ) -> requests.Response:
        """One HTTP exchange; returns a 2xx response or raises a typed error.

        Without ``guard`` the exchange gets the overall deadline and the body is read before
        returning. A streamed response comes with the caller's guard still running.
        """
        own = guard is None
        if guard is None:
            guard = _Guard(deadline=self.deadline)
        try:
            return self._send_guarded(
                method, rest_path, guard, params=params, data=data, json_body=json_body,
                headers=headers, stream=stream, on_8000=on_8000, what=what,
            )
        finally:
            if own:
                guard.close()

    def _expired(self, guard: _Guard, where: str, exc: BaseException) -> DeadlineExceeded:
        if guard.expired == "stalled":
            message = (
                f"the transfer with VIP at {self.base_url} moved less than "
                f"{guard.min_bytes:,} bytes in {guard.window:g} s; abandoned"
            )
        else:
            message = (
                f"VIP at {self.base_url} did not finish answering within "
                f"{guard.deadline:g} s (overall deadline of a request)"
            )
        return DeadlineExceeded(message, detail=self._scrub(f"{where}: {type(exc).__name__}: {exc}"))

    def _send_guarded(
        self,
        method: str,
        rest_path: str,
        guard: _Guard,
        *,
        params: Mapping[str, str] | None,
        data: Any,
        json_body: Any,
        headers: Mapping[str, str] | None,
        stream: bool,
        on_8000: type[VipError],
        what: str,
    ) -> requests.Response:
        url = self._rest + rest_path
        where = f"{method} /rest{rest_path}"
        _CURRENT.guard = guard
        try:
            if isinstance(data, _UploadBody) and not params and not self._session.proxies:
                resp = self._send_upload(url, data, headers)
            else:
                resp = self._session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    json=json_body,
                    headers=dict(headers) if headers else None,
                    # always stream: error bodies are read with a bound (proxy pages can be big)
                    stream=True,
                    timeout=(self.connect_timeout, self.timeout),
                    allow_redirects=False,
                )
        except requests.exceptions.RequestException as exc:
            if guard.expired:
                raise self._expired(guard, where, exc) from None
            raise self._network_error(exc, where) from None
        finally:
            _CURRENT.guard = None
        if 200 <= resp.status_code < 300:
            if not stream:
                try:
                    _ = resp.content  # read now, so a dropped connection is a TransientError
                except requests.exceptions.RequestException as exc:
                    resp.close()
                    if guard.expired:
                        raise self._expired(guard, where, exc) from None
                    raise TransientError(
                        f"the connection to VIP at {self.base_url} broke during the answer",
                        detail=self._scrub(f"{where}: {type(exc).__name__}: {exc}"),
                        http_status=resp.status_code,
                    ) from None
            return resp
        try:
            self._raise_for(resp, where, on_8000, what)
        finally:
            resp.close()

    def _send_upload(
        self, url: str, body: _UploadBody, headers: Mapping[str, str] | None
    ) -> requests.Response:
        """A file PUT through the session's adapter, without ``Session.request``'s merging of
        settings, hooks and cookies (most of the client's cost of a small file). Same
        connection pool, headers, timeouts and errors as every other request."""
        prepared = requests.PreparedRequest()
        prepared.method = "PUT"
        prepared.url = url
        prepared.headers = requests.structures.CaseInsensitiveDict(
            {k: v if isinstance(v, str) else v.decode() for k, v in self._session.headers.items()}
        )
        prepared.headers.update(headers or {})
        prepared.headers["Content-Length"] = str(len(body))
        prepared.body = body  # type: ignore[assignment]
        prepared.hooks = {"response": []}
        prepared.prepare_auth(self._auth)
        adapter = self._session.get_adapter(url)
        return adapter.send(
            prepared, stream=True, timeout=(self.connect_timeout, self.timeout),
            verify=self._session.verify if self._session.verify is not None else True,
            cert=None, proxies={},
        )

    def _network_error(self, exc: BaseException, where: str) -> VipError:
        """The typed error for a request that got no HTTP answer, from either transport
        (a ``requests`` exception, or the ``OSError``/``http.client`` one of ``SmallPut``)."""
        detail = self._scrub(f"{where}: {type(exc).__name__}: {exc}")
        cert_error = _cert_error(exc)
        if cert_error is not None:
            return self._untrusted(cert_error, detail)
        not_sent: str | None = None  # why the request never reached the server
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            not_sent = "timed out"
        elif isinstance(exc, NotConnected):
            not_sent = "timed out" if isinstance(exc.__cause__, TimeoutError) else "refused"
        elif isinstance(exc, requests.exceptions.ConnectionError):
            cause = exc.args[0] if exc.args else None
            reason = getattr(cause, "reason", cause)
            if isinstance(reason, urllib3.exceptions.NewConnectionError):
                not_sent = "refused"
        if not_sent is not None:
            return _NotSent(
                f"could not reach VIP at {self.base_url} (connection {not_sent})", detail=detail
            )
        if isinstance(exc, (requests.exceptions.Timeout, TimeoutError)):
            return TransientError(
                f"VIP at {self.base_url} did not answer within {self.timeout:g} s", detail=detail
            )
        if isinstance(exc, (requests.exceptions.ConnectionError, OSError, http.client.HTTPException)):
            return TransientError(
                f"could not reach VIP at {self.base_url} (connection lost)", detail=detail
            )
        return TransientError(f"talking to VIP at {self.base_url} failed", detail=detail)

    def _untrusted(self, err: ssl.SSLCertVerificationError, detail: str) -> TransientError:
        return TransientError(
            f"the TLS certificate of VIP at {self.base_url} is not trusted "
            f"({err.verify_message or err.reason}); if a proxy or a private CA signs it, "
            "set REQUESTS_CA_BUNDLE to that CA's certificate file",
            detail=detail,
        )

    def _raise_for(
        self, resp: requests.Response, where: str, on_8000: type[VipError], what: str
    ) -> NoReturn:
        """Turn a non-2xx response into a typed error (code first, status second)."""
        try:
            raw = resp.raw.read(_ERROR_BODY_MAX, decode_content=True) if resp.raw else b""
        except Exception:  # a dropped connection while reading an error body
            raw = b""
        self._raise_answer(resp.status_code, resp.headers, raw, where, on_8000, what)

    def _raise_answer(
        self, status: int, headers: Any, raw: bytes, where: str, on_8000: type[VipError], what: str
    ) -> NoReturn:
        """The typed error for a non-2xx answer: ``headers`` has a case-insensitive ``get``,
        ``raw`` is the start of the body."""
        code: int | None = None
        server_msg = ""
        snippet = ""
        ctype = headers.get("Content-Type", "") or ""
        if raw and "json" in ctype.lower():
            try:
                body = json.loads(raw.decode("utf-8", "replace"))
            except ValueError:
                body = None
            if isinstance(body, dict) and "errorCode" in body:
                try:
                    code = int(body["errorCode"])
                except (TypeError, ValueError):
                    code = None
                server_msg = self._scrub(str(body.get("errorMessage") or ""))
        if code is None and raw:
            snippet = self._scrub(" ".join(raw.decode("utf-8", "replace").split())[:200])
        detail = f"{where}: HTTP {status}"
        detail += f", errorCode {code}: {server_msg}" if code is not None else (
            f", body: {snippet!r}" if snippet else ", empty body"
        )
        subject = what or where
        kw: dict[str, Any] = {"detail": detail, "code": code, "http_status": status}

        if code in _AUTH_CODES or (code is None and status == 401):
            if code == 8003:
                msg = "VIP received no API key; run `vip-agent login` to store one"
            elif code == 8004:
                msg = (
                    f"VIP refused the account ({server_msg or 'authentication error'}); "
                    "check it on the VIP portal, then run `vip-agent login`"
                )
            else:
                msg = (
                    "VIP refused the API key (bad credentials); run `vip-agent login` "
                    "with a valid key from your VIP account page"
                )
            raise AuthError(msg, **kw)
        if code in _CAPACITY_CODES:
            scope = "your account" if code == 2001 else "the platform"
            raise CapacityError(
                f"VIP is already running the maximum number of executions for {scope}; "
                "the launch will be retried later",
                **kw,
            )
        if 300 <= status < 400:
            target = headers.get("Location", "?")
            raise ApiError(
                f"VIP redirected the request to {target}; set the VIP URL to that address",
                **kw,
            )
        if status >= 500 or status in (408, 429):
            raise TransientError(
                f"VIP is failing or overloaded right now (HTTP {status}) on {subject}; will retry",
                **kw,
            )
        if status == 404:
            raise ApiError(
                f"{self._rest}/ does not look like a VIP REST API (HTTP 404 on {where}); "
                "check the VIP URL",
                **kw,
            )
        if status == 413:
            raise TooLargeError(f"the server refused {subject}: too large (HTTP 413)", **kw)
        if code is None:
            # proxy pages and other non-VIP answers: not a business error
            raise TransientError(
                f"VIP answered HTTP {status} without a VIP error on {subject}; will retry", **kw
            )
        if code in _NOT_FOUND_CODES:
            raise NotFoundError(f"{subject} does not exist on VIP ({server_msg})", **kw)
        if code == _ACCESS_CODE:
            raise AccessDeniedError(f"VIP refused access to {subject} ({server_msg})", **kw)
        if code == 8000 and status == 400 and on_8000 is not ApiError:
            if on_8000 is NotFoundError:
                raise NotFoundError(f"{subject} does not exist on VIP", **kw)
            if on_8000 is TransferTimeout:
                raise TransferTimeout(
                    f"VIP could not complete the transfer of {subject} (it may have timed out)",
                    **kw,
                )
            raise on_8000(f"VIP refused {subject}: {server_msg}", **kw)
        raise ApiError(f"VIP refused {subject}: {server_msg or f'HTTP {status}'}", **kw)

    def _call(
        self,
        method: str,
        rest_path: str,
        *,
        retry: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        """`_send` with retries on TransientError (only for idempotent calls).

        No retry starts once ``deadline`` seconds have passed since the first attempt, so a
        call against a dead server ends in bounded time, retries included.
        """
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                return self._send(method, rest_path, **kwargs)
            except TransientError as exc:
                if not retry or attempt >= self.retries:
                    raise
                delay = self._delay(attempt)
                if time.monotonic() + delay - started > self.deadline:
                    raise
                log.info(
                    "VIP %s %s failed (%s); retry %d/%d in %.1f s",
                    method, rest_path.split("?")[0], exc.message, attempt + 1, self.retries, delay,
                )
                time.sleep(delay)
                attempt += 1

    def _raw(self, resp: requests.Response) -> str:
        """The start of an answer, for an error's detail (never the key)."""
        return self._scrub(resp.content[:_RAW_MAX].decode("utf-8", "replace"))

    def _json(
        self,
        method: str,
        rest_path: str,
        *,
        shape: Callable[[Any], bool] | None = None,
        expected: str = "",
        **kwargs: Any,
    ) -> Any:
        """``_call`` and parse its JSON strictly: an error object or a body ``shape`` refuses
        (described by ``expected``) is an error, whatever the HTTP status said."""
        resp = self._call(method, rest_path, **kwargs)
        where = f"{method} /rest{rest_path}"
        try:
            body = resp.json()
        except ValueError:
            raise ProtocolError(
                f"VIP sent an unreadable answer (not JSON) to {where}",
                detail=f"HTTP {resp.status_code}, answer: {self._raw(resp)!r}",
                http_status=resp.status_code,
            ) from None
        if _is_error_object(body):
            raise self._error_in_success(resp, body, where, kwargs.get("what") or where)
        if shape is not None and not shape(body):
            raise ProtocolError(
                f"VIP's answer to {where} is not {expected or 'what this request returns'}",
                detail=f"HTTP {resp.status_code}, answer: {self._raw(resp)!r}",
                http_status=resp.status_code,
            )
        return body

    def _error_in_success(
        self, resp: requests.Response, body: dict[str, Any], where: str, subject: str
    ) -> VipError:
        """The typed error for a 2xx answer that carries a VIP error object."""
        try:
            code: int | None = int(body["errorCode"])
        except (TypeError, ValueError):
            code = None
        server_msg = self._scrub(str(body.get("errorMessage") or ""))
        kw: dict[str, Any] = {
            "detail": f"{where}: HTTP {resp.status_code} with an error body: {self._raw(resp)!r}",
            "code": code,
            "http_status": resp.status_code,
        }
        if code in _AUTH_CODES:
            return AuthError(
                f"VIP refused the API key ({server_msg or code}); run `vip-agent login`", **kw
            )
        if code in _CAPACITY_CODES:
            return CapacityError(
                "VIP is already running the maximum number of executions; "
                "the launch will be retried later",
                **kw,
            )
        if code in _NOT_FOUND_CODES:
            return NotFoundError(f"{subject} does not exist on VIP ({server_msg})", **kw)
        if code == _ACCESS_CODE:
            return AccessDeniedError(f"VIP refused access to {subject} ({server_msg})", **kw)
        return ProtocolError(
            f"VIP answered {subject} with an error inside a success answer "
            f"(HTTP {resp.status_code}, errorCode {body.get('errorCode')!r}: {server_msg}); "
            "treating it as a failure of the server",
            **kw,
        )

    # ------------------------------------------------------------------ platform

    def platform(self) -> dict[str, Any]:
        """``GET /platform``: platform properties (limits, error codes)."""
        result: dict[str, Any] = self._json(
            "GET", "/platform", what="the platform description",
            shape=_is_dict, expected="a platform description (a JSON object)",
        )
        return result

    def max_transfer_size(self, *, refresh: bool = False) -> int | None:
        """``maxSizeDirectTransfer`` in bytes (cached; ``refresh`` asks again), None if unknown."""
        with self._lock:
            if self._max_transfer_known and not refresh:
                return self._max_transfer
        try:
            value = self.platform().get("maxSizeDirectTransfer")
        except TransientError:
            return None  # do not cache an outage
        limit = int(value) if isinstance(value, (int, float)) and value > 0 else None
        with self._lock:
            self._max_transfer, self._max_transfer_known = limit, True
        return limit

    def check_key(self) -> None:
        """Check the key with an authenticated GET; raises AuthError if VIP refuses it."""
        self._call("GET", "/executions/count", what="the execution count")

    # ------------------------------------------------------------------ paths

    def _path(self, path: str) -> str:
        return "/path" + encode_path(path)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (8013 on a forbidden path raises AccessDeniedError)."""
        path = _norm_remote(path)
        body = self._json(
            "GET", self._path(path), params={"action": "exists"}, what=path,
            shape=lambda b: isinstance(b, dict) and isinstance(b.get("exists"), bool),
            expected='{"exists": true|false}',
        )
        return bool(body["exists"])

    def properties(self, path: str) -> PathInfo:
        """Properties of ``path``; a missing path gives ``exists=False`` (no error)."""
        path = _norm_remote(path)
        body = self._json(
            "GET", self._path(path), params={"action": "properties"}, what=path,
            shape=_is_dict, expected="path properties (a JSON object)",
        )
        return PathInfo.from_json(body, fallback_path=path)

    def list(self, path: str) -> list[PathInfo]:
        """Entries of folder ``path`` (unordered); NotFoundError if missing or a file."""
        path = _norm_remote(path)
        body = self._json(
            "GET", self._path(path), params={"action": "list"}, on_8000=NotFoundError,
            what=f"folder {path}", shape=_is_list_of_dicts, expected="a list of path properties",
        )
        return [PathInfo.from_json(item) for item in body]

    def mkdir(self, path: str) -> None:
        """Create folder ``path`` (empty PUT); its parent must exist. An existing folder is fine."""
        path = _norm_remote(path)
        _check_name(path)
        try:
            self._call("PUT", self._path(path), data=b"", what=f"folder {path}")
        except ApiError as exc:
            if exc.code != 8000:
                raise
            info = self.properties(path)
            if info.exists and info.is_dir:
                return
            if info.exists:
                raise ApiError(
                    f"cannot create folder {path} on VIP: a file has that name",
                    detail=exc.detail, code=exc.code, http_status=exc.http_status,
                ) from None
            if not self.exists(_parent(path)):
                raise NotFoundError(
                    f"cannot create folder {path} on VIP: {_parent(path)} does not exist",
                    detail=exc.detail, code=exc.code, http_status=exc.http_status,
                ) from None
            raise

    def makedirs(self, path: str) -> None:
        """Create ``path`` and missing ancestors, one level at a time below ``/vip/<top>``."""
        path = _norm_remote(path)
        parts = path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "vip":
            raise ValueError(f"VIP folders live under /vip/Home or a group folder: {path!r}")
        missing: list[str] = []
        current = path
        # /vip/Home and /vip/<group> cannot be created; stop there
        while current.count("/") > 2 and not self.exists(current):
            missing.append(current)
            current = _parent(current)
        for folder in reversed(missing):
            self.mkdir(folder)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        """Delete ``path`` (recursive). VIP deletes asynchronously: see :meth:`wait_deleted`."""
        path = _norm_remote(path)
        try:
            self._call("DELETE", self._path(path), on_8000=NotFoundError, what=path)
        except NotFoundError:
            if not missing_ok:
                raise

    def wait_deleted(self, path: str, timeout: float = 300, interval: float = 2) -> None:
        """Poll ``exists`` until ``path`` is gone; DeleteTimeout after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.exists(path):
            if time.monotonic() >= deadline:
                raise DeleteTimeout(
                    f"{path} was still present on VIP {timeout:g} s after its deletion; "
                    "VIP deletes in the background, try again later",
                    detail=f"polled exists every {interval:g} s",
                )
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))

    # ------------------------------------------------------------------ transfers

    def _put_file(self, local: Path, remote: str, size: int, progress: Progress | None) -> bool:
        """PUT the file; True when all its bytes were sent and VIP answered 2xx.

        No content hash is computed on the way (it cost more CPU than the send itself):
        callers that must know the file did not change compare its size and mtime before
        and after, which is what a changed file shows.
        """
        if size < _SENDFILE_MIN and not self._session.proxies:
            return self._put_small(local, remote, size, progress)
        with open(local, "rb") as handle:
            body = _UploadBody(handle, size, progress, zero_copy=size >= _SENDFILE_MIN)
            body.guard = guard = self._transfer_guard()
            try:
                self._send(
                    "PUT",
                    self._path(remote),
                    data=body,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    on_8000=TransferTimeout,
                    what=f"upload of {local.name} to {remote}",
                    guard=guard,
                )
            finally:
                guard.close()
            return body.sent == size

    def _put_small(self, local: Path, remote: str, size: int, progress: Progress | None) -> bool:
        """:meth:`_put_file` for a file smaller than ``_SENDFILE_MIN``: read whole, sent with its
        head in one piece over the light transport; same errors as the ``requests`` path."""
        with open(local, "rb") as handle:
            data = handle.read(size)  # never more than planned, if the file grew meanwhile
        if len(data) < size:
            raise SourceChanged(
                f"{local} shrank while it was being sent ({len(data):,} of {size:,} bytes read)",
            )
        if progress is not None:
            progress(size)  # may raise to abandon the transfer before it starts
        rest_path = self._path(remote)
        where = f"PUT /rest{rest_path}"
        headers = {
            "User-Agent": str(self._session.headers.get("User-Agent", "vip-agent")),
            "Content-Type": "application/octet-stream",
            **self._auth.header(),
        }
        guard = self._transfer_guard()
        guard.progress(size)
        try:
            answer = self._small.put(rest_path, data, headers, on_connection=guard.attach)
        except (OSError, http.client.HTTPException) as exc:
            if guard.expired:
                raise self._expired(guard, where, exc) from None
            raise self._network_error(exc, where) from None
        finally:
            guard.close()
        if 200 <= answer.status < 300:
            return True
        self._raise_answer(answer.status, answer.headers, answer.body, where, TransferTimeout,
                           f"upload of {local.name} to {remote}")

    def _transfer_guard(self) -> _Guard:
        """A transfer has no overall deadline, only the minimum-progress rule."""
        return _Guard(window=self.transfer_window, min_bytes=self.transfer_min_bytes)

    def _landed(self, remote: str, size: int) -> str:
        """State of an upload target: 'ok' (right size), 'missing' or 'wrong'."""
        info = self.properties(remote)
        if not info.exists:
            return "missing"
        if info.is_dir:
            raise ApiError(f"cannot upload to {remote}: a folder has that name on VIP")
        return "ok" if info.size == size else "wrong"

    def _watch_landing(self, remote: str, size: int) -> str:
        """After a transfer timeout VIP may still finish the upload: watch for it a while."""
        deadline = time.monotonic() + self.transfer_grace
        interval = max(0.05, min(2.0, self.backoff))
        while True:
            state = self._landed(remote, size)
            # VIP registers a file once it is complete, so a wrong size is a stale file
            # (the PUT then failed because the target existed), not one still landing
            if state != "missing" or time.monotonic() >= deadline:
                return state
            time.sleep(interval)

    def upload(
        self, local: Path, remote: str, *, progress: Progress | None = None, verify: bool = True
    ) -> bool:
        """Upload file ``local`` to the (new) remote file path ``remote``, streamed.

        The parent folder must exist. After a transfer timeout or a network error, the
        target is checked before sending again: the right size means done; a wrong size is
        deleted, waited for, and re-sent. A target that already exists with the same size
        counts as uploaded, so callers upload into fresh folders. ``progress`` gets each
        piece's byte count as it is sent.

        ``verify``: check the remote size with a ``properties`` request after a successful
        PUT. VIP answers 201 only once the file is stored, so a caller uploading many files
        may pass False and verify them all at once with one :meth:`list` per folder (see
        :meth:`sizes`): one request per file instead of two.
        Returns True when this call sent the whole file, False when the upload was found
        complete on the server without a full send (after a timeout or a crash).
        """
        local = Path(local)
        remote = _norm_remote(remote)
        _check_name(remote)
        st = local.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"not a regular file: {local}")
        size = st.st_size
        if size == 0:
            raise EmptyFileError(
                f"{local.name} is empty (0 bytes): VIP cannot store empty files "
                "(an empty upload creates a folder); remove it or give it content",
                detail=f"{local} -> {remote}",
            )
        last: VipError | None = None
        sent = False
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(attempt - 1)
            try:
                sent = self._put_file(local, remote, size, progress)
            except TransferTimeout as exc:
                last = exc
                state = self._watch_landing(remote, size)
                if state == "missing" and not self.exists(_parent(remote)):
                    raise NotFoundError(
                        f"cannot upload {local.name}: folder {_parent(remote)} does not exist on VIP",
                        detail=exc.detail, code=exc.code, http_status=exc.http_status,
                    ) from None
            except TransientError as exc:
                last = exc
                state = self._landed(remote, size)
            else:
                if not verify and sent:
                    return True
                state = self._landed(remote, size)
                if state == "missing":
                    last = SizeMismatch(
                        f"VIP accepted {local.name} but {remote} is not there",
                        detail="PUT returned 2xx; properties says exists=false",
                    )
            if state == "ok":
                if last is not None:
                    log.info("upload of %s found complete on VIP after: %s", remote, last.message)
                return sent
            if state == "wrong":
                info = self.properties(remote)
                last = SizeMismatch(
                    f"{remote} on VIP has {info.size} bytes instead of {size}; sending it again",
                    detail=f"local {local}",
                )
                log.info("%s", last.message)
                self.delete(remote, missing_ok=True)
                self.wait_deleted(remote, timeout=max(30.0, self.transfer_grace),
                                  interval=max(0.05, min(2.0, self.backoff)))
        assert last is not None
        raise last

    def sizes(self, folder: str) -> dict[str, int | None]:
        """File name -> size of the files directly in ``folder`` (one ``list`` request).

        A missing folder gives an empty mapping; sub-folders are left out.
        """
        try:
            entries = self.list(folder)
        except NotFoundError:
            return {}
        return {e.path.rsplit("/", 1)[-1]: e.size for e in entries if not e.is_dir}

    def download(
        self,
        remote: str,
        local: Path,
        *,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Download file ``remote`` to ``local`` atomically; returns the byte count.

        Data goes to ``<local>.part`` in the same folder, is size-checked against
        ``expected_size`` and Content-Length, fsynced, then renamed over ``local``.
        Retries on transfer timeouts and network errors. A file over VIP's direct-transfer
        limit raises TooLargeError. ``progress`` gets each piece's byte count as it is written.
        """
        remote = _norm_remote(remote)
        local = Path(local)
        limit = self.max_transfer_size()
        if expected_size is not None and limit is not None and expected_size > limit:
            raise self._too_large(remote, expected_size, limit)
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(local.name + ".part")
        last: VipError | None = None
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    self._sleep(attempt - 1)
                try:
                    count = self._get_file(remote, part, expected_size, progress)
                except TransferTimeout as exc:
                    last = exc
                    info = self.properties(remote)
                    if not info.exists:
                        raise NotFoundError(
                            f"{remote} does not exist on VIP", detail=exc.detail,
                            code=exc.code, http_status=exc.http_status,
                        ) from None
                    if info.is_dir:
                        raise ApiError(
                            f"{remote} is a folder: VIP only downloads files", detail=exc.detail,
                            code=exc.code, http_status=exc.http_status,
                        ) from None
                    limit = limit if limit is not None else self.max_transfer_size()
                    if limit is not None and info.size is not None and info.size > limit:
                        raise self._too_large(remote, info.size, limit) from None
                    continue
                except TransientError as exc:
                    last = exc
                    continue
                os.replace(part, local)
                _fsync_dir(local.parent)
                return count
        finally:
            try:
                part.unlink()
            except FileNotFoundError:
                pass
        assert last is not None
        if isinstance(last, TransferTimeout):
            # the file is there and fits the limit (checked above): a download that keeps
            # timing out is worth trying again later, never a failed dataset
            raise TransientError(last.message, detail=last.detail, code=last.code,
                                 http_status=last.http_status) from last  # fmt: skip
        raise last

    @staticmethod
    def _too_large(remote: str, size: int, limit: int) -> TooLargeError:
        return TooLargeError(
            f"{remote} is {size:,} bytes, over VIP's direct-transfer limit of {limit:,} bytes; "
            "it cannot be downloaded through the API",
            detail=f"size={size} maxSizeDirectTransfer={limit}",
        )

    def _get_file(
        self, remote: str, part: Path, expected_size: int | None, progress: Progress | None
    ) -> int:
        guard = self._transfer_guard()
        try:
            return self._get_guarded(remote, part, expected_size, progress, guard)
        except TransientError as exc:
            if guard.expired and not isinstance(exc, DeadlineExceeded):
                raise self._expired(guard, f"download of {remote}", exc) from None
            raise
        finally:
            guard.close()

    def _get_guarded(
        self,
        remote: str,
        part: Path,
        expected_size: int | None,
        progress: Progress | None,
        guard: _Guard,
    ) -> int:
        resp = self._send(
            "GET",
            self._path(remote),
            params={"action": "content"},
            headers={"Accept-Encoding": "identity"},
            stream=True,
            on_8000=TransferTimeout,
            what=f"download of {remote}",
            guard=guard,
        )
        with resp:
            if resp.status_code != 200:
                raise TransientError(
                    f"VIP answered HTTP {resp.status_code} instead of the content of {remote}",
                    http_status=resp.status_code,
                )
            announced = resp.headers.get("Content-Length")
            length = int(announced) if announced and announced.isdigit() else None
            if expected_size is not None and length is not None and length != expected_size:
                raise SizeMismatch(
                    f"VIP announced {length} bytes for {remote}, expected {expected_size}",
                    http_status=200,
                )
            count = 0

            def moved(n: int) -> None:
                guard.progress(n)
                if progress is not None:
                    progress(n)

            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            sync = StreamingSync(fd)
            try:
                if length is not None and length >= _DIRECT_READ_MIN:
                    count = self._read_direct(resp, fd, sync, remote, moved)
                else:
                    try:
                        for chunk in _body_chunks(resp, guard):
                            _write_all(fd, chunk)
                            count += len(chunk)
                            if progress is not None:
                                progress(len(chunk))
                    except (requests.exceptions.RequestException,
                            http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
                        raise TransientError(
                            f"the download of {remote} was interrupted after {count:,} bytes",
                            detail=self._scrub(f"{type(exc).__name__}: {exc}"),
                        ) from None
                sync.finish()
            finally:
                sync.stop()
                os.close(fd)
        for wanted, label in ((length, "announced"), (expected_size, "expected")):
            if wanted is not None and count != wanted:
                raise SizeMismatch(
                    f"the download of {remote} got {count:,} bytes, {label} {wanted:,}",
                    http_status=200,
                )
        return count

    def _read_direct(
        self, resp: requests.Response, fd: int, sync: StreamingSync, remote: str,
        progress: Progress | None,
    ) -> int:
        """Large bodies: read from the socket straight into one reused buffer, then write it.

        One copy less and no new ``bytes`` per piece compared with ``iter_content``; the
        connection is not reused afterwards (worth it only for large files).
        """
        raw = resp.raw
        fp = getattr(raw, "_fp", None)
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        buf = bytearray(_READ_BUFFER)
        view = memoryview(buf)
        if fp is not None and hasattr(fp, "readinto") and encoding in ("", "identity"):
            readinto = fp.readinto
        else:
            def readinto(target: memoryview) -> int:
                data = raw.read(len(target), decode_content=True)
                target[: len(data)] = data
                return len(data)
        count = 0
        while True:
            try:
                n = readinto(view)
            except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
                raise TransientError(
                    f"the download of {remote} was interrupted after {count:,} bytes",
                    detail=self._scrub(f"{type(exc).__name__}: {exc}"),
                ) from None
            if not n:
                return count
            _write_all(fd, view[:n])
            sync.wrote(n)
            count += n
            if progress is not None:
                progress(n)

    # ------------------------------------------------------------------ pipelines

    def pipelines(self) -> builtins.list[dict[str, Any]]:
        """Pipelines this account can run."""
        body = self._json(
            "GET", "/pipelines", what="the pipeline list",
            shape=_is_list_of_dicts, expected="a list of pipelines",
        )
        return list(body)

    def pipeline(self, identifier: str) -> dict[str, Any]:
        """Description of pipeline ``name/version``; NotFoundError (8007) if unknown."""
        body: dict[str, Any] = self._json(
            "GET", "/pipelines/" + encode_pipeline_id(identifier), what=f"pipeline {identifier}",
            shape=_is_pipeline, expected="a pipeline description (identifier, parameters)",
        )
        return body

    def boutiques(self, identifier: str) -> dict[str, Any]:
        """Boutiques descriptor of pipeline ``name/version`` (``?format=boutiques``)."""
        body: dict[str, Any] = self._json(
            "GET", "/pipelines/" + encode_pipeline_id(identifier),
            params={"format": "boutiques"}, what=f"pipeline {identifier}",
            shape=_is_dict, expected="a Boutiques descriptor (a JSON object)",
        )
        return body

    # ------------------------------------------------------------------ executions

    @staticmethod
    def _exec_path(execution_id: str) -> str:
        return "/executions/" + quote(execution_id, safe="")

    def create_execution(
        self,
        name: str,
        pipeline: str,
        inputs: Mapping[str, str | builtins.list[str]],
        results_location: str,
    ) -> dict[str, Any]:
        """``POST /executions``; never retried once the request may have reached VIP.

        A failure that leaves it unclear whether VIP created the execution raises
        LaunchUncertain: look for ``name`` with :meth:`find_execution` before retrying.
        """
        payload = {
            "name": name,
            "pipelineIdentifier": pipeline,
            "inputValues": {k: list(v) if isinstance(v, list) else v for k, v in inputs.items()},
            "resultsLocation": results_location,
        }
        attempt = 0
        while True:
            try:
                resp = self._send(
                    "POST", "/executions", json_body=payload, what=f"the launch of '{name}'"
                )
                break
            except _NotSent:
                # the connection never opened: VIP cannot have created anything
                if attempt >= self.retries:
                    raise
                self._sleep(attempt)
                attempt += 1
            except TransientError as exc:
                raise LaunchUncertain(
                    f"the launch of '{name}' failed in a way that does not tell whether VIP "
                    "created the execution; look for it before launching again",
                    detail=exc.detail, code=exc.code, http_status=exc.http_status,
                ) from None
        try:
            result = resp.json()
        except ValueError:
            result = None
        if _is_error_object(result):
            assert isinstance(result, dict)
            error = self._error_in_success(resp, result, "POST /rest/executions", f"the launch of '{name}'")
            if isinstance(error, (AuthError, CapacityError)):
                raise error  # refused before anything was created
        elif _is_execution(result):
            assert isinstance(result, dict)
            return result
        raise LaunchUncertain(
            f"VIP answered the launch of '{name}' with something that is not an execution; "
            "looking for it before launching again",
            detail=f"HTTP {resp.status_code}, answer: {self._raw(resp)!r}",
            http_status=resp.status_code,
        )

    def execution(self, execution_id: str) -> dict[str, Any]:
        """Full execution record; NotFoundError if unknown (8000) or deleted (8015)."""
        body: dict[str, Any] = self._json(
            "GET", self._exec_path(execution_id), on_8000=NotFoundError,
            what=f"execution {execution_id}",
            shape=_is_execution, expected="an execution (identifier and status)",
        )
        return body

    def executions(self, limit: int = 500) -> builtins.list[dict[str, Any]]:
        """Execution summaries, newest first (``inputValues``/``returnedFiles``/``jobs`` empty)."""
        body = self._json(
            "GET", "/executions", params={"limit": str(limit)}, what="the execution list",
            shape=_is_list_of_dicts, expected="a list of executions",
        )
        return list(body)

    def find_execution(self, name: str) -> dict[str, Any] | None:
        """Newest execution summary named exactly ``name``, or None."""
        matches = [e for e in self.executions() if e.get("name") == name]
        if not matches:
            return None
        # the list is newest first; max() keeps the first of equal or missing dates
        return max(matches, key=lambda e: start_seconds(e) or float("-inf"))

    def results(self, execution_id: str) -> builtins.list[PathInfo]:
        """Output files of an execution (entries may have ``exists=False``)."""
        body = self._json(
            "GET", self._exec_path(execution_id) + "/results", on_8000=NotFoundError,
            what=f"execution {execution_id}",
            shape=_is_list_of_dicts, expected="a list of output path properties",
        )
        return [PathInfo.from_json(item) for item in body]

    def _log(self, execution_id: str, job: str | None, stream: str) -> str:
        rest = self._exec_path(execution_id)
        if job is not None:
            rest += "/jobs/" + quote(str(job), safe="")
        resp = self._call(
            "GET", rest + "/" + stream, on_8000=NotFoundError,
            what=f"the {stream} of execution {execution_id}",
        )
        return resp.text

    def stdout(self, execution_id: str, job: str | None = None) -> str:
        """Application stdout of the execution (``job`` needed when it has several jobs)."""
        return self._log(execution_id, job, "stdout")

    def stderr(self, execution_id: str, job: str | None = None) -> str:
        """Application stderr of the execution (``job`` needed when it has several jobs)."""
        return self._log(execution_id, job, "stderr")

    def kill(self, execution_id: str) -> None:
        """``PUT /executions/{id}/kill`` (never ``DELETE``, which VIP treats as a GET)."""
        self._call(
            "PUT", self._exec_path(execution_id) + "/kill", on_8000=NotFoundError,
            what=f"execution {execution_id}",
        )

    def delete_execution(self, execution_id: str, delete_files: bool = True) -> None:
        """``PUT /executions/{id}/delete``; only Finished or Killed executions can be deleted.

        An execution already deleted (8015) counts as done, so a retried call is harmless.
        """
        try:
            self._call(
                "PUT", self._exec_path(execution_id) + "/delete",
                json_body={"deleteFiles": bool(delete_files)}, what=f"execution {execution_id}",
            )
        except NotFoundError as exc:
            if exc.code != _DELETED_CODE:
                raise


def _body_chunks(resp: requests.Response, guard: _Guard) -> Any:
    """The body as it arrives (no waiting for a full chunk), reported to ``guard``."""
    raw = resp.raw
    while True:
        chunk = raw.read1(_CHUNK)
        if not chunk:
            return
        guard.progress(len(chunk))
        yield chunk


# -- expected answer shapes (strict reader) ----------------------------------------------


def _is_error_object(body: Any) -> bool:
    """VIP's error body: ``errorCode`` set, and not a record that merely has the field
    (executions carry ``"errorCode": null``)."""
    return (
        isinstance(body, dict)
        and body.get("errorCode") is not None
        and "identifier" not in body
        and "path" not in body
    )


def _is_dict(body: Any) -> bool:
    return isinstance(body, dict)


def _is_list_of_dicts(body: Any) -> bool:
    return isinstance(body, list) and all(isinstance(item, dict) for item in body)


def _is_pipeline(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("identifier") or body.get("name"), str)
        and isinstance(body.get("parameters"), list)
    )


def _is_execution(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("identifier"), str)
        and bool(body["identifier"])
        and isinstance(body.get("status"), str)
    )
