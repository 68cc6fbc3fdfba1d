"""systemd units and the launchd plist: shipped files, rendering, systemd-analyze, install-service."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent import cli, service
from agent.service import ServiceSpec, render_launchd_plist, render_systemd_unit

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")


def _vip_agent() -> str:
    """An existing executable for ExecStart= (verify checks that it exists)."""
    exe = Path(sys.executable).with_name("vip-agent")
    return str(exe) if exe.exists() else sys.executable


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"}
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


def _config(tmp_path: Path) -> Path:
    for name in ("drop", "out", "state"):
        (tmp_path / name).mkdir()
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "state": str(tmp_path / "state"),
        "drops": [{"path": str(tmp_path / "drop"), "output": str(tmp_path / "out"),
                   "server": "http://127.0.0.1:9"}],
    }))
    return path


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


# --------------------------------------------------------------------------- shipped files


def test_shipped_files_are_the_default_rendering() -> None:
    for rel, (_kind, data) in service.default_specs().items():
        shipped = REPO / rel
        assert shipped.exists(), f"{rel} missing: run `python -m agent.service`"
        assert shipped.read_bytes() == data, f"{rel} is stale: run `python -m agent.service`"


def test_system_unit_has_what_the_service_needs() -> None:
    d = _directives((REPO / "systemd/vip-agent.service").read_text())
    expected = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "vip-agent",
        "ExecReload": "/bin/kill -HUP $MAINPID", "UMask": "0027", "StateDirectory": "vip-agent",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "SystemCallArchitectures": "native",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes", "LoadCredential": "vip-api-key:/etc/vip-agent/api-key",
        "ExecStart": "/usr/local/bin/vip-agent watch --config /etc/vip-agent/agent.yaml",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert "@system-service" in d["SystemCallFilter"]
    assert int(d["WatchdogSec"][0]) > 0 and int(d["RestartSec"][0]) > 0
    assert d["ReadWritePaths"] == ["-/srv/vip-agent -/var/lib/vip-agent"]
    assert "#LoadCredentialEncrypted=vip-api-key:/etc/vip-agent/api-key.cred" in (
        REPO / "systemd/vip-agent.service").read_text()


def test_user_unit_uses_specifiers_and_no_key() -> None:
    text = (REPO / "systemd/user/vip-agent.service").read_text()
    d = _directives(text)
    assert d["ExecStart"] == ["%h/.local/bin/vip-agent watch --config %E/vip-agent/agent.yaml"]
    assert d["WantedBy"] == ["default.target"]
    assert "User" not in d and "LoadCredential" not in d
    assert d["Type"] == ["notify"]


# --------------------------------------------------------------------------- systemd-analyze


@needs_analyze
def test_system_unit_passes_verify(tmp_path: Path) -> None:
    spec = ServiceSpec(command=[_vip_agent()], config=str(tmp_path / "agent.yaml"),
                       read_write_paths=[str(tmp_path)])
    unit = tmp_path / "vip-agent.service"
    unit.write_text(render_systemd_unit(spec))
    result = _analyze("verify", "--man=no", str(unit))
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr and "Unknown section" not in result.stderr


@needs_analyze
def test_user_unit_passes_verify(tmp_path: Path) -> None:
    text = (REPO / "systemd/user/vip-agent.service").read_text()
    unit = tmp_path / "vip-agent.service"
    unit.write_text(text.replace("%h/.local/bin/vip-agent", _vip_agent()))
    result = _analyze("verify", "--man=no", str(unit))
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr


@needs_analyze
def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    # proves the two tests above check something: a missing binary fails verify
    spec = ServiceSpec(command=[str(tmp_path / "no-such-vip-agent")], config="/x.yaml")
    unit = tmp_path / "vip-agent.service"
    unit.write_text(render_systemd_unit(spec))
    assert _analyze("verify", "--man=no", str(unit)).returncode != 0


@needs_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    spec = ServiceSpec(command=[_vip_agent()], config=str(tmp_path / "agent.yaml"),
                       read_write_paths=[str(tmp_path)])
    unit = tmp_path / "vip-agent.service"
    unit.write_text(render_systemd_unit(spec))
    result = _analyze("security", "--offline=yes", "--no-pager", str(unit))
    if "offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
    assert match.group(2) == "OK"


# --------------------------------------------------------------------------- rendering


def test_folders_under_home_and_tmp_adjust_the_sandbox() -> None:
    home = render_systemd_unit(ServiceSpec(command=["/usr/bin/vip-agent"], config="/etc/a.yaml",
                                           read_write_paths=["/home/lab/drop"]))
    assert "ProtectHome=read-only" in home and "PrivateTmp=yes" in home
    venv = render_systemd_unit(ServiceSpec(command=["/home/lab/venv/bin/vip-agent"], config="/etc/a.yaml"))
    assert "ProtectHome=read-only" in venv
    tmp = render_systemd_unit(ServiceSpec(command=["/usr/bin/vip-agent"], config="/etc/a.yaml",
                                          read_write_paths=["/var/tmp/drop"]))  # noqa: S108 - a path in a unit, no file
    assert "PrivateTmp=no" in tmp and "ProtectHome=yes" in tmp


def test_exec_start_escapes_spaces_percent_and_dollar() -> None:
    spec = ServiceSpec(command=["/opt/vip agent/bin/vip-agent"], config="/srv/100% $HOME/agent.yaml",
                       read_write_paths=["/srv/lab data"])
    d = _directives(render_systemd_unit(spec))
    assert d["ExecStart"] == ['"/opt/vip agent/bin/vip-agent" watch --config "/srv/100%% $$HOME/agent.yaml"']
    assert d["ReadWritePaths"] == ['"-/srv/lab data"']


def test_plist_keys() -> None:
    for data in ((REPO / f"launchd/{service.LAUNCHD_LABEL}.plist").read_bytes(),
                 render_launchd_plist(ServiceSpec(command=["/usr/local/bin/vip-agent"],
                                                  config="/Users/x/.config/vip-agent/agent.yaml",
                                                  user_mode=True, log_dir="/Users/x/Library/Logs/vip-agent"))):
        plist = plistlib.loads(data)
        assert plist["Label"] == "fr.insalyon.creatis.vip-agent"
        assert plist["ProgramArguments"][1:3] == ["watch", "--config"]
        assert plist["ProgramArguments"][3].endswith("/vip-agent/agent.yaml")
        assert plist["RunAtLoad"] is True
        assert plist["KeepAlive"] == {"SuccessfulExit": False}
        assert plist["ProcessType"] in ("Standard", "Background", "Adaptive", "Interactive")
        assert plist["ThrottleInterval"] >= 10
        assert plist["StandardOutPath"].endswith("vip-agent.log")
        assert plist["StandardErrorPath"].endswith("vip-agent.err.log")
        env = plist["EnvironmentVariables"]
        assert "/usr/bin" in env["PATH"].split(":")
        assert not any("KEY" in name or "TOKEN" in name for name in env)
        assert "UserName" not in plist  # a LaunchAgent runs as the logged-in user


def test_launch_daemon_names_its_user() -> None:
    plist = plistlib.loads(render_launchd_plist(ServiceSpec(command=["/usr/local/bin/vip-agent"],
                                                            config="/a.yaml", service_user="lab")))
    assert plist["UserName"] == "lab"


# --------------------------------------------------------------------------- install-service


def test_install_service_system_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    out = tmp_path / "units"
    argv = ["install-service", "--system", "--config", str(config), "--output-dir", str(out),
            "--executable", _vip_agent()]
    assert cli.main(argv) == 0
    unit = out / "vip-agent.service"
    d = _directives(unit.read_text())
    assert d["ExecStart"] == [f"{_vip_agent()} watch --config {config}"]
    assert d["ReadWritePaths"] == [f"-{tmp_path}/drop -{tmp_path}/out -{tmp_path}/state"]
    printed = capsys.readouterr().out
    assert f"wrote {unit}" in printed
    assert "sudo systemctl daemon-reload && sudo systemctl enable --now vip-agent" in printed
    if SYSTEMD_ANALYZE:
        result = _analyze("verify", "--man=no", str(unit))
        assert result.returncode == 0, result.stderr

    # the same again: nothing to do
    assert cli.main(argv) == 0
    assert "already up to date" in capsys.readouterr().out
    # a different unit is not overwritten without --force
    before = unit.read_text()
    assert cli.main([*argv, "--run-as", "labagent"]) == 1
    err = capsys.readouterr().err
    assert "pass --force" in err and "+User=labagent" in err
    assert unit.read_text() == before
    assert cli.main([*argv, "--run-as", "labagent", "--force"]) == 0
    assert _directives(unit.read_text())["User"] == ["labagent"]
    assert [p.name for p in out.iterdir()] == ["vip-agent.service"]  # no temp file left


def test_install_service_user_prints_enable_commands(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    assert cli.main(["install-service", "--user", "--config", str(config),
                     "--output-dir", str(tmp_path / "u"), "--executable", _vip_agent()]) == 0
    printed = capsys.readouterr().out
    assert "systemctl --user daemon-reload && systemctl --user enable --now vip-agent" in printed
    d = _directives((tmp_path / "u" / "vip-agent.service").read_text())
    assert d["WantedBy"] == ["default.target"] and "User" not in d


def test_install_service_launchd(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = _config(tmp_path)
    assert cli.main(["install-service", "--launchd", "--user", "--config", str(config),
                     "--output-dir", str(tmp_path / "agents"), "--executable", _vip_agent()]) == 0
    target = tmp_path / "agents" / "fr.insalyon.creatis.vip-agent.plist"
    plist = plistlib.loads(target.read_bytes())
    assert plist["ProgramArguments"] == [_vip_agent(), "watch", "--config", str(config)]
    assert plist["StandardOutPath"] == str(tmp_path / "home/Library/Logs/vip-agent/vip-agent.log")
    assert (tmp_path / "home/Library/Logs/vip-agent").is_dir()
    printed = capsys.readouterr().out
    assert f"launchctl bootstrap gui/$(id -u) {target}" in printed


def test_install_service_print_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install-service", "--system", "--print", "--config", str(tmp_path / "none.yaml"),
                     "--output-dir", str(tmp_path / "units"), "--executable", _vip_agent()]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# vip-agent")
    assert "Type=notify" in captured.out
    assert "does not exist yet" in captured.err  # no config: says the folders are not derived
    assert not (tmp_path / "units").exists()
