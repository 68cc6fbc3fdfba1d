"""An in-memory backend: the port of :mod:`agent.backend.port` with no network at all.

For tests and benchmarks (``from agent.backend.memory import MemoryBackend``): the same
conformance suite as the VIP backend holds it to the same behaviour, and state-machine tests
run on it in milliseconds. Two controls a real server cannot give:

- a :class:`Clock` the test moves: executions last ``duration`` seconds of *that* clock, so
  a six-hour ``Unknown`` limit or a long pipeline takes no real time (give the runner the
  same clock: ``Runner(..., clock=backend.clock.time)``);
- :class:`Faults`, scripted by count: "the next N launches are refused for capacity",
  "the next N status reads say Unknown", "the next transfer fails", "the next N calls find
  the server unreachable"; every scripted fault decrements its counter.

Executions use CARMIN's labels (the journal's vocabulary) and finish by writing one small
result file per execution under their results location, in a ``<timestamp>`` folder as VIP
does; pipelines are the local server's Boutiques descriptors (``agent/localvip/pipelines``):
``duration`` sets how long an execution lasts, ``exit_code`` != 0 makes it fail.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.backend import carmin
from agent.backend.port import (
    ENGINE_WAIT,
    ExecStatus,
    ExecutionInfo,
    Progress,
    RemoteFile,
    SessionLayout,
)
from agent.localvip.pipelines import load_pipelines
from agent.vip.errors import (
    ApiError,
    AuthError,
    CapacityError,
    LaunchUncertain,
    NotFoundError,
    SourceChanged,
    TooLargeError,
    TransientError,
)

#: how long an execution lasts when its inputs do not say (clock seconds)
DEFAULT_DURATION = 10.0
_CHUNK = 1 << 20


class Clock:
    """A clock that moves only when told (seconds since the epoch, like ``time.time``)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += max(0.0, seconds)

    def sleep(self, seconds: float) -> bool:
        """``Runner.run(sleep=...)``: move the clock instead of waiting; never interrupted."""
        self.advance(seconds)
        return False


@dataclass
class Faults:
    """Scripted faults: each counter is how many of the next calls fail that way."""

    #: launches refused: ``CapacityError`` for "try later" codes (VIP's 2000/2001 cap,
    #: 2003 a busy engine), ``ApiError`` for the others (2004 LAUNCH_ERROR)
    refuse_launches: int = 0
    #: the code of those refusals
    refuse_code: int = 2001
    #: launches that create the execution, then raise ``LaunchUncertain`` (answer lost)
    uncertain_launches: int = 0
    #: status reads that say ``Unknown`` (the execution goes on running)
    unknown_reads: int = 0
    #: transfers (put or get) that fail with ``TransientError`` before moving a byte
    transfer_failures: int = 0
    #: calls of any kind that find the server unreachable (``TransientError``)
    outage: int = 0
    #: clock seconds a deleted path stays visible (VIP deletes asynchronously)
    delete_delay: float = 0.0


@dataclass
class _Execution:
    id: str
    name: str
    pipeline: str
    inputs: dict[str, Any]
    results_location: str
    started: float
    duration: float
    fails: bool
    label: str = "Running"
    #: a label forced by the test (``MemoryBackend.set_status``), None when simulated
    forced: str | None = None
    deleted: bool = False
    results: list[str] = field(default_factory=list)


