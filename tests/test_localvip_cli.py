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


def test_a_client_that_drops_its_connection_is_no_traceback(tmp_path: Path) -> None:
    """A killed agent resets its connections (chaos runs do it 50 times): the server goes on
    and says nothing on stderr, where it used to print socketserver's traceback each time."""
    import socket
    import struct
    from urllib.parse import urlsplit

    env = {**os.environ, "VIP_API_KEY": "env-key-for-test"}
    proc = _start(["--root", str(tmp_path / "root")], env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        where = urlsplit(url)
        for _ in range(3):  # half a request, then a reset (SO_LINGER 0) instead of a close
            s = socket.create_connection((where.hostname, where.port), timeout=5)
            s.sendall(b"GET /rest/platform HTTP/1.1\r\nHost: x\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        r = requests.get(url + "/rest/executions/count", headers={"apikey": "env-key-for-test"},
                         timeout=10)  # fmt: skip
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "Traceback" not in err and "Connection reset" not in err, err
