"""Shared helpers of the benchmarks: a local VIP server in a subprocess, test
files, and child processes measured with ``wait4`` (exact peak RSS and CPU).

The server always runs in its own process so its CPU and memory never count
towards the measured client. API keys travel through stdin, a 0600 header file
or a 0600 systemd-style credential folder: never argv, never the environment.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable
MB = 1_000_000
MIB = 1 << 20
SAMPLE_S = 0.002


def child_env(**extra: str) -> dict[str, str]:
    """The environment for every child: ours minus anything that looks secret."""
    from agent.credentials import scrub_env

    env = scrub_env()
    env.update(extra)
    return env


@contextmanager
def workdir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A private temp folder (0700) under ``parent`` (the system temp dir), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"vip-agent-bench-{prefix}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def server_storage(prefix: str, need: int) -> Iterator[Path]:
    """A private folder for a local server's storage: in memory (``/dev/shm``) when it has
    ``need`` bytes free, else under the system temp dir; removed afterwards.

    A server writing gigabytes to this machine's disk makes every transfer wait on the disk's
    moods (the same upload ran at 300 to 1,200 MB/s), and that disk is not the client's: on
    VIP it is the grid's storage. The client's own files stay on the real disk.
    """
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp folder (0700) inside it
    try:
        in_memory = shm.is_dir() and shutil.disk_usage(shm).free > need
    except OSError:
        in_memory = False
    with workdir(prefix, shm if in_memory else None) as path:
        yield path


def make_file(path: Path, size: int, seed: int = 1) -> Path:
    """A file of ``size`` pseudo-random bytes (an 8 MiB random block repeated)."""
    block = random.Random(seed).randbytes(8 * MIB)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left > 0:
            n = min(left, len(block))
            out.write(block[:n] if n < len(block) else block)
            left -= n
    return path


def private_file(path: Path, text: str) -> Path:
    """Write ``text`` to a new file readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


