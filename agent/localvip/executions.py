"""Executions: VIP's launch validation, job expansion and a local job engine.

Each job runs ``/bin/sh -c <command line>`` in its own work dir under
``<root>/.localvip/work/<execution>/<job>`` (never in user storage), with File
inputs hard-linked (or copied) there under their base names and a minimal
environment (PATH, HOME, LANG, PYTHON, DESCRIPTOR_DIR; nothing else from the
server's environment, so no API key or secret leaks). Declared ``output-files``
are then copied to ``<results-directory>/<timestamp>/<path-template>``.

Jobs: list values (``@@``-joined, as VIP does with JSON arrays) are crossed
(cartesian product), except inputs named in ``custom["vip:dot"]`` which are
zipped, and Boutiques ``"list": true`` inputs, whose values all go to one job
(a local choice; VIP's engine support for them is patchy). At most
``MAX_JOBS_PER_WORKFLOW`` jobs; more makes the execution fail, as an engine-side
error would.

Restart policy: jobs that were queued or running when the server stopped are
marked ``ERROR`` (exit message says why) and their execution is finalised
(``Finished`` if another job succeeded, else ``ExecutionFailed``). Nothing is re-run.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.localvip.codes import EXEC_NAME_VALID_CHARS, ApiFailure, coded
from agent.localvip.faults import JOB_STATUSES
from agent.localvip.pipelines import Pipeline, build_command, output_paths
from agent.localvip.state import ExecRow, State
from agent.localvip.storage import Storage

log = logging.getLogger("agent.localvip")

INPUT_VALID = re.compile(r"[0-9.,A-Za-z\-+@/_(): \[\]?&=]+")
NAME_VALID = re.compile(r"[0-9A-Za-z\-_ ]+")
MAX_JOBS_PER_WORKFLOW = 1000
ACTIVE_JOB = ("QUEUED", "RUNNING")


def java_str(value: Any) -> str:
    """Java ``toString`` of a JSON scalar as VIP applies it to input values."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={java_str(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    return str(value)


