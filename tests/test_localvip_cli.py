"""``vip-agent local-server`` as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "local-server", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_cli_prints_url_then_generated_key_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VIP_API_KEY"}
    proc = _start(["--root", str(tmp_path / "root"), "--max-running", "2", "--delete-delay", "0"], env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        key = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and len(key) >= 20
        r = requests.get(url + "/rest/executions/count", headers={"apikey": key}, timeout=10)
        assert r.status_code == 200 and r.text == "0"
        assert requests.get(url + "/rest/executions/count", headers={"apikey": "x"}, timeout=10).status_code == 401
        assert (tmp_path / "root" / ".localvip" / "state.sqlite3").exists()
        assert key.encode() not in (tmp_path / "root" / ".localvip" / "state.sqlite3").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_cli_uses_env_key_and_sigint(tmp_path: Path) -> None:
    env = {**os.environ, "VIP_API_KEY": "env-key-for-test"}
    proc = _start(["--root", str(tmp_path / "root"), "--faults", "latency=0.01,seed=3"], env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        r = requests.get(url + "/rest/path/vip/Home?action=exists", headers={"apikey": "env-key-for-test"},
                         timeout=10)
        assert r.json() == {"exists": True}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout is not None and proc.stdout.read() == ""  # the key is never printed


def test_cli_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "local-server", "--help"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    for opt in ["--host", "--port", "--root", "--api-key", "--pipelines", "--max-running", "--faults",
                "--max-download", "--delete-delay"]:
        assert opt in out
