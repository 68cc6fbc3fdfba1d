"""The VIP backend: :mod:`agent.backend.port` over VIP's REST API (``agent.vip.VipClient``).

Everything VIP-specific the runner used to know lives here: the CARMIN status labels
(:mod:`agent.backend.carmin`), the rule for an execution that vanished (``8015`` "deleted"
is certain; any other "not found" is VIP's catch-all 8000 and is checked against the
execution list first), VipSession's session layout (``<root>/<session>/INPUTS`` and
``OUTPUTS``), ``maxSizeDirectTransfer`` and the key check.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from agent.backend import carmin
from agent.backend.port import (
    ENGINE_WAIT,
    ExecStatus,
    ExecutionInfo,
    Progress,
    RemoteFile,
    RunState,
    SessionLayout,
)
from agent.vip.client import VipClient
from agent.vip.errors import (
    ApiError,
    CapacityError,
    LaunchUncertain,
    NotFoundError,
    TransientError,
)

log = logging.getLogger("vip_agent.backend.vip")

#: VIP's code for an execution that was deleted (only ended executions can be)
DELETED_CODE = 8015
#: the engine refused a launch "for now" (after 4.6: an engine answering 503)
ENGINE_SATURATED = 2003
#: 4.6 answers an engine that cannot take a launch with the generic 8000 and these words
#: (``WorkflowBusiness.launch``: no usable resource, engine disabled); retried later
ENGINE_BUSY_WORDS = re.compile(r"no ress?ources? available|workflow is null", re.IGNORECASE)

#: GASW job statuses (``GaswStatus``) that a job whose work was done can read: VIP shows
#: the latest task of each job, and GASW replicates and resubmits jobs, then cancels (or
#: deletes, kills) the other replicas of one that completed; a finished execution's job
#: reading one of these did its work. ERROR, ERROR_HELD, STALLED, KILL, CANCELLED... did not.
JOB_DONE = frozenset({
    "COMPLETED", "CANCELLED_REPLICA", "DELETED_REPLICA", "KILL_REPLICA", "REPLICATE",
    "RESCHEDULE",
})


def engine_busy(err: ApiError) -> bool:
    """A launch refusal that means "try later": 2003, or 8000 with 4.6's engine words."""
    if err.code == ENGINE_SATURATED:
        return True
    return err.code == 8000 and bool(ENGINE_BUSY_WORDS.search(f"{err.message} {err.detail or ''}"))


def vip_words(err: ApiError) -> str:
    """VIP's own message in a refusal (from the error's detail), else the error's message."""
    detail = err.detail or ""
    _, sep, said = detail.partition(f"errorCode {err.code}: ")
    return said.strip() if sep and said.strip() else err.message


def _info(record: Mapping[str, Any]) -> ExecutionInfo:
    jobs = record.get("jobs")
    return ExecutionInfo(
        id=str(record.get("identifier")),
        name=str(record.get("name") or ""),
        status=carmin.classify(record.get("status")),
        jobs=dict(jobs) if isinstance(jobs, dict) else {},
    )


class VipStorage:
    """VIP's file API (``/path``)."""

    def __init__(self, client: VipClient) -> None:
        self.client = client

    def sizes(self, folder: str) -> dict[str, int | None]:
        return self.client.sizes(folder)

    def makedirs(self, folder: str) -> None:
        self.client.makedirs(folder)

    def put(self, local: Path, remote: str, *, progress: Progress | None = None,
            verify: bool = True) -> None:
        self.client.upload(local, remote, progress=progress, verify=verify)

    def get(self, remote: str, local: Path, *, expected_size: int | None = None,
            progress: Progress | None = None) -> int:
        return self.client.download(remote, local, expected_size=expected_size, progress=progress)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        self.client.delete(path, missing_ok=missing_ok)

    def exists(self, path: str) -> bool:
        return self.client.exists(path)


