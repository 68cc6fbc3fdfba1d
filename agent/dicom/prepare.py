"""De-identification ahead of time: objects are de-identified while the study is still
arriving, so that a complete study is handed over at once.

Each spooled object of a route with ``deidentify: basic`` is sent to the de-identification
worker (:mod:`agent.dicom.prepworker`, a child process at the lowest CPU priority) with its
study's seed -- the same pseudonyms, date shift and UIDs as at hand-over time: dicognito is
deterministic for a seed -- and prepared into ``<spool>/prepared/``, scanned there for the
object's own identifying values. It is only a cache: the hand-over waits for the objects
still in the worker's queue as long as the worker makes progress, de-identifies the rest
itself, and scans again whatever the worker's scan did not cover (values of the study
seen in other objects). The cache is emptied at start and per study once handed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.dicom import deid
from agent.dicom.index import DicomIndex
from agent.dicom.spool import study_key

log = logging.getLogger("vip_agent.dicom")
#: a worker that died is started again at most this often (seconds)
RESTART_EVERY = 10.0
#: worker processes (at most one per CPU)
WORKERS = 2
#: seconds one object may take in a worker before the worker is stopped (~4 ms for an MR image)
REQUEST_TIMEOUT = 120.0
#: the environment the worker gets: nothing else (no API key, no proxy credentials)
_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "HOME", "SYSTEMROOT")


@dataclass(frozen=True)
class Prepared:
    """One object de-identified ahead of time."""

    path: Path
    #: the original's identifying values (for the final scan)
    identity: dict[str, str]
    secondary_capture: bool
    #: the identity the worker scanned the copy for, and what it found (None: clean)
    scanned_for: deid.Identity
    hit: str | None
    sha256: str


def _worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    # the same agent package as this process, installed or not
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class _Worker:
    """One worker process and the conversation with it (one request at a time)."""

    #: the worker's command line (tests put a stand-in here)
    command: tuple[str, ...] = (sys.executable, "-m", "agent.dicom.prepworker")

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.started_at = 0.0
        self.next_id = 0

    def alive(self) -> subprocess.Popen[str] | None:
        """The running process, started (again) if needed; None while a dead one waits to restart."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        if self.started_at and time.monotonic() - self.started_at < RESTART_EVERY:
            return None
        self.started_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(list(self.command), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         env=_worker_env(), cwd=self.cwd)  # fmt: skip
        except OSError as err:
            log.warning("cannot start the de-identification worker (%s); de-identifying at hand-over", err)
            self.proc = None
        return self.proc

    def ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        proc = self.alive()
        if proc is None:
            return None
        stdin: IO[str] | None = proc.stdin
        stdout: IO[str] | None = proc.stdout
        assert stdin is not None and stdout is not None
        self.next_id += 1
        request = {**request, "id": self.next_id}
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
            # one request, one answer line: nothing is buffered before it, so select() on the pipe
            # says when it comes; a worker stuck on one object is stopped, not waited for forever
            answered = select.select([stdout], [], [], REQUEST_TIMEOUT)[0]
            line = stdout.readline() if answered else None
        except (OSError, ValueError):
            line = ""
        if line is None:
            log.warning("a de-identification worker took more than %g s on one object: stopped; that "
                        "object is de-identified at hand-over", REQUEST_TIMEOUT)  # fmt: skip
            self.stop()
            return None
        if not line:
            log.warning("a de-identification worker stopped (exit code %s); de-identifying at hand-over "
                        "until it is started again", proc.poll())  # fmt: skip
            self.stop()
            return None
        answer: dict[str, Any] = json.loads(line)
        return answer if answer.get("id") == request["id"] else None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


