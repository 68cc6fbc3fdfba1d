"""The transport of :class:`agent.vip.VipClient`: one ``requests`` session over guarded
connections, the light small-file transport (:mod:`agent.vip.smallput`), per-request
deadlines (:mod:`agent.vip.watchdog`), retries with the ``retry`` wait policy, and the
server's budget (:mod:`agent.pacer`): every request takes a token.

Thread safety: one client may be shared by several worker threads. It holds one
``requests.Session`` whose connection pool (``pool`` connections per host) is thread-safe in
urllib3; the client never mutates the session after construction (a redirect to the same
host over https is the one exception, made under a lock) and VIP sets no cookies.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import requests

from agent.pacer import ServerBudget, budget_for, policy
from agent.vip.answers import _Answers, _is_error_object, _NotSent
from agent.vip.connections import _ERROR_BODY_MAX, _Adapter, _ApiKeyAuth, _UploadBody
from agent.vip.errors import (
    ApiError,
    DeadlineExceeded,
    ProtocolError,
    RedirectError,
    TransientError,
    VipError,
)
from agent.vip.smallput import SmallPut
from agent.vip.urls import normalise_server
from agent.vip.watchdog import _CURRENT, _Guard

log = logging.getLogger("agent.vip.client")
_T = TypeVar("_T", bound="_Transport")

#: default read timeout of ``GET /executions/{id}/results``: VIP makes about two storage calls
#: per output file before it answers (vip-client's ``init_timeout`` serves the same purpose)
RESULTS_TIMEOUT = 600.0


def _exempt_from_origin_check(base_url: str) -> bool:
    """True for https, and for plain http to a loopback IP literal (traffic that never leaves
    the machine); any other http server is first asked without the key (see
    :meth:`_Transport._check_origin`). A name such as ``localhost`` is checked too: it
    resolves through the system's configuration."""
    parts = urlsplit(base_url)
    if parts.scheme == "https":
        return True
    try:
        return ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """The auth hook of the origin check: the request goes without the key."""
    return request


class _Moved(_NotSent):
    """The server redirected the request to the same host over https; the client now uses
    that address, and the request was not carried out: send it again."""


