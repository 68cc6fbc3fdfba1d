"""The runner's stage table: every fact about a stage in one row, every stage change written
by the machine alone, and no stage chosen by a string literal."""

from __future__ import annotations

import ast
from pathlib import Path

from agent.journal import FINAL_STAGES, PUBLIC_STATE, TRANSITIONS, Stage
from agent.runner import STAGE_POOL, TABLE

AGENT = Path(__file__).resolve().parents[1] / "agent"


def test_every_non_final_stage_has_a_step() -> None:
    assert set(TABLE) == set(Stage)
    missing = [s.value for s, row in TABLE.items() if s not in FINAL_STAGES and row.step is None]
    assert missing == [], f"non-final stage(s) without a step: {missing}"
    assert all(TABLE[s].step is None for s in FINAL_STAGES)


def test_the_table_agrees_with_the_journal() -> None:
    for stage, row in TABLE.items():
        assert row.to == TRANSITIONS[stage]
        assert row.state == PUBLIC_STATE[stage.value]
    assert STAGE_POOL["mirror"] == "download" and STAGE_POOL["upload"] == "upload"
    assert set(STAGE_POOL) == {s.value for s in Stage if s not in FINAL_STAGES}


def _calls(path: Path, names: set[str]) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in names
    ]


def test_only_the_machine_writes_a_stage() -> None:
    writers = sorted(
        p.name for p in (AGENT / "runner").glob("*.py") if _calls(p, {"set_stage"})
    )
    assert writers == ["machine.py"]


def test_no_stage_is_chosen_by_a_string_literal() -> None:
    found = []
    for path in AGENT.rglob("*.py"):
        for call in _calls(path, {"set_stage", "reopen"}):
            args = call.args[1:2]
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                found.append(f"{path.relative_to(AGENT)}:{call.lineno}")
    assert found == []


def test_runner_modules_import_at_the_top_only() -> None:
    """No import inside a function (none is needed to hide a cycle), and leftovers does not
    import the runner (the old {runner, leftovers} cycle). agent/backend/__init__.py may load
    the VIP backend when one is opened (so `status` never loads requests):
    tests/test_import_graph.py holds every import, those included, to no cycle."""
    inner = []
    backends = [p for p in (AGENT / "backend").glob("*.py") if p.name != "__init__.py"]
    for path in [*(AGENT / "runner").glob("*.py"), AGENT / "leftovers.py", *backends]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{path.name}:{n.lineno}" for n in ast.walk(fn)
                          if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert inner == []
    assert "agent.runner" not in (AGENT / "leftovers.py").read_text(encoding="utf-8")


def test_no_runner_module_is_too_long() -> None:
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines())
             for p in (AGENT / "runner").glob("*.py")}
    assert max(sizes.values()) <= 600, sizes
