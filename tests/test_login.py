"""``vip-agent login`` / ``logout`` against the local VIP server, with real keyring backends.

Also the secret-leak test: with a distinctive key, run login and doctor and look
for the key in everything they printed, logged and wrote.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.errors
import pytest
import yaml
from agenthelpers import MemoryKeyring

from agent import cli
from agent.credentials import find_api_key
from agent.localvip import LocalVip

CANARY = "vipk-CANARY-7d1e5a-do-not-print-9c24f0"


@pytest.fixture
def memory_keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryKeyring]:
    monkeypatch.delenv("VIP_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def _login(monkeypatch: pytest.MonkeyPatch, server: str, key: str, *extra: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(key + "\n"))
    return cli.main(["login", "--server", server, "--stdin", *extra])


def test_login_good_key_is_stored(vip_server: LocalVip, memory_keyring: MemoryKeyring,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert _login(monkeypatch, vip_server.url + "/", vip_server.api_key) == 0
    assert memory_keyring.entries == {("vip-agent", vip_server.url): vip_server.api_key}
    out, err = capsys.readouterr()
    assert "accepted by the server and stored" in out
    assert vip_server.api_key not in out + err
    cred = find_api_key(vip_server.url, env={})
    assert cred.key == vip_server.api_key
    assert cred.source == f"keyring vip-agent/{vip_server.url}"


def test_login_bad_key_exits_3_and_stores_nothing(vip_server: LocalVip, memory_keyring: MemoryKeyring,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert _login(monkeypatch, vip_server.url, "not-the-key") == 3
    assert memory_keyring.entries == {}
    err = capsys.readouterr().err
    assert "refused this API key; nothing was stored" in err
    assert "not-the-key" not in err


def test_login_empty_input_is_a_usage_error(vip_server: LocalVip, memory_keyring: MemoryKeyring,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert _login(monkeypatch, vip_server.url, "   ") == 2
    assert memory_keyring.entries == {}


def test_login_unreachable_server_stores_nothing_unless_told(
    memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = "http://127.0.0.1:9"  # discard port: nothing listens
    assert _login(monkeypatch, server, CANARY) == 1
    assert memory_keyring.entries == {}
    assert "pass --no-check" in capsys.readouterr().err
    assert _login(monkeypatch, server, CANARY, "--no-check") == 0
    assert memory_keyring.entries == {("vip-agent", server): CANARY}


def test_login_without_keyring_backend_explains(vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    try:
        assert _login(monkeypatch, vip_server.url, vip_server.api_key) == 3
    finally:
        keyring.set_keyring(previous)
    err = capsys.readouterr().err
    assert "the key is valid but could not be stored" in err
    assert "systemd-creds encrypt" in err and "keyrings.alt" in err
    assert vip_server.api_key not in err


def test_logout(vip_server: LocalVip, memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> None:
    assert _login(monkeypatch, vip_server.url, vip_server.api_key) == 0
    assert cli.main(["logout", "--server", vip_server.url]) == 0
    assert memory_keyring.entries == {}
    assert "Removed the API key" in capsys.readouterr().out
    assert cli.main(["logout", "--server", vip_server.url]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_login_subprocess_with_file_keyring(vip_server: LocalVip, tmp_path: Path) -> None:
    """The installed command, key on stdin, keyrings.alt's file backend under a tmp XDG_DATA_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY")}
    env.update(PYTHON_KEYRING_BACKEND="keyrings.alt.file.PlaintextKeyring",
               XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "agent", "login", "--server", vip_server.url, "--stdin"]
    result = subprocess.run(cmd, input=vip_server.api_key + "\n", env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert vip_server.api_key not in result.stdout + result.stderr
    assert "PlaintextKeyring" in result.stdout
    stored = list((tmp_path / "data").rglob("*.cfg"))
    assert len(stored) == 1 and (stored[0].stat().st_mode & 0o077) == 0

    bad = subprocess.run(cmd, input="wrong\n", env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3
    # the refused key did not replace the good one
    check = subprocess.run(
        [sys.executable, "-c",
         "from agent.credentials import find_api_key; import sys; "
         f"print(find_api_key({vip_server.url!r}, env={{}}).key == sys.stdin.read().strip())"],
        input=vip_server.api_key, env=env, capture_output=True, text=True, timeout=60,
    )
    assert check.stdout.strip() == "True", check.stderr


# --------------------------------------------------------------------------- secret leak


def _needles(key: str) -> list[bytes]:
    raw = key.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), raw.hex().encode()]


