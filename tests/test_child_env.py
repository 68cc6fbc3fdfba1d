"""No child of the agent ever holds the API key in its environment.

Real ``vip-agent doctor`` and ``vip-agent watch`` processes run with the key in
``VIP_API_KEY``. Two independent witnesses: stand-ins for the tools library lookups
start (``gcc``, ``ld``, ``ldconfig``... first on PATH) copy their own environment, and a
watcher reads ``/proc/<pid>/environ`` of every descendant it sees while the agent runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from agenthelpers import agent_env, wait_for, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip

TOOLS = ("gcc", "cc", "ld", "ldconfig", "objdump", "x86_64-linux-gnu-gcc")

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


def _stand_ins(folder: Path, seen: Path) -> None:
    folder.mkdir()
    seen.mkdir()
    for tool in TOOLS:
        script = folder / tool
        script.write_text(f'#!/bin/sh\ncat /proc/$$/environ > "{seen}/{tool}-$$"\nsleep 0.2\nexit 1\n')
        script.chmod(0o755)


def _children(pid: int) -> dict[int, int]:
    """pid -> parent pid of every process now."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


class Descendants:
    """Reads the environment of every descendant of ``root`` while it runs.

    A child caught between fork and exec still shows its parent's environment (the agent's
    own, which holds the key), though exec replaces it: a descendant whose command line is
    still its parent's is read again until it changes, and recorded as it is if it has not
    changed after ``FORK_GRACE`` seconds (a fork that never execs does hold the key)."""

    FORK_GRACE = 2.0

    def __init__(self, root: int) -> None:
        self.root, self.environs = root, {}  # type: ignore[var-annotated]
        self.first_seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            parents = _children(self.root)
            for pid in parents:
                p, hops = pid, 0
                while p in parents and p != self.root and hops < 50:
                    p, hops = parents[p], hops + 1
                if p == self.root and pid != self.root and pid not in self.environs:
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                        environ = Path(f"/proc/{pid}/environ").read_bytes()
                        if Path(f"/proc/{pid}/cmdline").read_bytes() != cmdline:
                            continue  # exec'd while being read: look again
                        parent_cmdline = Path(f"/proc/{parents[pid]}/cmdline").read_bytes()
                    except OSError:
                        continue
                    seen = self.first_seen.setdefault(pid, time.monotonic())
                    if cmdline == parent_cmdline and time.monotonic() - seen < self.FORK_GRACE:
                        continue  # not exec'd yet: look again
                    self.environs[pid] = environ

    def close(self) -> dict[int, bytes]:
        self.stop.set()
        self.thread.join()
        return self.environs


def test_no_child_inherits_the_key(tmp_path: Path, vip_server: LocalVip) -> None:
    key = vip_server.api_key
    bin_dir, seen = tmp_path / "bin", tmp_path / "seen"
    _stand_ins(bin_dir, seen)
    env = agent_env(key, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", HOME=str(tmp_path))
    # the keyring's own backend discovery is what runs the library lookups (as for a user);
    # HOME is the test's folder, so no real keyring is read
    for var in ("PYTHON_KEYRING_BACKEND", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY",
                "CONFIGURATION_DIRECTORY", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):  # fmt: skip
        env.pop(var, None)
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump({"pipeline": "FileStats/1.0", "inputs": {"input_file": "a.txt"}}))
    write_dataset(drop / "d1", {"a.txt": "x\n"})
    environs: dict[int, bytes] = {}

    def state_journal() -> Journal:
        return Journal.in_state_dir(tmp_path / "state")

    for args in (["doctor", "--server", vip_server.url],
                 ["watch", str(drop), "--server", vip_server.url, "--output", str(tmp_path / "out"),
                  "--state", str(tmp_path / "state"), "--settle", "0.2"]):  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        watcher = Descendants(proc.pid)
        try:
            if args[0] == "watch":
                wait_for(lambda: any(d.stage == "done" for d in state_journal().datasets()), timeout=120,
                         what="the dataset done under watch")  # fmt: skip
                proc.terminate()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            environs.update(watcher.close())
    copies = {p.name: p.read_bytes() for p in seen.iterdir()}
    assert copies, "no library lookup ran: the stand-ins were not reached"
    assert environs, "no descendant was seen"
    for name, data in {**copies, **{str(k): v for k, v in environs.items()}}.items():
        assert key.encode() not in data, f"{name} holds the API key in its environment"
        assert b"VIP_API_KEY=" not in data, name
