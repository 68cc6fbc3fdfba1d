"""Helpers for tests that run the agent against the local server (plain functions, no fixtures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keyring.backend
import keyring.errors
import pytest
import yaml

from agent import dataset as dataset_mod
from agent.backend import open_backend
from agent.backend.memory import MemoryBackend
from agent.journal import Journal
from agent.pacer import ServerBudget
from agent.runner import Runner, admit

REPO = Path(__file__).resolve().parents[1]


def write_dataset(
    folder: Path, files: dict[str, bytes | str], job: dict[str, Any] | None = None
) -> Path:
    """Create a dataset folder with ``files`` and, if given, its own ``job.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
    if job is not None:
        (folder / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    return folder


def write(path: Path, text: str | bytes = "x") -> Path:
    """Write a file (and its folders); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def agent_env(api_key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIP_")}
    env["VIP_API_KEY"] = api_key
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_agent(
    *args: str, api_key: str, cwd: Path, timeout: float = 90, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``vip-agent ARGS`` as a real process (so SIGKILL tests are real)."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=cwd,
        env=agent_env(api_key, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


@contextmanager
def watch_process(
    args: Sequence[str], *, api_key: str, cwd: Path, log: Path,
    ready: str | Callable[[], Any] = " ready", timeout: float = 60, what: str = "the service ready",
    append: bool = False, alive: bool = True, stop_timeout: float = 15,
) -> Iterator[subprocess.Popen[str]]:
    """``vip-agent watch ARGS`` as a real process, its stderr in ``log``; stopped with SIGTERM.

    Entered once ``ready`` (a text in the log, or a predicate) holds or the process ended;
    with ``alive`` it must still run then (the log is the failure message).
    """
    check = ready if callable(ready) else (lambda: ready in log.read_text())
    with log.open("a" if append else "w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "watch", *args], env=agent_env(api_key),
            stdout=subprocess.DEVNULL, stderr=log_fh, text=True, cwd=cwd,
        )
        try:
            wait_for(lambda: check() or proc.poll() is not None, timeout=timeout, what=what)
            if alive:
                assert proc.poll() is None, log.read_text()
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def tmpfs(folder: Path, options: str, unavailable: str) -> Iterator[Path]:
    """A real tmpfs mounted on ``folder`` with ``options`` (needs root and mount rights: the
    test is skipped with ``unavailable`` otherwise); unmounted afterwards."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(unavailable)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative POSIX path -> content)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A real keyring backend keeping entries in a dict (no file, no daemon)."""

    priority = 0.01  # never chosen automatically over a real one

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("no such entry")


# -- the state machine: one setup and one driver for every runner test ---------------------
@dataclass
class Started:
    """A dataset admitted to a fresh journal with a runner over one platform."""

    journal: Journal
    dataset_id: int
    runner: Runner
    #: the platform: an ``agent.backend`` backend (``VipBackend`` or ``MemoryBackend``)
    backend: Any

    @property
    def client(self) -> Any:
        """The ``VipClient`` of a VIP backend (tests that list the server with it)."""
        return self.backend.client


def start_runner(
    tmp_path: Path,
    dataset: Path,
    platform: Any,
    *,
    key: str | None = None,
    client_options: dict[str, Any] | None = None,
    name: str | None = None,
    output_root: Path | None = None,
    template: Path | None = None,
    options: dict[str, Any] | None = None,
    fingerprint: str | None = None,
    journal: Journal | None = None,
    **runner_options: Any,
) -> Started:
    """Admit ``dataset`` and build a :class:`agent.runner.Runner` for it.

    ``platform``: a ``MemoryBackend`` (the runner then runs on its clock), a ``LocalVip``
    (its URL and key), or a URL (a proxy in front of one; give ``key``). The VIP backend is
    built with :func:`agent.backend.open_backend`, as the agent builds it.
    """
    journal = journal or Journal.in_state_dir(tmp_path / "state")
    if isinstance(platform, MemoryBackend):
        backend: Any = platform
        server = platform.server
        runner_options.setdefault("clock", platform.clock.time)
        # the server's launch backoff on the same clock: a 15 s wait takes no real time
        budget = ServerBudget(server, clock=platform.clock.time)
        runner_options.setdefault("budget_for", lambda _server: budget)
    else:
        url = platform if isinstance(platform, str) else platform.url
        backend = open_backend(url, key or platform.api_key, **(client_options or {}))
        server = url
    if template is None and (dataset.parent / "job.yaml").is_file():
        template = dataset.parent / "job.yaml"
    dataset_id = admit(
        journal, dataset, server=server, output_root=output_root or tmp_path / "outputs",
        fingerprint=fingerprint or dataset_mod.scan(dataset).fingerprint,
        name=name or dataset.name, template=template, options=options,
    )
    runner = Runner(journal, lambda _url: backend, **runner_options)
    return Started(journal, dataset_id, runner, backend)


def drive(
    runner: Runner, dataset_id: int, *, until: Callable[[Any], bool] | None = None,
    timeout: float = 60.0, max_wait: float = 0.2, sleep: Callable[[float], Any] | None = None,
) -> Any:
    """Step a dataset until it is final or ``until(outcome)``; returns the last outcome.

    Between steps it waits what the runner asked, at most ``max_wait`` real seconds; with
    ``sleep`` (a memory backend's ``clock.advance``) it moves that clock by the whole wait
    instead. Fails after ``timeout`` real seconds: the one deadline loop of the runner tests.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        outcome = runner.step(dataset_id)
        if outcome.final or (until is not None and until(outcome)):
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"dataset still at {outcome.stage} after {timeout} s")
        if sleep is not None:
            sleep(outcome.retry_after or 0.0)
        else:
            pause.wait(min(outcome.retry_after or 0.0, max_wait))
