"""The VIP backend: :mod:`agent.backend.port` over VIP's REST API (``agent.vip.VipClient``).

Everything VIP-specific the runner used to know lives here: the CARMIN status labels
(:mod:`agent.backend.carmin`), the rule for an execution that vanished (``8015`` "deleted"
is certain; any other "not found" is VIP's catch-all 8000 and is checked against the
execution list first), VipSession's session layout (``<root>/<session>/INPUTS`` and
``OUTPUTS``), ``maxSizeDirectTransfer`` and the key check.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.backend import carmin
from agent.backend.port import (
    ExecStatus,
    ExecutionInfo,
    Progress,
    RemoteFile,
    SessionLayout,
)
from agent.vip.client import VipClient
from agent.vip.errors import NotFoundError

#: VIP's code for an execution that was deleted (only ended executions can be)
DELETED_CODE = 8015


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
        return _info(self.client.create_execution(name, pipeline, inputs, results_location))

    def find(self, name: str) -> ExecutionInfo | None:
        found = self.client.find_execution(name)
        return _info(found) if found is not None else None

    def status(self, execution_id: str) -> ExecutionInfo | None:
        try:
            return _info(self.client.execution(execution_id))
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

    def classify(self, label: str) -> ExecStatus:
        return carmin.classify(label)

    def job_problems(self, jobs: Mapping[str, Any]) -> list[str]:
        return carmin.job_problems(jobs)

    def results(self, execution_id: str) -> list[RemoteFile]:
        return [
            RemoteFile(path=p.path, size=p.size, is_dir=p.is_dir, exists=p.exists)
            for p in self.client.results(execution_id)
        ]

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
