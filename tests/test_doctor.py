"""``vip-agent doctor`` on a good and on broken setups, against the local VIP server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import pytest
import yaml
from agenthelpers import MemoryKeyring

from agent import cli, doctor
from agent.localvip import LocalVip


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MemoryKeyring]:
    """No key from the test runner's environment, an empty keyring, a private HOME."""
    for name in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "CONFIGURATION_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def _setup(tmp_path: Path, server: str, *, make: tuple[str, ...] = ("drop", "out", "state"),
           **drop: object) -> Path:
    for name in make:
        (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "state": str(tmp_path / "state"),
        "drops": [{"path": str(tmp_path / "drop"), "output": str(tmp_path / "out"), "server": server,
                   **drop}],
    }))
    return path


def _lines(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(status + " ")]


def test_good_setup_passes(tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, vip_server.url)
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    assert cli.main(["doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert _lines(out, "FAIL") == [] and _lines(out, "WARN") == []
    for expected in (
        f"OK    config {config}: 1 drop folder",
        f"OK    drop folder {tmp_path / 'drop'}: exists, writable",
        f"OK    output folder {tmp_path / 'out'}: exists, writable",
        f"OK    state folder {tmp_path / 'state'}: exists, writable",
        f"OK    server {vip_server.url}: reachable",
        f"OK    API key for {vip_server.url}: found (environment VIP_API_KEY)",
        f"OK    API key for {vip_server.url}: accepted by the server",
        "OK    file watching:",
        "OK    disk space at",
        "OK    keyring:",
    ):
        assert expected in out, expected
    assert out.rstrip().splitlines()[-1].endswith("0 WARN, 0 FAIL")
    assert vip_server.api_key not in out


def test_bad_setup_fails_with_fixes(tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, vip_server.url, make=("out",))
    (tmp_path / "state").write_text("not a folder")
    monkeypatch.setenv("VIP_API_KEY", "a-revoked-key")
    assert cli.main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    fails = "\n".join(_lines(out, "FAIL"))
    assert f"drop folder {tmp_path / 'drop'}: does not exist" in fails
    assert f"state folder {tmp_path / 'state'}: is not a folder" in fails
    assert f"API key for {vip_server.url}: refused by the server (environment VIP_API_KEY)" in fails
    assert f"fix: mkdir -p {tmp_path / 'drop'}" in out
    assert f"vip-agent login --server {vip_server.url}" in out
    assert "a-revoked-key" not in out


def test_unreachable_server_and_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "http://127.0.0.1:9")
    assert cli.main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  server http://127.0.0.1:9: cannot connect" in out
    assert "FAIL  API key for http://127.0.0.1:9: not usable" in out
    assert "vip-agent login --server http://127.0.0.1:9" in out


def test_key_file_with_open_permissions_is_reported(tmp_path: Path, vip_server: LocalVip,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(vip_server.api_key)
    key_file.chmod(0o644)
    config = _setup(tmp_path, vip_server.url, key_file=str(key_file))
    assert cli.main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"chmod 600 {key_file}" in out
    key_file.chmod(0o600)
    assert cli.main(["doctor", "--config", str(config)]) == 0
    assert f"found (key file {key_file})" in capsys.readouterr().out


def test_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("drops: [\n")
    assert cli.main(["doctor", "--config", str(config), "--server", "http://127.0.0.1:9"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  config {config}: not valid" in out
    assert cli.main(["doctor", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_no_keyring_is_a_warning_unless_strict(tmp_path: Path, vip_server: LocalVip,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())  # restored by the autouse fixture
    config = _setup(tmp_path, vip_server.url)
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    assert cli.main(["doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "WARN  keyring: no keyring backend is available" in out
    assert "pip install keyrings.alt" in out
    assert cli.main(["doctor", "--config", str(config), "--strict"]) == 1


def test_low_disk_space_warns(tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, vip_server.url)
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    assert cli.main(["doctor", "--config", str(config), "--min-free-gb", "1e9"]) == 0
    assert "WARN  disk space at" in capsys.readouterr().out


def test_inotify_limit(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "max_user_watches").write_text("4\n")
    (proc / "max_user_instances").write_text("128\n")
    drop = tmp_path / "drop"
    for i in range(6):
        (drop / f"d{i}").mkdir(parents=True)
    report = doctor.Report(io.StringIO())
    doctor.check_inotify(report, [drop], proc=proc)
    assert report.checks[-1].status == doctor.FAIL
    assert "fs.inotify.max_user_watches" in report.checks[-1].fix
    (proc / "max_user_watches").write_text("100\n")
    doctor.check_inotify(report, [drop], proc=proc)
    assert report.checks[-1].status == doctor.OK
    assert report.checks[-1].title == "inotify: 7 of 100 watches needed"
    before = len(report.checks)
    doctor.check_inotify(report, [drop], proc=tmp_path / "not-linux")
    assert len(report.checks) == before  # no limit to check


def test_filesystem_type_finds_network_shares(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:45 / /mnt/lab\\040share rw,relatime shared:2 - nfs4 srv:/export rw\n"
        "41 22 0:46 / /mnt/labx rw - cifs //srv/x rw\n"
    )
    assert doctor.filesystem_type(Path("/mnt/lab share/drop"), mountinfo) == "nfs4"
    assert doctor.filesystem_type(Path("/mnt/labx"), mountinfo) == "cifs"
    assert doctor.filesystem_type(Path("/mnt/lab"), mountinfo) == "ext4"
    assert doctor.filesystem_type(tmp_path) is not None or not Path("/proc/self/mountinfo").exists()
