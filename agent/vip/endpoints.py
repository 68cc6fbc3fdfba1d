"""VIP's endpoints over the transport: the platform, paths (``/path``), pipelines and
executions, each answer checked for its shape. Transfers are in :mod:`agent.vip.transfers`.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from agent.pacer import policy
from agent.vip.answers import (
    _DELETED_CODE,
    _is_dict,
    _is_error_object,
    _is_execution,
    _is_list_of_dicts,
    _is_pipeline,
    _NotSent,
)
from agent.vip.errors import (
    ApiError,
    AuthError,
    CapacityError,
    DeleteTimeout,
    InvalidNameError,
    LaunchUncertain,
    NotFoundError,
    TransientError,
    UnsafePathError,
)
from agent.vip.models import PathInfo, start_seconds
from agent.vip.transport import _Transport, log

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



#: VIP's default maximum of ``limit`` on ``GET /executions`` (``defaultLimitListExecutions``)
LIST_LIMIT = 500
_NUMBER = re.compile(r"\d+")


def _said_limit(exc: ApiError, asked: int) -> int | None:
    """A maximum smaller than ``asked`` named in a refusal's message ("The limit cannot
    exceed 200"), if any."""
    message = (exc.detail or "").split("errorCode 8000", 1)[-1]
    if "limit" not in message.lower():
        return None
    smaller = [int(n) for n in _NUMBER.findall(message) if 0 < int(n) < asked]
    return max(smaller) if smaller else None


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"



def _check_name(remote: str) -> None:
    name = remote.rsplit("/", 1)[-1]
    if not _SAFE_NAME.fullmatch(name):
        raise InvalidNameError(
            f"cannot create '{name}' on VIP: VIP renames names with spaces or non-ASCII "
            "characters without saying so; rename it using ASCII letters, digits, '-', '_' or '.'",
            detail=f"remote path {remote!r}",
        )



class _Endpoints(_Transport):
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

    def wait_deleted(
        self, path: str, timeout: float | None = None, interval: float | None = None
    ) -> None:
        """Poll ``exists`` until ``path`` is gone; DeleteTimeout after ``timeout`` seconds.

        The waits follow the ``delete`` policy (:mod:`agent.pacer`), whose deadline is the
        default ``timeout``; ``interval`` caps them (a fixed interval when the policy's first
        wait is longer).
        """
        rule = policy("delete")
        if interval is not None:
            rule = replace(rule, base=min(rule.base, interval), cap=interval)
        limit = rule.deadline if timeout is None else timeout
        started = time.monotonic()
        attempt = 0
        while self.exists(path):
            now = time.monotonic()
            if limit is not None and now - started >= limit:
                raise DeleteTimeout(
                    f"{path} was still present on VIP {limit:g} s after its deletion; "
                    "VIP deletes in the background, try again later",
                    detail=f"polled exists up to every {rule.cap:g} s",
                )
            pause = rule.delay(attempt)
            if limit is not None:
                pause = min(pause, started + limit - now)
            time.sleep(max(0.0, pause))
            attempt += 1

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

    def executions(self, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """Execution summaries, newest first (``inputValues``/``returnedFiles``/``jobs`` empty).

        ``limit`` (default: VIP's default maximum, 500) is lowered to the server's own maximum
        when it has a smaller one: VIP refuses a larger ``limit`` with a generic 400 8000, and
        the request is then sent again with the maximum the platform publishes
        (``defaultLimitListExecutions`` in ``GET /platform``) or the refusal names; the
        maximum found is kept for the next calls.
        """
        wanted = LIST_LIMIT if limit is None else max(1, int(limit))
        with self._lock:
            known = self._list_limit
        asked = min(wanted, known) if known is not None else wanted
        while True:
            try:
                body = self._json(
                    "GET", "/executions", params={"limit": str(asked)},
                    what="the execution list", shape=_is_list_of_dicts,
                    expected="a list of executions",
                )
                return list(body)
            except ApiError as exc:
                if exc.code != 8000 or exc.http_status != 400:
                    raise
                lower = self._list_maximum(exc, asked)
                if lower is None:
                    raise
                log.info("VIP refused limit=%d on the execution list; asking %d", asked, lower)
                asked = lower
                with self._lock:
                    self._list_limit = lower

    def _list_maximum(self, exc: ApiError, asked: int) -> int | None:
        """The server's largest ``limit`` when it is below ``asked``, else None."""
        published = self.platform().get("defaultLimitListExecutions")
        if isinstance(published, int) and not isinstance(published, bool) and 0 < published < asked:
            return published
        return _said_limit(exc, asked)

    def find_execution(self, name: str) -> dict[str, Any] | None:
        """Newest execution summary named exactly ``name``, or None."""
        matches = [e for e in self.executions() if e.get("name") == name]
        if not matches:
            return None
        # the list is newest first; max() keeps the first of equal or missing dates
        return max(matches, key=lambda e: start_seconds(e) or float("-inf"))

    def results(
        self, execution_id: str, *, timeout: float | None = None
    ) -> builtins.list[PathInfo]:
        """Output files of an execution (entries may have ``exists=False``).

        VIP builds this answer slowly (about two storage calls per output file), so it gets
        its own read timeout: ``timeout``, default the client's ``results_timeout``.
        """
        body = self._json(
            "GET", self._exec_path(execution_id) + "/results", on_8000=NotFoundError,
            what=f"execution {execution_id}",
            shape=_is_list_of_dicts, expected="a list of output path properties",
            read_timeout=max(self.timeout, timeout if timeout is not None else self.results_timeout),
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