class Preparer:
    """Feeds the workers (``submit`` from the receiving threads) and keeps their results."""

    def __init__(self, root: Path, index: DicomIndex) -> None:
        self.root = Path(root)
        self.index = index
        self._stopping = threading.Event()
        self._queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
        self._ready: dict[str, Prepared] = {}
        #: submitted and not prepared yet (the hand-over waits for these)
        self._outstanding: set[str] = set()
        #: studies being handed over: their objects are no longer sent to the worker
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        #: one feeding thread per worker process: two use both cores of a small PC once the
        #: study has arrived (while it arrives they only get what the receiving leaves)
        self._workers = [_Worker(self.root) for _ in range(max(1, min(WORKERS, os.cpu_count() or 1)))]
        self._threads: list[threading.Thread] = []
        #: study -> (secret, pseudonym, its folder here)
        self._seeds: dict[str, tuple[str, str, Path]] = {}
        #: hand-overs served from the cache (for tests and the curious)
        self.hits = 0

    def start(self) -> None:
        self._stopping.clear()
        shutil.rmtree(self.root, ignore_errors=True)  # what a previous run left: not trusted
        self.root.mkdir(parents=True, exist_ok=True)
        # started now, not at the first object: a worker takes ~0.5 s to start
        self._threads = [threading.Thread(target=self._run, args=(w,), name=f"vip-agent-dicom-prepare-{i}",
                                          daemon=True) for i, w in enumerate(self._workers)]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        for worker in self._workers:  # first: a feeding thread waiting for an answer sees the pipe close
            worker.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        for worker in self._workers:  # one a feeding thread started meanwhile
            worker.stop()
        with self._done:
            self._outstanding.clear()
            self._done.notify_all()

    def submit(self, study_uid: str, sop_uid: str, path: str) -> None:
        with self._lock:
            self._outstanding.add(sop_uid)
        self._queue.put((study_uid, sop_uid, path))

    def get(self, sop_uid: str) -> Prepared | None:
        with self._lock:
            found = self._ready.get(sop_uid)
            self.hits += found is not None
            return found

    def stats(self) -> dict[str, int]:
        """For ``dicom status``: workers running, objects waiting for them, copies ready."""
        with self._lock:
            waiting, ready = len(self._outstanding), len(self._ready)
        alive = sum(w.proc is not None and w.proc.poll() is None for w in self._workers)
        return {"workers": alive, "waiting": waiting, "prepared": ready}

    def settle(self, sop_uids: set[str], patience: float = 2.0) -> int:
        """Wait while any of ``sop_uids`` is still being prepared, as long as the worker
        finishes something at least every ``patience`` seconds; how many are left unprepared."""
        with self._done:
            while left := sop_uids & self._outstanding:
                if not self._done.wait(patience):
                    return len(left)
            return 0

    def hold(self, study_uid: str) -> None:
        """The study's hand-over starts: stop preparing its objects."""
        with self._lock:
            self._held.add(study_uid)

    def release(self, study_uid: str) -> None:
        """The hand-over is over (handed or refused): objects arriving later are prepared again."""
        with self._lock:
            self._held.discard(study_uid)

    def forget(self, study_uid: str, sop_uids: set[str]) -> None:
        """A study was handed over: its prepared copies are no longer needed."""
        with self._lock:
            gone = [p for p in (self._ready.pop(sop, None) for sop in sop_uids) if p is not None]
        self._seeds.pop(study_uid, None)
        for p in gone:  # one by one: objects that arrived during the hand-over keep theirs
            with contextlib.suppress(OSError):
                p.path.unlink()

    # -- the feeding thread --------------------------------------------------------------
    def _run(self, worker: _Worker) -> None:
        worker.alive()
        while (item := self._queue.get()) is not None:
            study_uid, sop_uid, path = item
            try:
                if not self._stopping.is_set():
                    self._prepare(worker, study_uid, sop_uid, path)
            except Exception as err:  # the hand-over will de-identify it itself
                log.debug("could not prepare %s ahead of time: %s", sop_uid, err)
            finally:
                with self._done:
                    self._outstanding.discard(sop_uid)
                    self._done.notify_all()

    def _prepare(self, worker: _Worker, study_uid: str, sop_uid: str, path: str) -> None:
        with self._lock:
            if study_uid in self._held:
                return
        seed = self._seeds.get(study_uid)
        if seed is None:  # looked up once per study (this thread shares the interpreter with the receiving)
            study = self.index.study(study_uid)
            if study is None:
                return
            folder = self.root / study_key(study_uid)
            folder.mkdir(parents=True, exist_ok=True)
            seed = self._seeds[study_uid] = (study.secret, study.pseudonym, folder)
        secret, pseudonym, folder = seed
        target = folder / f"{uuid.uuid4().hex}.dcm"
        answer = worker.ask({"secret": secret, "pseudonym": pseudonym, "src": path, "dst": str(target)})
        if answer is None or "error" in answer:
            with contextlib.suppress(OSError):
                target.unlink()
            if answer is not None:
                log.debug("could not prepare %s ahead of time: %s", sop_uid, answer["error"])
            return
        identity = {str(k): str(v) for k, v in answer["identity"].items()}
        prepared = Prepared(target, identity, bool(answer["secondary"]), deid.identity_of([identity]),
                            answer.get("hit"), str(answer["sha256"]))  # fmt: skip
        with self._lock:
            self._ready[sop_uid] = prepared