class _Transport(_Answers):
    """The session, deadlines, retries, redirects and the server's budget."""

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
        results_timeout: float = RESULTS_TIMEOUT,
        budget: ServerBudget | None = None,
    ) -> None:
        # one spelling of the server (``host``, ``https://host/``, ``https://host/rest/``...);
        # ConfigError for what is not a server URL
        self.base_url = normalise_server(base_url)
        self._rest = self.base_url + "/rest"
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout or min(self.timeout, 15.0))
        self.deadline = float(deadline or 5 * self.timeout)
        self.transfer_window = float(transfer_window or 2 * self.timeout)
        self.transfer_min_bytes = max(0, int(transfer_min_bytes))
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        #: read timeout of ``GET /executions/{id}/results`` (VIP asks its storage about every
        #: output file before answering)
        self.results_timeout = max(self.timeout, float(results_timeout))
        #: after a transfer timeout, how long to watch for the upload landing before re-sending
        self.transfer_grace = max(0.0, float(transfer_grace))
        #: what paces this server, shared with every client of it in this process
        self.budget = budget if budget is not None else budget_for(self.base_url)
        self._own_budget = budget is not None
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
        self._pool = max(1, pool)
        self._small = self._small_transport()
        self._lock = threading.Lock()
        self._origin_lock = threading.Lock()
        #: False until a plain-http server other than loopback answered once without the key
        self._origin_checked = _exempt_from_origin_check(self.base_url)
        self._max_transfer: int | None = None
        self._max_transfer_known = False
        #: the server's largest ``limit`` on the execution list, once it refused a larger one
        self._list_limit: int | None = None

    def _small_transport(self) -> SmallPut:
        """Files below the sendfile size go through a lighter transport (same pool size,
        timeouts, CA bundle and deadline guard; see agent/vip/smallput.py for why)."""
        return SmallPut(
            self._rest, connect_timeout=self.connect_timeout, timeout=self.timeout,
            verify=self._session.verify if self._session.verify is not None else True,
            pool=self._pool, answer_max=_ERROR_BODY_MAX,
        )

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"VipClient({self.base_url!r})"

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()
        self._small.close()

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _delay(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (0 = the first): the ``retry`` policy, starting
        at this client's ``backoff``."""
        if self.backoff <= 0:
            return 0.0
        return replace(policy("retry"), base=self.backoff).delay(attempt)

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
        read_timeout: float | None = None,
    ) -> requests.Response:
        """One HTTP exchange; returns a 2xx response or raises a typed error.

        Without ``guard`` the exchange gets the overall deadline and the body is read before
        returning. A streamed response comes with the caller's guard still running.
        ``read_timeout`` replaces the client's ``timeout`` for this exchange (and stretches
        its overall deadline to fit). A redirect to the same host over https moves the client
        there and the request is sent again once (a file body cannot be: that raises
        :class:`_Moved`, a "not sent" error the upload's retry sends again).
        """
        self._check_origin()
        self.budget.acquire()
        own = guard is None
        if guard is None:
            guard = _Guard(deadline=self._deadline_for(read_timeout))
        try:
            for attempt in (0, 1):
                try:
                    return self._send_guarded(
                        method, rest_path, guard, params=params, data=data,
                        json_body=json_body, headers=headers, stream=stream, on_8000=on_8000,
                        what=what, read_timeout=read_timeout,
                    )
                except _Moved:
                    if attempt or isinstance(data, _UploadBody):
                        raise
            raise AssertionError("unreachable")
        finally:
            if own:
                guard.close()

    def _deadline_for(self, read_timeout: float | None) -> float:
        if read_timeout is None:
            return self.deadline
        return max(self.deadline, self.connect_timeout + 2 * read_timeout)

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
        read_timeout: float | None = None,
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
                    timeout=(self.connect_timeout, read_timeout or self.timeout),
                    allow_redirects=False,
                )
        except requests.exceptions.TooManyRedirects as exc:
            # with max_redirects 0, requests reports the 3xx itself this way (it used to be
            # taken for a lost connection, and retried for hours)
            if exc.response is None:
                raise self._network_error(exc, where) from None
            resp = exc.response
        except requests.exceptions.RequestException as exc:
            if guard.expired:
                raise self._expired(guard, where, exc) from None
            raise self._network_error(exc, where, read_timeout) from None
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
            if 300 <= resp.status_code < 400:
                self._follow(resp.status_code, resp.headers.get("Location"), url, where)
            self._raise_for(resp, where, on_8000, what)
        finally:
            resp.close()

    # ------------------------------------------------------------------ redirects

    def _check_origin(self) -> None:
        """Before the key first goes to a plain-http server (not a loopback address), ask it
        once without the key: a portal behind an http->https redirect then answers the
        redirect, which is followed or refused before the key ever travels unencrypted."""
        if self._origin_checked:
            return
        with self._origin_lock:
            if self._origin_checked:
                return
            url = self._rest + "/platform"
            where = "GET /rest/platform (checking the address without the key)"
            self.budget.acquire()
            guard = _Guard(deadline=self.deadline)
            _CURRENT.guard = guard
            try:
                resp = self._session.request(
                    "GET", url, auth=_no_auth, stream=True, allow_redirects=False,
                    timeout=(self.connect_timeout, self.timeout),
                )
            except requests.exceptions.TooManyRedirects as exc:
                if exc.response is None:
                    raise self._network_error(exc, where) from None
                resp = exc.response
            except requests.exceptions.RequestException as exc:
                if guard.expired:
                    raise self._expired(guard, where, exc) from None
                raise self._network_error(exc, where) from None
            finally:
                _CURRENT.guard = None
                guard.close()
            try:
                if 300 <= resp.status_code < 400:
                    try:
                        self._follow(resp.status_code, resp.headers.get("Location"), url, where)
                    except _Moved:
                        pass  # now on https: nothing more to check
            finally:
                resp.close()
            self._origin_checked = True

    def _follow(self, status: int, location: str | None, url: str, where: str) -> None:
        """A 3xx answer to ``url``: move to the same host over https (and raise
        :class:`_Moved`), or raise :class:`RedirectError` naming the target."""
        fix = "set the VIP URL (agent.yaml `server:` or --server) to VIP's https address"
        if not location:
            raise RedirectError(
                f"VIP at {self.base_url} answered a redirect (HTTP {status}) without a target; "
                + fix, detail=f"{where}: HTTP {status}, no Location", http_status=status,
            )
        target = urljoin(url, location)
        shown = self._scrub(target.split("?", 1)[0])
        asked, moved = urlsplit(url), urlsplit(target)
        detail = f"{where}: HTTP {status} to {shown}"
        origin = f"{moved.scheme}://{moved.netloc}" if moved.netloc else shown
        refused = f"VIP at {self.base_url} redirects to {self._scrub(origin)}; not followed"
        if moved.scheme != "https":
            raise RedirectError(
                f"{refused}: the API key is only sent over https; {fix}",
                detail=detail, http_status=status,
            )
        if (moved.hostname or "").lower() != (asked.hostname or "").lower():
            raise RedirectError(
                f"{refused}: it is another host ({moved.hostname}), and the API key goes only "
                f"to the configured server; if that is VIP, set the VIP URL to it",
                detail=detail, http_status=status,
            )
        tail = asked.path[len(urlsplit(self._rest).path):]  # "/path/..." after ".../rest"
        if target.split("?", 1)[0] == url.split("?", 1)[0] or not moved.path.endswith(
            "/rest" + tail
        ):
            raise RedirectError(
                f"{refused}: it is not the same request at another address; {fix}",
                detail=detail, http_status=status,
            )
        base = f"https://{moved.netloc}{moved.path[: len(moved.path) - len('/rest' + tail)]}"
        self._move_to(base.rstrip("/"))
        raise _Moved(f"VIP moved to {base}; sending again", detail=detail, http_status=status)

    def _move_to(self, base: str) -> None:
        """Use ``base`` from now on; said once, as a warning with the fix."""
        with self._lock:
            if base == self.base_url:
                return
            old, self.base_url = self.base_url, base
            self._rest = base + "/rest"
            small, self._small = self._small, self._small_transport()
            if not self._own_budget:
                self.budget = budget_for(base)
        small.close()
        log.warning(
            "VIP at %s redirects to %s: using %s; set the VIP URL to it (agent.yaml `server:` "
            "or --server) to skip the redirect", old, base, base,
        )

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
        window = self._deadline_for(kwargs.get("read_timeout"))
        while True:
            try:
                return self._send(method, rest_path, **kwargs)
            except TransientError as exc:
                if not retry or attempt >= self.retries:
                    raise
                delay = self._delay(attempt)
                if time.monotonic() + delay - started > window:
                    raise
                log.info(
                    "VIP %s %s failed (%s); retry %d/%d in %.1f s",
                    method, rest_path.split("?")[0], exc.message, attempt + 1, self.retries, delay,
                )
                time.sleep(delay)
                attempt += 1

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

