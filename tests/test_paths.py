"""Per-user folders from platformdirs, and 0.1's folders still found after an upgrade."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from agenthelpers import run_agent

from agent import paths
from agent.journal import Journal


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "CONFIGURATION_DIRECTORY", "STATE_DIRECTORY",
                "LOGS_DIRECTORY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.mark.skipif(sys.platform != "linux", reason="the real Linux folders")
def test_linux_folders_are_xdg_and_0_1_ones(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert paths.default_config_path() == home / ".config" / "vip-agent" / "agent.yaml"
    assert paths.default_state_dir() == home / ".local" / "state" / "vip-agent"
    assert paths.default_log_dir() == home / ".local" / "state" / "vip-agent" / "log"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "st"))
    assert paths.default_config_path() == home / "cfg" / "vip-agent" / "agent.yaml"
    assert paths.default_state_dir() == home / "st" / "vip-agent"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/vip-agent:/other")
    assert paths.default_state_dir() == Path("/var/lib/vip-agent")


@pytest.mark.skipif(sys.platform != "linux", reason="the real Linux folders")
def test_status_finds_the_journal_where_0_1_left_it(tmp_path: Path) -> None:
    """Through the CLI, with nothing but HOME: the journal 0.1 wrote in ~/.local/state/vip-agent."""
    home = tmp_path / "home"
    old = Journal.in_state_dir(home / ".local" / "state" / "vip-agent")
    old.add_dataset(name="from-0.1", path="/d/x", server="http://x:1", output_root="/o", stage="done")
    result = run_agent("status", "--json", api_key="", cwd=tmp_path, HOME=str(home),
                       XDG_STATE_HOME="", XDG_CONFIG_HOME="")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in json.loads(result.stdout)] == ["from-0.1"]


def test_macos_folders_simulated(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated macOS: platformdirs reads sys.platform (set to darwin here) and HOME; no Mac runs this."""
    monkeypatch.setattr(sys, "platform", "darwin")
    support = home / "Library" / "Application Support" / "vip-agent"
    assert paths.default_config_path() == support / "agent.yaml"
    assert paths.default_state_dir() == support
    assert paths.default_log_dir() == home / "Library" / "Logs" / "vip-agent"

    # 0.1 used the XDG folders on macOS too: an existing config and journal there are still found
    old_config = home / ".config" / "vip-agent" / "agent.yaml"
    old_config.parent.mkdir(parents=True)
    old_config.write_text("drops: []\n")
    Journal.in_state_dir(home / ".local" / "state" / "vip-agent")
    assert paths.default_config_path() == old_config
    assert paths.default_state_dir() == home / ".local" / "state" / "vip-agent"
    # once the new place is in use it wins
    support.mkdir(parents=True)
    (support / "agent.yaml").write_text("drops: []\n")
    Journal.in_state_dir(support)
    assert paths.default_config_path() == support / "agent.yaml"
    assert paths.default_state_dir() == support
