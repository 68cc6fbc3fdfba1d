"""Uploads and downloads: streamed, size-checked, retried, each holding one of the server's
transfer slots (:meth:`agent.pacer.ServerBudget.transfer`) and reporting every block it moves
to the server's budget (:meth:`~agent.pacer.ServerBudget.consume`).
"""

from __future__ import annotations

import http.client
import os
import stat
import time
from pathlib import Path
from typing import Any

import requests
import urllib3

from agent.fsutil import StreamingSync
from agent.fsutil import fsync_dir as _fsync_dir
from agent.progress import Rewindable
from agent.vip.connections import (
    _CHUNK,
    _DIRECT_READ_MIN,
    _READ_BUFFER,
    _SENDFILE_MIN,
    Progress,
    _UploadBody,
)
from agent.vip.endpoints import _check_name, _Endpoints, _norm_remote, _parent
from agent.vip.errors import (
    ApiError,
    DeadlineExceeded,
    EmptyFileError,
    NotFoundError,
    SizeMismatch,
    SourceChanged,
    TooLargeError,
    TransferTimeout,
    TransientError,
    VipError,
)
from agent.vip.transport import log
from agent.vip.watchdog import _Guard


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Transfers(_Endpoints):
    """Uploads and downloads (see the module docstring)."""

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
        self._check_origin()
        self.budget.acquire()
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
        if 300 <= answer.status < 400:  # moved to https (raises _Moved: sent again) or refused
            self._follow(answer.status, answer.headers.get("Location"), self._rest + rest_path, where)
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
        # a retry takes back what the failed attempt reported: progress never passes 100 %
        counted = Rewindable(progress)
        metered = self._metered("upload", counted)
        for attempt in range(self.retries + 1):
            if attempt:
                counted.rewind()
                self._sleep(attempt - 1)
            # the slot is held while VIP may still be working on this transfer (the landing
            # watch after a timeout included): that is the server's pool being used
            with self.budget.transfer():
                state, this_sent, error = self._upload_once(local, remote, size, metered, verify)
            if this_sent is not None:
                sent = this_sent
            if error is not None:
                last = error
            if state == "sent":
                return True
            if state == "ok":
                if last is not None:
                    log.info("upload of %s found complete on VIP after: %s", remote, last.message)
                counted.complete(size)
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
        counted.rewind()
        assert last is not None
        raise last

    def _upload_once(
        self, local: Path, remote: str, size: int, progress: Progress, verify: bool
    ) -> tuple[str, bool | None, VipError | None]:
        """One attempt of :meth:`upload`: the target's state afterwards ('ok', 'missing',
        'wrong', or 'sent' when sent and not verified), whether the PUT sent the whole file
        (None when it failed), and what went wrong."""
        try:
            sent = self._put_file(local, remote, size, progress)
        except TransferTimeout as exc:
            state = self._watch_landing(remote, size)
            if state == "missing" and not self.exists(_parent(remote)):
                raise NotFoundError(
                    f"cannot upload {local.name}: folder {_parent(remote)} does not exist on VIP",
                    detail=exc.detail, code=exc.code, http_status=exc.http_status,
                ) from None
            if state != "wrong":  # not a refused overwrite: VIP's transfer pool timed out
                self.budget.transfer_timed_out()
            return state, None, exc
        except TransientError as exc:
            return self._landed(remote, size), None, exc
        if not verify and sent:
            return "sent", True, None
        state = self._landed(remote, size)
        if state == "missing":
            return state, sent, SizeMismatch(
                f"VIP accepted {local.name} but {remote} is not there",
                detail="PUT returned 2xx; properties says exists=false",
            )
        return state, sent, None

    def _metered(self, direction: str, progress: Progress | None) -> Progress:
        """``progress`` preceded by the server budget's accounting of each block moved (which
        blocks while a bandwidth limiter says so)."""
        consume = self.budget.consume

        def moved(count: int) -> None:
            consume(direction, count)
            if progress is not None:
                progress(count)

        return moved

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
        counted = Rewindable(progress)  # a retry starts the file again: take its bytes back
        metered = self._metered("download", counted)
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    counted.rewind()
                    self._sleep(attempt - 1)
                try:
                    with self.budget.transfer():
                        count = self._get_file(remote, part, expected_size, metered)
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
                    self.budget.transfer_timed_out()  # the file is fine: VIP's pool timed out
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
        counted.rewind()
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


def _body_chunks(resp: requests.Response, guard: _Guard) -> Any:
    """The body as it arrives (no waiting for a full chunk), reported to ``guard``."""
    raw = resp.raw
    while True:
        chunk = raw.read1(_CHUNK)
        if not chunk:
            return
        guard.progress(len(chunk))
        yield chunk


