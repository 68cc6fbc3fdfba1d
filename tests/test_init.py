"""`vip-agent init` through the real CLI: a commented agent.yaml that loads, folders, key, doctor, no overwrite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from agenthelpers import agent_env, run_agent

from agent.config import load_config
from agent.localvip import LocalVip


def test_non_interactive_writes_a_config_that_loads(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "agent.yaml"
    args = ("init", "--non-interactive", "--config", str(config), "--drop", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--server", "http://127.0.0.1:9", "--rule", "marker",
            "--max-running", "3", "--state", str(tmp_path / "state"), "--no-doctor")  # fmt: skip
    result = run_agent(*args, api_key="", cwd=tmp_path, HOME=str(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    text = config.read_text()
    assert text.count("#") > 15  # every setting says what it does
    loaded = load_config(config)
    (drop,) = loaded.drops
    assert drop.path == tmp_path / "in" and drop.output == tmp_path / "out"
    assert drop.server == "http://127.0.0.1:9" and drop.readiness.rule == "marker"
    assert drop.limits.max_running == 3 and loaded.state == tmp_path / "state"
    assert all(p.is_dir() for p in (tmp_path / "in", tmp_path / "out", tmp_path / "state"))
    # no key anywhere: init says how to log in
    assert "vip-agent login --server http://127.0.0.1:9" in result.stdout

    # never over an existing file without --force; with it, the old one is kept
    config.write_text(text + "# my own notes\n")
    again = run_agent(*args, api_key="", cwd=tmp_path, HOME=str(tmp_path / "home"))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert config.read_text().endswith("# my own notes\n")
    forced = run_agent(*args, "--force", api_key="", cwd=tmp_path, HOME=str(tmp_path / "home"))
    assert forced.returncode == 0, forced.stderr
    (backup,) = config.parent.glob("agent.yaml.bak-*")
    assert backup.read_text().endswith("# my own notes\n") and not config.read_text().endswith("notes\n")


def test_ends_with_doctor(tmp_path: Path, vip_server: LocalVip) -> None:
    config = tmp_path / "agent.yaml"
    result = run_agent("init", "-y", "--config", str(config), "--server", vip_server.url, "--drop", "d",
                       "--output", "o", "--state", "s", api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "API key for" in result.stdout and "found (environment VIP_API_KEY)" in result.stdout
    assert f"OK    server {vip_server.url}" in result.stdout and "doctor:" in result.stdout
    assert vip_server.api_key not in result.stdout + config.read_text()
    # an unreachable server: the config is written, doctor's verdict is the exit status
    bad = run_agent("init", "-y", "--force", "--config", str(config), "--server", "http://127.0.0.1:9",
                    "--drop", "d", "--output", "o", "--state", "s", api_key="", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "fix what doctor reports" in bad.stdout
    assert load_config(config).drops[0].server == "http://127.0.0.1:9"


def test_interactive_answers_on_a_terminal(tmp_path: Path) -> None:
    """Real prompts on a pseudo-terminal: Enter keeps a default, typed values win."""
    master, slave = os.openpty()
    config = tmp_path / "agent.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "init", "--config", str(config), "--no-doctor"],
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=agent_env("", HOME=str(tmp_path / "home")),
    )  # fmt: skip
    os.close(slave)
    answers = [str(tmp_path / "mydrop"), "", "http://127.0.0.1:9", "settle", "5", "2", "n"]
    os.write(master, ("\n".join(answers) + "\n").encode())
    out, err = proc.communicate(timeout=30)
    os.close(master)
    assert proc.returncode == 0, out + err
    data = yaml.safe_load(config.read_text())
    assert data["drops"][0]["path"] == str(tmp_path / "mydrop")
    assert data["drops"][0]["output"] == str(tmp_path / "home" / "vip-agent" / "results")  # the default
    assert data["drops"][0]["readiness"]["settle_seconds"] == 5
    assert data["defaults"]["max_running"] == 2
    assert "Log in now" in out and "later: `vip-agent login --server http://127.0.0.1:9`" in out


def test_non_interactive_without_a_key_yet_exits_0(tmp_path: Path, vip_server: LocalVip) -> None:
    # a scripted install: no key stored yet, no keyring; doctor runs at the end (issue 17 item 9)
    result = run_agent("init", "--non-interactive", "--config", str(tmp_path / "agent.yaml"),
                       "--server", vip_server.url, "--drop", "d", "--output", "o", "--state", "s",
                       api_key="", cwd=tmp_path, HOME=str(tmp_path / "home"),
                       PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"WARN  API key for {vip_server.url}: none stored yet" in result.stdout
    assert f"OK    server {vip_server.url}: reachable" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert "once the API key is given (`vip-agent login --server" in result.stdout