class Engine:
    """Creates executions and runs their jobs as local subprocesses."""

    def __init__(
        self,
        state: State,
        storage: Storage,
        pipelines: Callable[[], dict[str, Pipeline]],
        work_root: Path,
        *,
        max_running: int,
        max_platform_running: int = 35,
        max_parallel_jobs: int = 4,
        kill_grace: float = 2.0,
    ) -> None:
        self.state = state
        self.storage = storage
        self.pipelines = pipelines
        self.work_root = work_root
        self.max_running = max_running
        self.max_platform_running = max_platform_running
        self.kill_grace = kill_grace
        self._slots = threading.BoundedSemaphore(max(1, max_parallel_jobs))
        self._launch_lock = threading.Lock()
        self._finish_lock = threading.Lock()
        self._procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        self._procs_lock = threading.Lock()
        self._killed: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._recover()

    # -- lifecycle -------------------------------------------------------------
    def _recover(self) -> None:
        for exec_id in self.state.running_ids():
            for job in self.state.jobs(exec_id):
                if job.status in ACTIVE_JOB:
                    self.state.set_job(
                        exec_id, job.job, "ERROR", -1, "interrupted: the localvip server stopped"
                    )
            self._finalise(exec_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill every job; their executions end as on restart (jobs ERROR)."""
        self._stopping.set()
        with self._procs_lock:
            procs = list(self._procs.values())
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))

    # -- create ----------------------------------------------------------------
    def create(
        self,
        user: str,
        folder: str,
        body: Any,
        *,
        capacity_fault: bool = False,
        legacy_dates: bool = False,
        refusal: Callable[[], ApiFailure | None] | None = None,
    ) -> str:
        """Validate a POST /executions body in VIP's order; start its jobs.

        ``refusal`` is asked, once the launch passed every check, whether the engine
        refuses it (an ApiFailure to raise, or None).
        """
        if not isinstance(body, dict):
            raise ApiFailure(8000, "An error has been encountered on the VIP API", suffix=False)
        for key in ("name", "pipelineIdentifier", "inputValues"):
            if body.get(key) is None:
                raise ApiFailure(8009, f"Input field '{key}' is not valid. Cause : must not be null")
        raw_inputs = body["inputValues"]
        name, ident = body["name"], body["pipelineIdentifier"]
        if not isinstance(raw_inputs, dict) or isinstance(name, (dict, list)) or isinstance(ident, (dict, list)):
            raise ApiFailure(8000, "An error has been encountered on the VIP API", suffix=False)
        name, ident = java_str(name), java_str(ident)
        inputs: dict[str, list[str]] = {}
        for key, value in raw_inputs.items():
            if value is None:
                # VIP dereferences it: NullPointerException → 500
                raise RuntimeError(f"null value for input {key!r}")
            items = [java_str(v) for v in value] if isinstance(value, list) else [java_str(value)]
            for item in items or [""]:
                if not INPUT_VALID.fullmatch(item):
                    raise ApiFailure(
                        8009, f"Input field '{key}' is not valid. Cause : invalid characters in value '{item[:200]}'"
                    )
            inputs[str(key)] = "@@".join(items).split("@@")
        if body.get("resultsLocation") is not None:
            inputs["results-directory"] = [java_str(body["resultsLocation"])]
        if not NAME_VALID.fullmatch(name):
            raise coded(8019, f"Authorized characters are {EXEC_NAME_VALID_CHARS}")
        pipeline = self.resolve_pipeline(ident, user)
        for spec in pipeline.descriptor.get("inputs", []):
            pid = spec.get("id")
            if pid in inputs or pid == "results-directory":
                continue
            default = spec.get("default-value")
            if default is not None:
                inputs[pid] = [java_str(default)]
            elif not spec.get("optional", False):
                raise coded(8018, pid)
        inputs.setdefault("results-directory", ["/vip/Home"])
        with self._launch_lock:  # WorkflowBusiness.launch is synchronized
            if self.state.running() >= self.max_platform_running:
                raise coded(2000)
            mine = self.state.running(user)
            if capacity_fault or mine >= self.max_running:
                raise coded(2001, mine)
            # ACL on file inputs and the results directory (missing files fail later)
            for pid, values in inputs.items():
                if pid == "results-directory" or pipeline.is_file_input(pid):
                    for v in values:
                        if v.startswith("/vip"):
                            try:
                                res = self.storage.resolve(folder, v)
                            except ApiFailure:
                                raise ApiFailure(8000, f"Permission denied on '{v}'") from None
                            if pid == "results-directory" and not v.startswith("/vip/Home"):
                                raise ApiFailure(8000, f"Permission denied on '{res.vip_path}'")
                        elif pid == "results-directory":
                            raise ApiFailure(8000, f"Invalid results directory '{v}'")
            refused = refusal() if refusal is not None else None
            if refused is not None:
                raise refused
            exec_id = self._new_id()
            results_dir = self.storage.resolve(folder, inputs["results-directory"][0]).vip_path
            suffix = pipeline.custom.get("vip:resultsDirectorySuffix")
            if suffix is None:
                suffix = time.strftime("%d-%m-%Y_%H:%M:%S" if legacy_dates else "%Y-%m-%d_%H%M%S")
            stamp_dir = results_dir + ("/" + str(suffix).strip("/") if suffix else "")
            jobs = expand_jobs(pipeline, inputs)
            row = ExecRow(
                exec_id, user, name, ident, "Running", inputs, results_dir, stamp_dir,
                int(time.time() * 1000), False,
            )
            self.state.add_execution(row, jobs or [])
        if not jobs:
            log.info("localvip: %s has no valid job combination; failing it", exec_id)
            self._finalise(exec_id)
            return exec_id
        for n in range(len(jobs)):
            t = threading.Thread(
                target=self._run_job, args=(exec_id, n, folder, pipeline), name=f"localvip-{exec_id}-{n}",
                daemon=True,
            )
            self._threads.append(t)
            t.start()
        self._threads = [t for t in self._threads if t.is_alive()]
        return exec_id

    def resolve_pipeline(self, ident: str, user: str) -> Pipeline:
        if "/" not in ident:
            raise coded(8005, ident)
        pipeline = self.pipelines().get(ident)
        if pipeline is None:
            raise coded(8007, ident)
        if not pipeline.allowed(user):
            raise ApiFailure(8008, f"Not allowed to access pipeline {ident}")
        return pipeline

    def _new_id(self) -> str:
        alphabet = string.ascii_letters + string.digits
        while True:
            ident = "workflow-" + "".join(secrets.choice(alphabet) for _ in range(6))
            if not self.state.exists_id(ident):
                return ident

    # -- views -------------------------------------------------------------------
    def owned(self, exec_id: str, user: str) -> ExecRow:
        row = self.state.execution(exec_id)
        if row is None:
            raise ApiFailure(8000, f"Execution '{exec_id[:100]}' not found")
        if row.user != user:
            raise ApiFailure(8000, "Permission denied")
        if row.deleted:
            raise coded(8015, exec_id)
        return row

    def view(self, row: ExecRow, *, summary: bool = False, blip: bool = False,
             statuses: float = 0.0) -> dict[str, Any]:
        """VIP's execution JSON; ``statuses``: share of jobs shown with GASW's other statuses."""
        status = "Unknown" if blip and row.status in ("Running", "Killed") else row.status
        if summary:
            inputs: dict[str, Any] = {}
            returned: dict[str, list[str]] | None = {}
            jobs: dict[str, Any] = {}
        else:
            inputs = {k: v[-1] if v else "" for k, v in row.inputs.items()}
            outs = self.state.outputs(row.id)
            if outs:
                returned = {}
                for out_id, path in outs:
                    returned.setdefault(out_id, []).append(path)
            else:
                returned = {} if row.status in ("Finished", "Killed") else None
            jobs = {
                str(j.job): {
                    "status": gasw_status(row.id, j.job, j.status, statuses),
                    "exitCode": j.exit_code, "exitMessage": j.exit_message,
                }
                for j in self.state.jobs(row.id)
            }
        return {
            "identifier": row.id,
            "name": row.name,
            "pipelineIdentifier": row.pipeline,
            "timeout": 0,
            "status": status,
            "inputValues": inputs,
            "returnedFiles": returned,
            "studyIdentifier": None,
            "errorCode": None,
            "startDate": row.start_ms,
            "endDate": None,
            "resultsLocation": None,
            "jobs": jobs,
        }

    def log_path(self, exec_id: str, job: int, stream: str) -> Path:
        return self.work_root / exec_id / stream / f"{job}.sh.app.{stream}"

    # -- actions -----------------------------------------------------------------
    def kill(self, row: ExecRow) -> None:
        """Soft kill now (SIGTERM to the job's process group), hard kill after a grace."""
        if not self.state.set_status(row.id, "Killed", only_if="Running"):
            return
        self._killed.add(row.id)
        for job in self.state.jobs(row.id):
            if job.status == "QUEUED":
                self.state.set_job(row.id, job.job, "KILL", 0, "killed before start")
        with self._procs_lock:
            procs = [p for (e, _), p in self._procs.items() if e == row.id]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
            timer = threading.Timer(self.kill_grace, _signal_group, args=(proc, signal.SIGKILL))
            timer.daemon = True
            timer.start()

    def delete(self, row: ExecRow, folder: str, delete_files: bool, delay: float) -> None:
        if row.status not in ("Finished", "Killed"):
            raise ApiFailure(8000, f"Execution {row.id} cannot be deleted while {row.status}")
        self.state.mark_deleted(row.id)
        if delete_files:
            for _out_id, path in self.state.outputs(row.id):
                try:
                    self.storage.delete(self.storage.resolve(folder, path), delay)
                except ApiFailure:
                    pass  # already gone
        shutil.rmtree(self.work_root / row.id, ignore_errors=True)

    # -- the job runner ------------------------------------------------------------
    def _run_job(self, exec_id: str, n: int, folder: str, pipeline: Pipeline) -> None:
        try:
            self._run_job_inner(exec_id, n, folder, pipeline)
        except Exception as err:  # never let a job thread die silently
            log.exception("localvip: job %s/%d crashed", exec_id, n)
            if not self._stopping.is_set():
                self.state.set_job(exec_id, n, "ERROR", -1, f"localvip internal error: {err}")
        finally:
            if not self._stopping.is_set():
                self._finalise(exec_id)

    def _run_job_inner(self, exec_id: str, n: int, folder: str, pipeline: Pipeline) -> None:
        with self._slots:
            if exec_id in self._killed or self._stopping.is_set():
                return
            job = next(j for j in self.state.jobs(exec_id) if j.job == n)
            row = self.state.execution(exec_id)
            assert row is not None
            work = self.work_root / exec_id / str(n)
            out_log, err_log = self.log_path(exec_id, n, "out"), self.log_path(exec_id, n, "err")
            for p in (work, out_log.parent, err_log.parent):
                p.mkdir(parents=True, exist_ok=True)
            self.state.set_job(exec_id, n, "RUNNING")
            problem = self._stage(folder, pipeline, job.inputs, work)
            if problem:
                err_log.write_text(f"localvip: {problem}\n", encoding="utf-8")
                out_log.touch()
                self.state.set_job(exec_id, n, "ERROR", 1, problem)
                return
            cmd = build_command(pipeline, job.inputs)
            env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "HOME": os.environ.get("HOME", str(work)),
                "LANG": os.environ.get("LANG", "C.UTF-8"),
                "PYTHON": sys.executable,
                "PYTHONDONTWRITEBYTECODE": "1",
                "DESCRIPTOR_DIR": str(pipeline.directory),
            }
            with open(out_log, "wb") as out, open(err_log, "wb") as err:
                proc = subprocess.Popen(  # noqa: S603 - the descriptor's command line is the job
                    ["/bin/sh", "-c", cmd], cwd=work, env=env, stdout=out, stderr=err,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
                with self._procs_lock:
                    self._procs[(exec_id, n)] = proc
                if exec_id in self._killed:
                    _signal_group(proc, signal.SIGTERM)
                try:
                    code = proc.wait()
                finally:
                    with self._procs_lock:
                        self._procs.pop((exec_id, n), None)
            if self._stopping.is_set():
                return  # marked failed on the next start
            if exec_id in self._killed:
                self.state.set_job(exec_id, n, "KILL", code, "killed")
            elif code != 0:
                self.state.set_job(exec_id, n, "ERROR", code, f"application exited with code {code}")
            else:
                missing = self._collect(exec_id, n, folder, pipeline, job.inputs, work, row.stamp_dir)
                if missing:
                    with open(err_log, "a", encoding="utf-8") as f:
                        f.write(f"localvip: {missing}\n")
                    self.state.set_job(exec_id, n, "ERROR", 0, missing)
                else:
                    self.state.set_job(exec_id, n, "COMPLETED", 0, "completed")
            shutil.rmtree(work, ignore_errors=True)

    def _stage(self, folder: str, pipeline: Pipeline, inputs: dict[str, list[str]], work: Path) -> str | None:
        for pid, values in inputs.items():
            if not pipeline.is_file_input(pid):
                continue
            for value in values:
                try:
                    res = self.storage.resolve(folder, value)
                except ApiFailure:
                    return f"input file {value} is not accessible"
                if res.local is None or not res.local.exists():
                    return f"input file {value} does not exist"
                dest = work / res.local.name
                if dest.exists():
                    continue
                if res.local.is_dir():
                    shutil.copytree(res.local, dest)
                    continue
                try:
                    os.link(res.local, dest)
                except OSError:
                    shutil.copy2(res.local, dest)
        return None

    def _collect(
        self, exec_id: str, n: int, folder: str, pipeline: Pipeline, inputs: dict[str, list[str]],
        work: Path, stamp_dir: str,
    ) -> str | None:
        """Copy declared outputs to the results folder; a missing required one fails the job."""
        stamp = self.storage.resolve(folder, stamp_dir)
        assert stamp.local is not None
        for out_id, rel, optional in output_paths(pipeline, inputs):
            src = work / rel
            if not src.exists():
                if optional:
                    continue
                return f"output file {rel} was not produced"
            dest = stamp.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                if dest.exists():
                    return f"output {stamp_dir}/{rel} already exists"
                shutil.copytree(src, dest)
            else:
                tmp = self.storage.new_tmp()
                shutil.copyfile(src, tmp)
                try:
                    self.storage.land(tmp, dest, f"{stamp_dir}/{rel}")
                except ApiFailure:
                    return f"output {stamp_dir}/{rel} already exists"
            self.state.add_output(exec_id, n, out_id, f"{stamp_dir}/{rel}")
        return None

    def _finalise(self, exec_id: str) -> None:
        """Set the execution's final status once no job is active (≥1 ok → Finished)."""
        with self._finish_lock:
            jobs = self.state.jobs(exec_id)
            if any(j.status in ACTIVE_JOB for j in jobs):
                return
            if exec_id in self._killed:
                return  # already Killed
            ok = any(j.status == "COMPLETED" for j in jobs)
            self.state.set_status(exec_id, "Finished" if ok else "ExecutionFailed", only_if="Running")


def gasw_status(exec_id: str, job: int, status: str, rate: float) -> str:
    """The status VIP shows for a job: its latest GASW task's.

    With ``rate`` > 0, that share of jobs (chosen by a hash of execution and job, so a job
    keeps its answer) reads another status of the same outcome: a completed job whose
    replica was cancelled reads ``CANCELLED_REPLICA``, a running one ``STALLED``,
    ``RESCHEDULE`` or ``REPLICATE``... (``faults.JOB_STATUSES``).
    """
    options = JOB_STATUSES.get(status)
    if rate <= 0 or not options:
        return status
    digest = hashlib.sha256(f"{exec_id}/{job}".encode()).digest()
    if int.from_bytes(digest[:4], "big") / 2**32 >= rate:
        return status
    others = options[:-1]  # the last one is the plain status
    return others[digest[4] % len(others)]


def expand_jobs(pipeline: Pipeline, inputs: dict[str, list[str]]) -> list[dict[str, list[str]]]:
    """One dict of values per job: dot inputs zipped, list inputs whole, others crossed."""
    dot = [d for d in (pipeline.custom.get("vip:dot") or []) if d in inputs]
    whole = {
        pid for pid in inputs
        if (spec := pipeline.input(pid)) is not None and spec.get("list")
    }
    axes: list[list[dict[str, list[str]]]] = []
    if dot:
        lengths = {len(inputs[d]) for d in dot}
        if len(lengths) > 1:
            return []  # the engine refuses mismatched dot lengths
        axes.append([{d: [inputs[d][i]] for d in dot} for i in range(lengths.pop())])
    total = len(axes[0]) if axes else 1
    for pid, values in inputs.items():
        if pid in dot:
            continue
        if pid in whole or len(values) <= 1:
            axes.append([{pid: values}])
        else:
            axes.append([{pid: [v]} for v in values])
        total *= len(axes[-1])
        if total > MAX_JOBS_PER_WORKFLOW:
            return []
    jobs = []
    for combo in itertools.product(*axes):
        merged: dict[str, list[str]] = {}
        for part in combo:
            merged.update(part)
        jobs.append(merged)
    return jobs


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
