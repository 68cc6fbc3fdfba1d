"""Typed errors of the VIP client.

Callers decide on the class, never on message text:

* :class:`AuthError`: the key is missing, wrong or locked; stop and ask for ``vip-agent login``.
* :class:`CapacityError`: VIP runs too many executions; launch again later.
* :class:`NotFoundError`: a path, pipeline or execution does not exist (VIP says 400, not 404).
* :class:`TransientError`: outage, proxy page, dropped connection, timeout; retry later.
  :class:`LaunchUncertain` is the one raised by ``POST /executions``: the execution may exist.
* :class:`TransferTimeout`: a transfer answered 400 8000, which may be VIP's 45 s transfer
  timeout (the upload can still land); the client cannot tell, the caller checks.
* :class:`ApiError`: any other coded error (``.code``). :class:`RedirectError` is the one raised
  when the server redirects where the key must not follow (another host, plain http).
* :class:`ProtocolError`: a 2xx answer that is an error object or not what the endpoint
  returns (a broken server or proxy); transient, the raw answer is in ``detail``.
* :class:`UnsafePathError`: a path that is relative, has ``.``/``..`` segments or lies outside
  the folder it must be in; never retried.

No message or detail ever contains the API key: the key only travels in a request header, and
errors are built from the method, the URL path and the server's answer.
"""

from __future__ import annotations

from agent.errors import AgentError, CredentialError


class VipError(AgentError):
    """Base of every error raised by :class:`agent.vip.VipClient`."""

    def __init__(
        self,
        message: str,
        detail: str | None = None,
        *,
        code: int | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message, detail)
        #: VIP ``errorCode`` when the server sent one
        self.code = code
        #: HTTP status when a response arrived
        self.http_status = http_status

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!r}, "
            f"http_status={self.http_status!r})"
        )


class AuthError(VipError, CredentialError):
    """The API key was refused (8002), missing (8003) or the account is locked (8004)."""

    exit_code = CredentialError.exit_code


class CapacityError(VipError):
    """VIP's maximum of running executions is reached (2000 platform, 2001 user): retry later."""


class NotFoundError(VipError):
    """A path, pipeline (8007) or execution (8000, 8015 deleted) does not exist."""


class TransientError(VipError):
    """Outage or network trouble (5xx, proxy pages, connection errors, timeouts): retry later."""


class LaunchUncertain(TransientError):
    """``POST /executions`` failed in a way that does not tell whether VIP created the execution.

    The caller must look for its (deterministic) execution name with
    :meth:`agent.vip.VipClient.find_execution` before launching again.
    """


class ProtocolError(TransientError):
    """VIP answered 2xx with an error object or with something this endpoint never returns."""


class DeadlineExceeded(TransientError):
    """A request passed its overall deadline, or a transfer moved too few bytes in a window."""


class DeleteTimeout(TransientError):
    """A deleted path was still visible after the wait (VIP deletes asynchronously)."""


class SizeMismatch(TransientError):
    """A transferred file does not have the expected size (truncated transfer)."""


class SourceChanged(VipError):
    """A local file changed size while it was being sent: the copy on VIP is not that file."""


class TransferTimeout(VipError):
    """A transfer answered 400 8000: maybe VIP's transfer timeout, and the file may still land."""


class ApiError(VipError):
    """Any other error VIP reported with a code."""


class RedirectError(ApiError):
    """The server redirected to an address the client does not follow with the key (another
    host, plain http, another path): the configured VIP URL needs fixing."""


class AccessDeniedError(ApiError):
    """VIP refused access to a path (8013), e.g. outside /vip/Home or a group you are not in."""


class TooLargeError(ApiError):
    """A file is larger than VIP's direct-transfer limit (``maxSizeDirectTransfer``)."""


class EmptyFileError(VipError):
    """A 0-byte file cannot be uploaded: VIP would create a folder instead."""


class InvalidNameError(VipError):
    """A remote name VIP would silently rename (spaces, non-ASCII): refused before sending."""


class UnsafePathError(VipError, ValueError):
    """A VIP path is relative, has ``.``/``..`` segments, or is outside its expected folder.

    Also a ``ValueError``: a bad path given by a caller is a programming error.
    """