class LocalServer:
    """``vip-agent local-server`` in a subprocess; the key is the generated one.

    ``profile`` is the server's (``ideal`` or ``production``, docs/localvip.md; ``faults``
    apply over it). The server writes its request statistics when it stops: :meth:`stats`.
    """

    def __init__(self, root: Path, *, max_download: int = 15_000_000, max_running: int = 4,
                 faults: str = "", profile: str = "ideal") -> None:
        self.root = root
        self.max_download = max_download
        self.max_running = max_running
        self.faults = faults
        self.profile = profile
        self.stats_path = root.parent / f"{root.name}.stats.json"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self._key = ""

    @property
    def api_key(self) -> str:
        return self._key

    def __repr__(self) -> str:
        return f"LocalServer(url={self.url!r})"

    def start(self, timeout: float = 30.0) -> LocalServer:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "agent", "local-server", "--root", str(self.root), "--port", "0",
             "--max-download", str(self.max_download), "--max-running", str(self.max_running),
             "--profile", self.profile, "--stats", str(self.stats_path),
             *(["--faults", self.faults] if self.faults else [])],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=REPO,
            env=child_env(),
        )
        lines: list[str] = []
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            for _ in range(2):
                lines.append(stdout.readline().strip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if len(lines) < 2 or not lines[0].startswith("http"):
            self.stop()
            raise RuntimeError("the local VIP server did not start (no URL and key on stdout)")
        self.url, self._key = lines[0], lines[1]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def stats(self) -> dict[str, Any]:
        """The server's request statistics, once it has stopped ({} before)."""
        try:
            data: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Measured:
    """One child process, measured from spawn to reaping."""

    argv0: str
    returncode: int
    wall_s: float
    peak_rss_mib: float  # highest VmHWM sampled from /proc while the child ran
    ru_maxrss_mib: float  # from wait4: an upper bound (see run_measured)
    cpu_user_s: float
    cpu_sys_s: float
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    def json_out(self) -> dict[str, Any]:
        """The last stdout line, parsed (workers print a JSON summary there)."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        if not lines:
            return {}
        try:
            value = json.loads(lines[-1])
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("stdout")
        data["stderr_tail"] = self.stderr[-2000:]
        return data


def run_measured(
    argv: Sequence[str], *, stdin_text: str | None = None, cwd: Path | None = None,
    env: dict[str, str] | None = None, timeout: float = 600.0,
    on_start: Any = None,
) -> Measured:
    """Run ``argv``; sample its peak RSS while it runs and reap it with ``wait4``.

    Peak RSS is the kernel's high-water mark ``VmHWM`` of the child's own address
    space, read from /proc every :data:`SAMPLE_S` seconds (it only grows, so only
    growth in the last few ms before exit can be missed). ``ru_maxrss`` from
    ``wait4`` is kept as an upper bound only: Linux seeds it at ``exec`` with the
    RSS of the address space being replaced, i.e. this (spawning) process's.
    ``on_start(pid, reaper)`` runs in the calling thread while the child runs;
    stdout/stderr go to temp files, so a chatty child never blocks.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            stdout=out, stderr=err, text=True, cwd=cwd, env=env if env is not None else child_env(),
        )
        if stdin_text is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin_text)
            proc.stdin.close()
        result: dict[str, Any] = {}

        def reap() -> None:
            _pid, status, usage = os.wait4(proc.pid, 0)
            result["end"] = time.perf_counter()
            result["status"] = status
            result["usage"] = usage

        reaper = threading.Thread(target=reap, daemon=True)
        reaper.start()
        hwm = [0]

        def sample() -> None:
            while reaper.is_alive():
                value = proc_status_kib(proc.pid, "VmHWM")
                if value is not None and value > hwm[0]:
                    hwm[0] = value
                time.sleep(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if on_start is not None:
            on_start(proc.pid, reaper)
        reaper.join(timeout)
        if reaper.is_alive():
            proc.kill()
            reaper.join(30)
        sampler.join(5)
        proc.returncode = os.waitstatus_to_exitcode(result["status"])
        usage = result["usage"]
        out.seek(0)
        err.seek(0)
        return Measured(
            argv0=Path(argv[0]).name, returncode=proc.returncode,
            wall_s=result["end"] - t0, peak_rss_mib=hwm[0] / 1024, ru_maxrss_mib=usage.ru_maxrss / 1024,
            cpu_user_s=usage.ru_utime, cpu_sys_s=usage.ru_stime,
            stdout=out.read(), stderr=err.read(),
        )


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        stat = handle.read()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or None if gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as handle:
            mem_kib = int(next(ln.split()[1] for ln in handle if ln.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("requests", "vip-client", "watchdog", "vip-agent"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    curl = shutil.which("curl")
    if curl:
        first = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        versions["curl"] = first.split()[1] if first else "?"
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kib / MIB, 1),
        "kernel": platform.release(), "versions": versions,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # other work on the machine skews the numbers: say how busy it was
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def window_stats(stats: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """What the server saw between epoch seconds ``start`` and ``end`` (one client's run):
    API requests per second (transfers, i.e. uploads and downloads, apart: the agent paces
    those by slots, not by rate), their peak over any 10 s, and the production events."""
    lo, hi = int(start), int(end)
    per_second = {int(k): v for k, v in stats.get("per_second", {}).items() if lo <= int(k) <= hi}
    kinds: dict[str, int] = {}
    transfers: dict[int, int] = {}
    for sec, kind, n in stats.get("timeline", []):
        if lo <= sec <= hi:
            kinds[kind] = kinds.get(kind, 0) + n
            if kind in ("upload", "content"):
                transfers[sec] = transfers.get(sec, 0) + n
    api = {sec: per_second.get(sec, 0) - transfers.get(sec, 0) for sec in range(lo, hi + 1)}
    span = max(1, hi - lo + 1)
    peak10 = max((sum(api.get(s, 0) for s in range(t, t + 10)) / 10 for t in range(lo, max(lo, hi - 9) + 1)),
                 default=0.0)
    return {
        "seconds": span, "requests": sum(per_second.values()), "api_requests": sum(api.values()),
        "api_per_s_mean": sum(api.values()) / span, "api_per_s_peak_10s": peak10,
        "api_per_s_peak_1s": max(api.values(), default=0),
        "transfer_wait_timeouts": kinds.get("transfer wait timeout", 0),
        "late_landings": kinds.get("late landing", 0), "launch_refusals": kinds.get("launch refused", 0),
    }


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def say(*parts: object, stream: IO[str] = sys.stderr) -> None:
    print(*parts, file=stream, flush=True)
