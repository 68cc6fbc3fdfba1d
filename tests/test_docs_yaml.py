"""Every YAML example the docs show is loaded as written, through the agent's own reader and
its real validation (agent.yaml: ``load_config``/``parse_config``; job.yaml: ``load_job``, and
the examples' datasets through ``vip-agent run --dry-run`` against the local server).

A fenced ```` ```yaml ```` block is an agent.yaml when it has ``drops:``, a job.yaml when it has
``pipeline:``. A block that is deliberately a piece of a file says so on the line before it:
``<!-- yaml fragment: agent.yaml -->`` (top-level keys of agent.yaml without ``drops:``; the
test adds one drop folder) or ``<!-- yaml fragment: drop -->`` (the keys of one drop folder).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from agenthelpers import REPO, run_agent, write

from agent import yamlread
from agent.config import load_config, parse_config
from agent.jobfile import load_job
from agent.localvip import LocalVip

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[A-Za-z0-9_-]*)\s*$")
_MARK = re.compile(r"<!--\s*yaml fragment:\s*(?P<kind>agent\.yaml|drop|job\.yaml)\s*-->")


def yaml_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, text, fragment kind or None) of every ```yaml block in a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if m["lang"] in ("yaml", "yml"):
            indent = len(m["indent"])
            body = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
            before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            mark = _MARK.search(before)
            blocks.append((i + 1, body, mark["kind"] if mark else None))
        i = end + 1
    return blocks


BLOCKS = [(f"{p.name}:{line}", text, kind) for p in DOCS for line, text, kind in yaml_blocks(p)]


def test_the_docs_have_yaml_examples() -> None:
    # the collector finds the blocks it is meant to check (a renamed fence would hide them)
    names = {name.split(":")[0] for name, _t, _k in BLOCKS}
    assert {"job-yaml.md", "monitoring.md", "agent-yaml.md"} <= names
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("name", "text", "kind"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_doc_yaml_block_loads_and_validates(name: str, text: str, kind: str | None,
                                            tmp_path: Path) -> None:  # fmt: skip
    data = yamlread.load_text(text, name)  # the reader: bounds, duplicates, no YAML 1.1 guessing
    assert isinstance(data, dict), f"{name}: not a mapping"
    if kind == "agent.yaml":
        assert "drops" not in data, f"{name}: marked as a fragment but is a whole agent.yaml"
        parse_config({**data, "drops": [{"path": "d", "output": "o"}]}, source=name, base=tmp_path)
    elif kind == "drop":
        parse_config({"drops": [{"path": "d", "output": "o", **data}]}, source=name, base=tmp_path)
    elif kind == "job.yaml" or "pipeline" in data:
        dataset = tmp_path / "drop" / "subject-042"
        write(dataset / "job.yaml", text)
        write(dataset / "signals" / "a.RAW", "x")
        write(dataset / "params.control", "x")
        job = load_job(dataset)
        assert job.pipeline == data.get("pipeline")
    elif "drops" in data:
        path = write(tmp_path / "agent.yaml", text)
        config = load_config(path)
        assert config.drops
    else:
        pytest.fail(f"{name}: a ```yaml block that is neither an agent.yaml nor a job.yaml; mark "
                    "a deliberate fragment with <!-- yaml fragment: agent.yaml|drop|job.yaml -->")


def test_notify_example_of_monitoring_doc_is_read_as_written(tmp_path: Path) -> None:
    # `- on: [failed]` once read as {True: [...]}: "drops[0].notify[0].True: unknown setting"
    block = next(t for n, t, _k in BLOCKS if n.startswith("monitoring.md") and "notify:" in t)
    config = load_config(write(tmp_path / "agent.yaml", block))
    rules = config.drops[0].notify
    assert [sorted(r.on) for r in rules] == [
        ["disk_low", "failed", "incomplete", "paused"], ["failed"], ["done", "failed"],
    ]


def test_examples_agent_yaml_loads_with_its_commented_examples_turned_on(tmp_path: Path) -> None:
    source = REPO / "examples" / "agent.yaml"
    config = load_config(source)
    assert config.drops[0].readiness.settle_seconds == 30
    # the commented-out notify/key_file/disk_low lines are examples too: uncommented as written
    lines = source.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# key_file:"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("# disk_low:"))
    on = [re.sub(r"^(\s*)# ", r"\1", line) for line in lines[start : end + 1]]
    text = "\n".join(lines[:start] + on + lines[end + 1 :]) + "\n"
    (tmp_path / "drop").mkdir()
    key = write(tmp_path / "api-key", "k")
    key.chmod(0o600)
    text = text.replace("/etc/vip-agent/api-key", str(key))
    config = load_config(write(tmp_path / "agent.yaml", text))
    drop = config.drops[0]
    assert [sorted(r.on) for r in drop.notify] == [
        ["disk_low", "failed", "incomplete", "paused"], ["failed"],
    ]
    assert drop.notify[1].email is not None and drop.disk_low == 5_000_000_000
    assert drop.key_file == key


@pytest.mark.parametrize("rel", sorted(
    str(p.relative_to(REPO)) for p in (REPO / "examples").rglob("*")
    if p.suffix in (".yaml", ".yml") and p.is_file()
))  # fmt: skip
def test_every_example_file_goes_through_the_reader(rel: str) -> None:
    path = REPO / rel
    data = yamlread.load(path)
    assert isinstance(data, dict)
    if path.name == "agent.yaml":
        assert load_config(path).drops
    elif path.name == "job.yaml":
        folder = path.parent
        template = folder.parent / "job.yaml"
        if (folder / "job.yaml") == path and template.is_file() and folder.parent.name != "examples":
            load_job(folder, template)  # a dataset's own job over its drop folder's template
        else:
            datasets = [d for d in folder.iterdir() if d.is_dir()]
            assert datasets, f"{rel}: a template with no dataset beside it"
            for dataset in datasets:
                load_job(dataset, path)


@pytest.mark.parametrize("dataset", ["drop/plate-reader-01", "drop/text-transform",
                                     "drop/concat-logs", "failing/fail-on-purpose"])  # fmt: skip
def test_example_datasets_pass_the_real_validation(dataset: str, vip_server: LocalVip,
                                                   tmp_path: Path) -> None:  # fmt: skip
    done = run_agent("run", str(REPO / "examples" / dataset), "--dry-run", "--server",
                     vip_server.url, api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid: nothing was sent (dry run)" in done.stdout