class VipEngine:
    """VIP's pipelines and executions (CARMIN ``/pipelines``, ``/executions``)."""

    def __init__(self, client: VipClient) -> None:
        self.client = client

    def pipelines(self) -> list[dict[str, Any]]:
        return self.client.pipelines()

    def pipeline(self, identifier: str) -> dict[str, Any]:
        return self.client.pipeline(identifier)

    def launch(self, name: str, pipeline: str, inputs: Mapping[str, str | list[str]],
               results_location: str) -> ExecutionInfo:
        """Launch; an engine that refuses "for now" (2003, 8000 "no ressources available",
        "Workflow is null") is a ``CapacityError`` carrying its code (the runner backs off
        with the ``engine`` policy); 2004 LAUNCH_ERROR and other refusals stay ``ApiError``
        (permanent: the dataset fails with VIP's words)."""
        try:
            return _info(self.client.create_execution(name, pipeline, inputs, results_location))
        except LaunchUncertain as err:
            # an engine refusal answered with an error status (503 for 2003) reads as a
            # failed exchange; its code says nothing was created
            if err.code == ENGINE_SATURATED:
                raise _engine_refusal(err) from None
            raise
        except ApiError as err:
            if engine_busy(err):
                raise _engine_refusal(err) from None
            raise

    def find(self, name: str) -> ExecutionInfo | None:
        found = self.client.find_execution(name)
        return _info(found) if found is not None else None

    def status(self, execution_id: str) -> ExecutionInfo | None:
        """The execution now. VIP's engine can record a kill as ``Unknown`` while the
        execution list says ``Killed``: an ``Unknown`` read is checked against the list,
        and an ended label there is the answer (only an ended label; a list saying it
        runs leaves ``Unknown`` to the runner's limit)."""
        try:
            info = _info(self.client.execution(execution_id))
        except NotFoundError as err:
            if err.code == DELETED_CODE:
                return None
            # 8000 is VIP's catch-all: the execution list settles whether it still exists
            listed = next(
                (x for x in self.client.executions() if x.get("identifier") == execution_id), None
            )
            if listed is not None and isinstance(listed.get("status"), str):
                return _info(listed)
            return None
        if info.status.state is RunState.UNKNOWN:
            listed = next(
                (x for x in self.client.executions() if x.get("identifier") == execution_id), None
            )
            if listed is not None and carmin.classify(listed.get("status")).ended:
                return replace(info, status=carmin.classify(listed.get("status")))
        return info

    def classify(self, label: str) -> ExecStatus:
        return carmin.classify(label)

    def job_problems(self, jobs: Mapping[str, Any]) -> list[str]:
        """Jobs of a finished execution that did not do their work, in GASW's words: a
        job reading ``CANCELLED_REPLICA`` (another replica completed it) or a replica or
        resubmission status is not one."""
        return [
            str(j) for j, info in jobs.items()
            if isinstance(info, dict)
            and str(info.get("status")) not in JOB_DONE
        ]

    def results(self, execution_id: str) -> list[RemoteFile]:
        """The execution's outputs from ``/results`` (its own long read timeout). When that
        call fails (VIP asks its storage about every output, and times out on big
        executions), the outputs are found another way: the execution's ``returnedFiles``
        and a listing of each results folder they lie in (sizes included)."""
        try:
            return [
                RemoteFile(path=p.path, size=p.size, is_dir=p.is_dir, exists=p.exists)
                for p in self.client.results(execution_id)
            ]
        except TransientError as err:
            log.info("execution %s: /results failed (%s); finding its outputs from "
                     "returnedFiles and a listing", execution_id, err.message)  # fmt: skip
            return self._results_by_listing(execution_id)

    def _results_by_listing(self, execution_id: str) -> list[RemoteFile]:
        """Outputs from ``returnedFiles`` (platform paths), sized by listing their folders;
        a returned folder is listed recursively."""
        record = self.client.execution(execution_id)
        returned = record.get("returnedFiles") or {}
        paths: list[str] = []
        if isinstance(returned, dict):
            for value in returned.values():
                items = value if isinstance(value, list) else [value]
                paths += [str(p) for p in items if isinstance(p, str) and p.startswith("/")]
        found: dict[str, RemoteFile] = {}
        listed: dict[str, dict[str, RemoteFile]] = {}

        def listing(folder: str) -> dict[str, RemoteFile]:
            if folder not in listed:
                try:
                    entries = self.client.list(folder)
                except NotFoundError:
                    entries = []
                listed[folder] = {
                    e.path.rstrip("/"): RemoteFile(e.path, e.size, e.is_dir) for e in entries
                }
            return listed[folder]

        def add_tree(folder: str) -> None:
            for path, entry in listing(folder).items():
                if entry.is_dir:
                    add_tree(path)
                else:
                    found[path] = entry

        for path in paths:
            path = path.rstrip("/")
            entry = listing(str(PurePosixPath(path).parent)).get(path)
            if entry is None:
                found[path] = RemoteFile(path, None, exists=False)
            elif entry.is_dir:
                add_tree(path)
            else:
                found[path] = entry
        return sorted(found.values(), key=lambda f: f.path)

    def log(self, execution_id: str, stream: str, job: str | None = None) -> str:
        if stream == "stdout":
            return self.client.stdout(execution_id, job)
        if stream == "stderr":
            return self.client.stderr(execution_id, job)
        raise ValueError(f"no log stream {stream!r}")

    def kill(self, execution_id: str) -> None:
        self.client.kill(execution_id)

    def delete_execution(self, execution_id: str) -> None:
        self.client.delete_execution(execution_id, delete_files=True)


def _engine_refusal(err: ApiError | LaunchUncertain) -> CapacityError:
    said = vip_words(err) if isinstance(err, ApiError) else err.message
    return CapacityError(
        f"{ENGINE_WAIT}: it cannot take the launch for now ({said}); the launch "
        "is tried again later",
        detail=err.detail, code=err.code, http_status=err.http_status,
    )


class VipBackend:
    """One VIP server and key. ``client`` stays reachable for commands that list pipelines."""

    def __init__(self, client: VipClient) -> None:
        self.client = client
        self._storage = VipStorage(client)
        self._engine = VipEngine(client)

    def __repr__(self) -> str:
        return f"VipBackend({self.client.base_url!r})"

    @property
    def server(self) -> str:
        return str(self.client.base_url)

    @property
    def storage(self) -> VipStorage:
        return self._storage

    @property
    def engine(self) -> VipEngine:
        return self._engine

    def max_transfer_size(self, *, refresh: bool = False) -> int | None:
        """``maxSizeDirectTransfer`` of ``/platform`` (cached by the client)."""
        return self.client.max_transfer_size(refresh=refresh)

    def check_key(self) -> None:
        self.client.check_key()

    def session(self, root_folder: str, session: str) -> SessionLayout:
        """VipSession's layout: ``<root>/<session>/INPUTS`` and ``.../OUTPUTS``."""
        return SessionLayout(f"{root_folder.rstrip('/')}/{session}")

    def layout(self, root: str) -> SessionLayout:
        return SessionLayout(root.rstrip("/"))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> VipBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
