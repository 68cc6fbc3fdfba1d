"""The CLI layer stays thin: commands never import each other; the service API lives under agent/."""

from __future__ import annotations

import ast
from pathlib import Path

import agent.commands

COMMANDS = Path(agent.commands.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_commands_never_import_each_other() -> None:
    commands = {p.stem for p in COMMANDS.glob("*.py") if p.stem != "__init__"}
    assert {"watch", "status", "retry", "cancel", "rerun", "doctor", "demo"} <= commands
    offenders = {
        p.name: sorted(m for m in imported_modules(p) if m.startswith("agent.commands.")
                       and m.split(".")[2] in commands)
        for p in COMMANDS.glob("*.py")
    }  # fmt: skip
    assert {k: v for k, v in offenders.items() if v} == {}


def test_service_api_names() -> None:
    """What the CLI and the web page build on (issue 9): one API, outside agent/commands."""
    from agent import actions, daemon, queries

    for name in ("WatchService", "ClientProvider", "AlreadyRunning", "MissingKey"):
        assert hasattr(daemon, name), name
    for name in ("state_dir", "open_journal", "find_dataset", "agent_pid", "record",
                 "list_records", "detail"):  # fmt: skip
        assert callable(getattr(queries, name)), name
    for name in ("retry", "cancel", "rerun"):
        assert callable(getattr(actions, name)), name
    watch_cli = (COMMANDS / "watch.py").read_text(encoding="utf-8")
    assert "class WatchService" not in watch_cli and "class ClientProvider" not in watch_cli
