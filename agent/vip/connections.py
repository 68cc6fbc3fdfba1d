"""Socket plumbing of the ``requests`` transport: the key header, connections a deadline can
cut, request bodies sent in large blocks (file bodies with ``sendfile``).

Nothing here knows VIP's answers or endpoints; :mod:`agent.vip.transport` builds the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from agent.vip.errors import SourceChanged
from agent.vip.watchdog import _attach_current, _Guard

#: the failed attempt reported (agent.progress.Rewindable), so a file never counts twice;
#: it may raise to abandon the transfer (the exception propagates unchanged)
Progress = Callable[[int], None]

_CHUNK = 1 << 20  # download write size and upload read cap
_SENDFILE_MIN = 1 << 20  # uploads at least this large are sent with sendfile ...
_SENDFILE_PIECE = 1 << 20  # ... in pieces of this size (progress and stop checks between)
_READ_BUFFER = 1 << 20  # reused receive buffer of large downloads
_DIRECT_READ_MIN = 8 << 20  # downloads at least this large are read into that buffer
_SEND_BLOCK = 1 << 20  # socket send block (urllib3 default is 16 KiB)
_ERROR_BODY_MAX = 64 << 10  # never read more than this of an error body


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