class MemoryStorage:
    """Files in a dict; folders in a set."""

    def __init__(self, backend: MemoryBackend) -> None:
        self._b = backend

    def sizes(self, folder: str) -> dict[str, int | None]:
        b = self._b
        with b.lock:
            b.call("sizes")
            base = PurePosixPath(folder)
            return {
                PurePosixPath(p).name: len(data) for p, data in b.files.items()
                if PurePosixPath(p).parent == base and b._visible(p)
            }

    def makedirs(self, folder: str) -> None:
        b = self._b
        with b.lock:
            b.call("makedirs")
            path = PurePosixPath(folder)
            for p in [path, *path.parents]:
                b.folders.add(str(p))
                b.deleting.pop(str(p), None)

    def put(self, local: Path, remote: str, *, progress: Progress | None = None,
            verify: bool = True) -> None:
        b = self._b
        with b.lock:
            b.call("put")
            b.transfer_fault()
            if str(PurePosixPath(remote).parent) not in b.folders:
                raise NotFoundError(f"cannot upload {remote}: its folder does not exist")
        size = os.stat(local).st_size
        chunks: list[bytes] = []
        with open(local, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                chunks.append(chunk)
                if progress is not None:
                    progress(len(chunk))
        data = b"".join(chunks)
        if len(data) != size or os.stat(local).st_size != size:
            raise SourceChanged(f"{local} changed while it was being sent")
        with b.lock:
            b.files[remote] = data
            b.deleting.pop(remote, None)
            b.bytes_moved["upload"] += len(data)

    def get(self, remote: str, local: Path, *, expected_size: int | None = None,
            progress: Progress | None = None) -> int:
        b = self._b
        with b.lock:
            b.call("get")
            b.transfer_fault()
            data = b.files.get(remote) if b._visible(remote) else None
            if data is None:
                raise NotFoundError(f"{remote} does not exist on {b.server}")
            limit = b.max_transfer
            if limit is not None and len(data) > limit:
                raise TooLargeError(f"{remote} ({len(data)} bytes) is above the limit of {limit}")
            b.bytes_moved["download"] += len(data)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(local.name + ".part")
        with open(part, "wb") as handle:
            for start in range(0, len(data), _CHUNK):
                piece = data[start:start + _CHUNK]
                handle.write(piece)
                if progress is not None:
                    progress(len(piece))
        if expected_size is not None and len(data) != expected_size:
            part.unlink(missing_ok=True)
            raise TransientError(f"{remote}: {len(data)} bytes instead of {expected_size}")
        os.replace(part, local)
        return len(data)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        b = self._b
        with b.lock:
            b.call("delete")
            found = [p for p in (*b.files, *b.folders) if _below(p, path) and b._visible(p)]
            if not found:
                if missing_ok:
                    return
                raise NotFoundError(f"{path} does not exist on {b.server}")
            if b.faults.delete_delay > 0:
                gone = b.clock.time() + b.faults.delete_delay
                for p in found:
                    b.deleting.setdefault(p, gone)
            else:
                b._remove(found)

    def exists(self, path: str) -> bool:
        b = self._b
        with b.lock:
            b.call("exists")
            return (path in b.files or path in b.folders) and b._visible(path)


class MemoryEngine:
    """Executions that run on the backend's clock."""

    def __init__(self, backend: MemoryBackend) -> None:
        self._b = backend

    def pipelines(self) -> list[dict[str, Any]]:
        with self._b.lock:
            self._b.call("pipelines")
        return [p.summary() for p in self._b.pipeline_defs.values()]

    def pipeline(self, identifier: str) -> dict[str, Any]:
        with self._b.lock:
            self._b.call("pipeline")
        found = self._b.pipeline_defs.get(identifier)
        if found is None:
            raise NotFoundError(f"no pipeline {identifier!r} on {self._b.server}")
        return found.detail(identifier)

    def launch(self, name: str, pipeline: str, inputs: Mapping[str, str | list[str]],
               results_location: str) -> ExecutionInfo:
        b = self._b
        with b.lock:
            b.call("launch")
            if pipeline not in b.pipeline_defs:
                raise NotFoundError(f"no pipeline {pipeline!r} on {b.server}")
            if b.faults.refuse_launches > 0:
                b.faults.refuse_launches -= 1
                code = b.faults.refuse_code
                if code in (2000, 2001):
                    raise CapacityError(
                        "the server runs as many executions as it allows; retry later", code=code)
                if code == 2003:
                    raise CapacityError(f"{ENGINE_WAIT}: the engine is saturated (scripted)",
                                        code=code)  # fmt: skip
                raise ApiError(f"the launch of {name!r} was refused (scripted, {code})", code=code)
            b._tick()
            if b.max_running is not None and b.running() >= b.max_running:
                raise CapacityError("the server runs as many executions as it allows; retry later",
                                    code=2001)
            values = dict(inputs)
            duration = _number(values.get("duration"), b.default_duration)
            e = _Execution(
                id=f"memory-{len(b.executions) + 1:04d}", name=name, pipeline=pipeline,
                inputs=values, results_location=results_location, started=b.clock.time(),
                duration=duration, fails=_number(values.get("exit_code"), 0.0) != 0,
            )
            b.executions[e.id] = e
            b.launches.append(e.id)
            if b.faults.uncertain_launches > 0:
                b.faults.uncertain_launches -= 1
                raise LaunchUncertain(f"the answer to the launch of {name!r} was lost")
            return b._info(e)

    def find(self, name: str) -> ExecutionInfo | None:
        b = self._b
        with b.lock:
            b.call("find")
            b._tick()
            found = [e for e in b.executions.values() if e.name == name and not e.deleted]
            return b._info(found[-1]) if found else None

    def status(self, execution_id: str) -> ExecutionInfo | None:
        b = self._b
        with b.lock:
            b.call("status")
            b._tick()
            e = b.executions.get(execution_id)
            if e is None or e.deleted:
                return None
            info = b._info(e)
            if b.faults.unknown_reads > 0 and not info.status.ended:
                b.faults.unknown_reads -= 1
                return ExecutionInfo(e.id, e.name, carmin.classify("Unknown"), info.jobs)
            return info

    def classify(self, label: str) -> ExecStatus:
        return carmin.classify(label)

    def job_problems(self, jobs: Mapping[str, Any]) -> list[str]:
        return carmin.job_problems(jobs)

    def results(self, execution_id: str) -> list[RemoteFile]:
        b = self._b
        with b.lock:
            b.call("results")
            e = b._known(execution_id)
            return [RemoteFile(p, len(b.files[p])) for p in e.results if p in b.files]

    def log(self, execution_id: str, stream: str, job: str | None = None) -> str:
        b = self._b
        with b.lock:
            b.call("log")
            e = b._known(execution_id)
            return f"{stream} of {e.name} ({e.pipeline}), job {job or 1}\n"

    def kill(self, execution_id: str) -> None:
        b = self._b
        with b.lock:
            b.call("kill")
            b._tick()
            e = b._known(execution_id)
            if e.label == "Running":
                e.label = "Killed"

    def delete_execution(self, execution_id: str) -> None:
        b = self._b
        with b.lock:
            b.call("delete_execution")
            b._tick()
            e = b.executions.get(execution_id)
            if e is None or e.deleted:
                return
            if e.label not in ("Finished", "Killed"):
                raise ApiError(f"execution {execution_id} cannot be deleted while {e.label}",
                               code=8000)
            e.deleted = True
            b._remove([p for p in e.results if p in b.files])


class MemoryBackend:
    """A whole platform in memory. ``key``: the one key it accepts (None: any key)."""

    def __init__(
        self,
        server: str = "memory://vip",
        key: str | None = None,
        *,
        clock: Clock | None = None,
        faults: Faults | None = None,
        max_running: int | None = None,
        max_transfer: int | None = None,
        default_duration: float = DEFAULT_DURATION,
        output_size: int = 64,
        accepted_key: str | None = None,
    ) -> None:
        self._server = server
        self.key = key
        self.accepted_key = accepted_key
        self.clock = clock or Clock()
        self.faults = faults or Faults()
        self.max_running = max_running
        self.max_transfer = max_transfer
        self.default_duration = default_duration
        #: bytes of each result file (raise it above ``max_transfer`` to leave outputs behind)
        self.output_size = output_size
        self.lock = threading.RLock()
        self.files: dict[str, bytes] = {}
        self.folders: set[str] = {"/", "/vip", "/vip/Home"}
        #: path -> clock time it disappears (an asynchronous delete in progress)
        self.deleting: dict[str, float] = {}
        self.executions: dict[str, _Execution] = {}
        #: every execution ever created, in order (a duplicate launch shows here)
        self.launches: list[str] = []
        #: calls per operation (``launch``, ``status``, ``put``...)
        self.calls: Counter[str] = Counter()
        self.bytes_moved: Counter[str] = Counter()
        self.pipeline_defs = load_pipelines(None)
        self._storage = MemoryStorage(self)
        self._engine = MemoryEngine(self)

    def __repr__(self) -> str:
        return f"MemoryBackend({self._server!r})"

    # -- the port ----------------------------------------------------------------------
    @property
    def server(self) -> str:
        return self._server

    @property
    def storage(self) -> MemoryStorage:
        return self._storage

    @property
    def engine(self) -> MemoryEngine:
        return self._engine

    def max_transfer_size(self, *, refresh: bool = False) -> int | None:
        with self.lock:
            self.call("platform")
            return self.max_transfer

    def check_key(self) -> None:
        with self.lock:
            self.call("check_key")
            if self.accepted_key is not None and self.key != self.accepted_key:
                raise AuthError(f"the API key was refused by {self._server}", code=8002)

    def session(self, root_folder: str, session: str) -> SessionLayout:
        return SessionLayout(f"{root_folder.rstrip('/')}/{session}")

    def layout(self, root: str) -> SessionLayout:
        return SessionLayout(root.rstrip("/"))

    def close(self) -> None:
        pass

    # -- test controls -------------------------------------------------------------------
    def set_status(self, execution_id: str, label: str | None) -> None:
        """Force an execution's label (None: back to the simulation)."""
        with self.lock:
            self._known(execution_id).forced = label

    def running(self) -> int:
        """Executions that have not ended (by the simulation)."""
        with self.lock:
            self._tick()
            return sum(1 for e in self.executions.values()
                       if not e.deleted and not carmin.classify(e.label).ended)

    def paths(self) -> set[str]:
        """Every file and folder the server holds (deletes in progress included)."""
        with self.lock:
            self._tick()
            self._purge()
            return set(self.files) | self.folders

    # -- internals -----------------------------------------------------------------------
    def call(self, what: str) -> None:
        """Count a call; an outage fault fails it. Caller holds the lock."""
        self.calls[what] += 1
        self._check_outage()

    def _check_outage(self) -> None:
        if self.faults.outage > 0:
            self.faults.outage -= 1
            raise TransientError(f"{self._server} is unreachable (scripted outage)")

    def transfer_fault(self) -> None:
        if self.faults.transfer_failures > 0:
            self.faults.transfer_failures -= 1
            raise TransientError("the transfer failed (scripted)")

    def _visible(self, path: str) -> bool:
        self._purge()
        return path in self.files or path in self.folders

    def _purge(self) -> None:
        """Finish the asynchronous deletes whose time has come."""
        if self.deleting:
            now = self.clock.time()
            self._remove([p for p, gone in self.deleting.items() if now >= gone])

    def _remove(self, paths: list[str]) -> None:
        for p in paths:
            self.files.pop(p, None)
            self.folders.discard(p)
            self.deleting.pop(p, None)

    def _tick(self) -> None:
        """Advance the simulated executions to the clock's time."""
        now = self.clock.time()
        for e in self.executions.values():
            if e.label == "Running" and now >= e.started + e.duration:
                e.label = "ExecutionFailed" if e.fails else "Finished"
                if not e.fails:
                    self._write_results(e)

    def _write_results(self, e: _Execution) -> None:
        stamp = f"{e.id}-{int(e.started)}"
        folder = f"{e.results_location.rstrip('/')}/{stamp}"
        body = json.dumps({"execution": e.name, "inputs": e.inputs}, sort_keys=True).encode()
        data = (body * (self.output_size // max(1, len(body)) + 1))[: self.output_size]
        path = f"{folder}/result.txt"
        for p in [PurePosixPath(folder), *PurePosixPath(folder).parents]:
            self.folders.add(str(p))
        self.files[path] = data
        e.results.append(path)

    def _known(self, execution_id: str) -> _Execution:
        e = self.executions.get(execution_id)
        if e is None or e.deleted:
            raise NotFoundError(f"execution {execution_id} does not exist on {self._server}")
        return e

    def _info(self, e: _Execution) -> ExecutionInfo:
        label = e.forced or e.label
        status = carmin.classify(label)
        job = {"status": "COMPLETED" if label == "Finished" else
               "ERROR" if status.ended else "RUNNING"}
        return ExecutionInfo(e.id, e.name, status, {"1": job})


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _number(value: Any, default: float) -> float:
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
