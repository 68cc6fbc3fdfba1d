"""Layers you can see (issue 15.7): the import graph of ``agent/``, imports inside functions
included, has no cycle and follows the layer table of docs/architecture.md; read-only commands
stay off the HTTP stack; no module grows past ~600 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for path in AGENT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _type_only(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: annotations only, never executed."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the agent modules it imports, at module level or inside functions.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``.
    """
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_only(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package[: len(package) - (node.level - 1)]
                    base = ".".join([*parts, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]  # fmt: skip
            for target in targets:
                if not (target == "agent" or target.startswith("agent.")):
                    continue
                while target not in mods:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_table() -> tuple[list[str], dict[str, str], dict[str, set[str]]]:
    """docs/architecture.md's "Layers" table: (layer names in order, pattern -> layer,
    layer -> the layers it may import)."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    order: list[str] = []
    patterns: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        layer = cells[0]
        order.append(layer)
        for pattern in re.findall(r"`([^`]+)`", cells[1]):
            patterns[pattern] = layer
        allowed[layer] = {layer} | {w.strip() for w in cells[2].split(",") if w.strip()}
    return order, patterns, allowed


def layer_of(module: str, patterns: dict[str, str]) -> str | None:
    """The layer of the most specific pattern naming ``module`` (``agent.x.*`` names agent.x
    and everything under it)."""
    best: tuple[int, str] | None = None
    for pattern, layer in patterns.items():
        if pattern.endswith(".*"):
            stem = pattern[:-2]
            hit = module == stem or module.startswith(stem + ".")
            weight = len(stem)
        else:
            hit, weight = module == pattern, 10_000
        if hit and (best is None or weight > best[0]):
            best = (weight, layer)
    return best[1] if best else None


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_every_import_follows_the_layer_table() -> None:
    order, patterns, allowed = layer_table()
    assert len(order) >= 6, "docs/architecture.md lost its Layers table"
    unknown = {layer for targets in allowed.values() for layer in targets} - set(order)
    assert not unknown, f"the Layers table names layers it does not define: {unknown}"
    mods = modules()
    stale = sorted(p for p in patterns if p.removesuffix(".*") not in mods)
    assert not stale, f"the Layers table names modules that do not exist: {stale}"
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m, patterns) is None)
    assert not unplaced, f"modules missing from the Layers table: {unplaced}"
    wrong = []
    for module, deps in sorted(graph.items()):
        mine = layer_of(module, patterns)
        assert mine is not None
        for dep in sorted(deps):
            theirs = layer_of(dep, patterns)
            if theirs not in allowed[mine]:
                wrong.append(f"{module} ({mine}) imports {dep} ({theirs})")
    assert wrong == []


def test_layers_only_import_downwards() -> None:
    """A layer may import only itself and layers listed above it in the table."""
    order, _patterns, allowed = layer_table()
    for i, layer in enumerate(order):
        upward = allowed[layer] - set(order[: i + 1])
        assert not upward, f"{layer} may import the later layer(s) {upward}"


def test_modules_stay_small() -> None:
    big = {name: n for name, path in modules().items()
           if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}  # fmt: skip
    assert big == {}


def test_status_does_not_load_the_http_stack(tmp_path: Path) -> None:
    """`vip-agent status` reads the journal: requests/urllib3 (140 ms of imports) stay unloaded."""
    code = (
        "import sys\n"
        "from agent.cli import main\n"
        f"rc = main(['status', '--state', {str(tmp_path)!r}])\n"
        "print('LOADED', sorted(m for m in ('requests', 'urllib3', 'agent.vip.client') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)  # fmt: skip
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def test_module_table_names_existing_files() -> None:
    """Every `agent/...` path docs/architecture.md names exists (the doc cannot drift)."""
    text = DOC.read_text(encoding="utf-8")
    # agent/_bundled/ is made by setup.py when a wheel is built
    named = set(re.findall(r"`(agent/[A-Za-z0-9_/.*]+?)`", text)) - {"agent/_bundled/"}
    missing = sorted(p for p in named if "*" not in p and not (ROOT / p).exists()
                     and not (ROOT / p.rstrip("/")).exists())  # fmt: skip
    assert missing == []
