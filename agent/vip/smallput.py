"""One-request PUTs of small files over plain ``http.client`` connections.

Why a second transport: sending a 4 KiB file through ``requests`` and urllib3 costs about
1 ms of CPU on the client (settings merging, pool-key building, header objects), three
times what the exchange itself costs. A dataset of thousands of small files then waits on
the client's own CPU, not on the wire. This transport does only what a small PUT needs:
a pool of persistent connections, one ``send`` of head and body together, and the status
and headers of the answer.

It knows nothing of VIP: it returns the raw answer (:class:`Answer`) or raises the
``OSError``/``http.client`` exception that ended the exchange; :class:`~agent.vip.client.
VipClient` maps both to its typed errors, exactly as for its other requests.

Connections: idle ones are kept (at most ``pool``) and checked before reuse (a server that
closed an idle keep-alive connection is noticed without sending); a request that fails on a
reused connection before any answer byte is sent once more on a new connection, which is
what a stale keep-alive connection looks like (a re-sent PUT is harmless: VIP refuses to
overwrite, and the caller then checks the file's size on VIP).
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from requests.utils import DEFAULT_CA_BUNDLE_PATH

#: what a stale keep-alive connection raises when a request is sent on it
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)


class NotConnected(OSError):
    """The connection could not be opened: the request never reached the server."""


@dataclass(frozen=True)
class Answer:
    """A server's answer: status, headers (case-insensitive ``get``) and a bounded body."""

    status: int
    headers: Any  # http.client.HTTPMessage
    body: bytes


class _Timeouts:
    """Connect with the constructor's timeout (``connect_timeout``), then read and write
    with ``read_timeout``; no Nagle delay on the small writes."""

    sock: Any
    read_timeout: float = 60.0

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.read_timeout)


class _Connection(_Timeouts, http.client.HTTPConnection):
    pass


class _TLSConnection(_Timeouts, http.client.HTTPSConnection):
    pass


def _dropped(sock: socket.socket | None) -> bool:
    """True when an idle connection was closed by the server (readable = EOF or junk)."""
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll() here: ask select()
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True


class SmallPut:
    """PUT bodies held in memory to one server, over pooled keep-alive connections.

    ``base_url``: ``http(s)://host[:port][/prefix]``; request targets are appended to its
    path. ``verify``: True (the CA bundle ``requests`` uses) or a CA file or folder path.
    Thread-safe: each request takes a connection from the pool and gives it back.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        timeout: float,
        verify: bool | str = True,
        pool: int = 16,
        answer_max: int = 64 << 10,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._verify = verify
        self._context: ssl.SSLContext | None = None
        self._pool_max = max(1, pool)
        self._answer_max = answer_max
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Close the idle connections (those in use close when given back)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def put(
        self,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        on_connection: Callable[[Any], None] | None = None,
    ) -> Answer:
        """Send ``PUT prefix+target`` with ``body``; the answer, whatever its status.

        ``on_connection`` gets the connection before anything is sent (a deadline watchdog
        shuts its ``sock`` down to cut a hung exchange). Raises :class:`NotConnected` when the
        server could not be reached, else the exception that ended the exchange.
        """
        conn = self._take()
        reused = conn.sock is not None
        try:
            if on_connection is not None:
                on_connection(conn)
            try:
                answer = self._exchange(conn, target, body, headers)
            except _STALE:
                if not reused:
                    raise
                # the server closed this idle connection as the request went out: once more,
                # on a new connection
                conn.close()
                answer = self._exchange(conn, target, body, headers)
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)
        return answer

    # -- plumbing --------------------------------------------------------------------

    def _take(self) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new()
            if not _dropped(conn.sock):
                return conn
            conn.close()

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        if conn.sock is None:  # the server said Connection: close
            return
        with self._lock:
            if not self._closed and len(self._idle) < self._pool_max:
                self._idle.append(conn)
                return
        conn.close()

    def _new(self) -> http.client.HTTPConnection:
        conn: _Connection | _TLSConnection
        if self._tls:
            conn = _TLSConnection(self._host, self._port, timeout=self._connect_timeout,
                                  context=self._ssl_context())
        else:
            conn = _Connection(self._host, self._port, timeout=self._connect_timeout)
        conn.read_timeout = self._timeout
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            verify = self._verify
            if verify is True:
                verify = DEFAULT_CA_BUNDLE_PATH  # the bundle requests verifies with
            if isinstance(verify, str) and os.path.isdir(verify):
                self._context = ssl.create_default_context(capath=verify)
            else:
                self._context = ssl.create_default_context(cafile=str(verify))
        return self._context

    def _exchange(
        self, conn: http.client.HTTPConnection, target: str, body: bytes, headers: Mapping[str, str]
    ) -> Answer:
        if conn.sock is None:
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                if isinstance(err, ssl.SSLCertVerificationError):
                    raise  # reached, but not trusted: not "could not reach"
                raise NotConnected(str(err) or type(err).__name__) from err
        conn.putrequest("PUT", self._prefix + target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)  # head and body in one send
        resp = conn.getresponse()
        data = resp.read(self._answer_max)
        if not resp.isclosed():
            # an answer longer than anyone needs: not worth draining, the connection goes
            conn.close()
        return Answer(resp.status, resp.headers, data)
