"""The README's first command: `vip-agent demo` needs no key, no network, no arguments."""

from __future__ import annotations

import json
from pathlib import Path

from agenthelpers import REPO, run_agent

from agent.journal import Journal


def test_demo_runs_every_example_to_done(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # no key anywhere: the demo makes its own for the embedded server
    result = run_agent("demo", "--state", str(state), api_key="", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    outputs = Path(result.stdout.strip().splitlines()[-1])
    assert outputs.is_dir() and outputs.is_relative_to(tmp_path / "vip-agent-demo")
    examples = sorted(p.name for p in (REPO / "examples" / "drop").iterdir() if p.is_dir())
    datasets = Journal.in_state_dir(state).datasets()
    assert sorted(Path(d.path).name for d in datasets) == examples
    assert {d.stage for d in datasets} == {"done"}
    for d in datasets:
        status = json.loads((Path(d.output_dir or "") / "STATUS.json").read_text())
        assert status["state"] == "done"
        # result archives were extracted into folders named after them
        assert any(p.is_dir() for p in Path(d.output_dir or "").rglob("*.tgz"))
        assert not [p for p in Path(d.output_dir or "").rglob("*.tgz") if p.is_file()]
    # vip-agent status reads the same journal
    status = run_agent("status", "--state", str(state), "--json", api_key="", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert {row["state"] for row in json.loads(status.stdout)} == {"done"}
