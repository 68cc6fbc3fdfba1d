"""VIP's answers -> typed errors (:mod:`agent.vip.errors`), and the strict shape checks.

Decide on VIP's ``errorCode`` first, the HTTP status second (docs/vip-rest.md, "Errors"); a
request that got no answer at all is mapped from either transport's exception
(:meth:`_Answers._network_error`). Every message names the server; no message or detail ever
holds the API key (:meth:`_Answers._scrub`).
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any, NoReturn

import requests
import urllib3

from agent.errors import scrub
from agent.vip.connections import _ERROR_BODY_MAX, _ApiKeyAuth
from agent.vip.errors import (
    AccessDeniedError,
    ApiError,
    AuthError,
    CapacityError,
    NotFoundError,
    ProtocolError,
    RedirectError,
    TooLargeError,
    TransferTimeout,
    TransientError,
    VipError,
)
from agent.vip.smallput import NotConnected

_AUTH_CODES = frozenset({8002, 8003, 8004})
_CAPACITY_CODES = frozenset({2000, 2001})
_NOT_FOUND_CODES = frozenset({8007, 8015})
_ACCESS_CODE = 8013
_DELETED_CODE = 8015
_BACKOFF_CAP = 60.0
_RAW_MAX = 2000  # characters of a wrong answer kept in an error's detail


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


class _NotSent(TransientError):
    """The connection could not be opened: the request never reached the server."""


class _Answers:
    """Answer -> typed error mapping of one client (the transport sets these attributes)."""

    base_url: str
    _rest: str
    timeout: float
    _auth: _ApiKeyAuth

    def _scrub(self, text: str) -> str:
        """Defence in depth: a proxy page could echo request headers back."""
        return scrub(text, self._auth.key, "<apikey>")  # a short test key only as a whole word

    def _network_error(
        self, exc: BaseException, where: str, read_timeout: float | None = None
    ) -> VipError:
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
                f"VIP at {self.base_url} did not answer within {read_timeout or self.timeout:g} s",
                detail=detail,
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
            raise RedirectError(
                f"VIP redirected the request to {self._scrub(target)}; not followed: "
                "set the VIP URL to VIP's https address",
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

    def _raw(self, resp: requests.Response) -> str:
        """The start of an answer, for an error's detail (never the key)."""
        return self._scrub(resp.content[:_RAW_MAX].decode("utf-8", "replace"))

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