def test_key_never_printed_logged_or_written(tmp_path: Path, memory_keyring: MemoryKeyring,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    work = tmp_path / "work"
    for name in ("drop", "out", "state"):
        (work / name).mkdir(parents=True)
    config = work / "agent.yaml"
    key_file = work / "api-key"
    key_file.write_text(CANARY + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("HOME", str(work / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(work / "home" / ".config"))

    with LocalVip(tmp_path / "server-root", api_keys=[CANARY]) as server:
        config.write_text(yaml.safe_dump({
            "state": str(work / "state"),
            "drops": [{"path": str(work / "drop"), "output": str(work / "out"), "server": server.url}],
        }))
        assert _login(monkeypatch, server.url, CANARY) == 0
        assert cli.main(["doctor", "--config", str(config)]) == 0  # key from the keyring
        monkeypatch.setenv("VIP_API_KEY", CANARY)
        assert cli.main(["doctor", "--server", server.url]) == 0  # key from the environment
        monkeypatch.delenv("VIP_API_KEY")
        with_file = work / "with-file.yaml"
        with_file.write_text(config.read_text().replace("server:", f"key_file: {key_file}\n  server:"))
        assert cli.main(["doctor", "--config", str(with_file)]) == 0  # key from a key file
        assert _login(monkeypatch, server.url, CANARY + "x") == 3  # refused key, message printed
        assert cli.main(["install-service", "--user", "--config", str(config),
                         "--output-dir", str(work / "units")]) == 0

    out, err = capsys.readouterr()
    assert "key file" in out and "environment VIP_API_KEY" in out and "keyring vip-agent/" in out
    printed = (out + err + caplog.text).encode()
    for needle in _needles(CANARY):
        assert needle not in printed
    for path in work.rglob("*"):
        if path.is_file() and path != key_file:
            data = path.read_bytes()
            for needle in _needles(CANARY):
                assert needle not in data, f"the key leaked into {path}"


# --------------------------------------------------------------------------- issue 17 items 9, 10


def _no_keyring_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIP_") and k != "CREDENTIALS_DIRECTORY"}
    env.update(PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring", HOME=str(tmp_path / "home"),
               XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"), **extra)  # fmt: skip
    return env


def test_piped_key_without_stdin_flag_has_no_getpass_warning(vip_server: LocalVip, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY")}
    env.update(PYTHON_KEYRING_BACKEND="keyrings.alt.file.PlaintextKeyring",
               XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path / "home"))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "agent", "login", "--server", vip_server.url],
                          input=vip_server.api_key + "\n", env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "GetPassWarning" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert "stored in the OS keyring" in done.stdout


def test_one_character_key_is_not_redacted_through_its_own_message(vip_server: LocalVip,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "agent", "login", "--server", vip_server.url, "--stdin"],
                          input="e\n", env=_no_keyring_env(tmp_path), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "refused this API key" in done.stderr
    # before: "GET /rest/<apikey>x<apikey>cutions/count ... Bad cr<apikey>d<apikey>ntials"
    assert "<apikey>" not in done.stderr and "***" not in done.stderr, done.stderr
    assert "/rest/executions" in done.stderr


def test_no_keyring_offers_the_key_file_way(vip_server: LocalVip, tmp_path: Path) -> None:
    login = [sys.executable, "-m", "agent", "login", "--server", vip_server.url, "--stdin"]
    env = _no_keyring_env(tmp_path)
    done = subprocess.run(login, input=vip_server.api_key + "\n", env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 3
    key_file = tmp_path / "home" / ".config" / "vip-agent" / "api-key"
    assert f"vip-agent login --server {vip_server.url} --key-file {key_file}" in done.stderr
    assert vip_server.api_key not in done.stdout + done.stderr
    # the way it offers works: a 0600 file, named in agent.yaml, found by doctor
    stored = subprocess.run([*login, "--key-file", str(key_file)], input=vip_server.api_key + "\n",
                            env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    assert f"key_file: {key_file}" in stored.stdout
    assert (key_file.stat().st_mode & 0o777) == 0o600
    assert key_file.read_text().strip() == vip_server.api_key
    for name in ("drop", "out", "state"):
        (tmp_path / name).mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"state": str(tmp_path / "state"), "drops": [{
        "path": str(tmp_path / "drop"), "output": str(tmp_path / "out"), "server": vip_server.url,
        "key_file": str(key_file)}]}))  # fmt: skip
    doctor = subprocess.run([sys.executable, "-m", "agent", "doctor", "--strict", "--config", str(config)],
                            env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    # before: --strict failed on "WARN keyring: no keyring backend" though the key is in a file
    assert doctor.returncode == 0, doctor.stdout
    assert f"found (key file {key_file})" in doctor.stdout
    assert "OK    keyring: not needed (the key comes from key file" in doctor.stdout
