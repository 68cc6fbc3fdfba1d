"""Docs that cannot drift: every `vip-agent ...` command in README.md and docs/*.md is one the CLI accepts.

Each command line of every ```sh block is parsed by the real argument parser of
its subcommand (placeholders such as NAME or DIR are plain values to it); a
removed command, a renamed flag or a wrong argument count fails here. The
commands that can really run here run elsewhere: the demo (test_demo), the
install from a wheel and `init` (test_wheel, test_init), status/logs/rerun
(test_cli_dead_ends).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from agenthelpers import REPO

from agent.cli import COMMANDS, build_parser

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^[ \t]*```(?:sh|bash|console|shell)\n(.*?)^[ \t]*```", re.S | re.M)


def commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after `vip-agent`) of every vip-agent command in the file's shell blocks."""
    text = path.read_text(encoding="utf-8")
    found = []
    for block in BLOCK.finditer(text):
        start = text.count("\n", 0, block.start(1)) + 1
        joined = block.group(1).replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            for part in re.split(r"&&|\|\||[|;]", line.split(" #", 1)[0]):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                # `vip-agent` as a program (then a command or an option), not as an argument
                # (`useradd ... vip-agent`, `sudo -u vip-agent vip-agent doctor`)
                at = next((i for i, w in enumerate(words[:-1])
                           if (w == "vip-agent" or w.endswith("/bin/vip-agent"))
                           and not (i and re.fullmatch(r"-[a-zA-Z]", words[i - 1]))  # `-u vip-agent`
                           and (words[i + 1] in COMMANDS or words[i + 1].startswith("-"))), None)  # fmt: skip
                if at is not None:
                    argv = words[at + 1:]
                    argv = argv[: argv.index(">")] if ">" in argv else argv
                    found.append((start + offset, argv))
    return found


ALL = [(p, n, argv) for p in DOCS for n, argv in commands(p)]


def test_docs_have_commands() -> None:
    names = {argv[0] for _, _, argv in ALL if argv}
    assert {"demo", "init", "login", "doctor", "install-service", "status", "logs"} <= names


@pytest.mark.parametrize(("path", "line", "argv"), ALL, ids=[f"{p.name}:{n}" for p, n, _ in ALL])
def test_command_parses(path: Path, line: int, argv: list[str]) -> None:
    where = f"{path.relative_to(REPO)}:{line}: vip-agent {' '.join(argv)}"
    command = next((a for a in argv if not a.startswith("-")), None)
    assert command is None or command in COMMANDS, f"{where}: no such command"
    parser = build_parser(only=command)
    try:
        parser.parse_args(argv)
    except SystemExit as err:
        assert err.code == 0, f"{where}: the CLI refuses these arguments"


def test_readme_starts_with_the_two_commands_then_the_lab_path_in_order() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first = BLOCK.search(text)
    assert first is not None
    lines = [line for line in first.group(1).splitlines() if line and not line.startswith("#")]
    assert lines == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/vip-agent demo",
        "bash .ci/run",
    ]
    # from an empty machine to a running service: install, init, login, doctor, service, status
    steps = ["bin/pip install vip_agent-", "\nvip-agent init", "\nvip-agent login", "\nvip-agent doctor",
             "\nvip-agent install-service --user", "\nsystemctl --user daemon-reload",
             "\nvip-agent status"]  # fmt: skip
    where = [text.find(s, text.find("## From an empty machine")) for s in steps]
    assert -1 not in where and where == sorted(where), dict(zip(steps, where, strict=True))
    assert "pip install --upgrade" in text  # and how to upgrade without losing state


def test_nothing_points_outside_the_repository() -> None:
    """Docs, code and comments cite docs/ of this repository, never a file beside the checkout."""
    outside = re.compile(r"\.\./shared|/work/shared|vip-rest-api\.md|prior-art\.md")
    offenders = []
    for path in [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("agent/**/*.md"),
                 *REPO.glob("agent/**/*.py"), *REPO.glob("benchmarks/*.py"),
                 *REPO.glob("tests/*.py"), *REPO.glob("systemd/**/*.service")]:  # fmt: skip
        if path.name == "test_docs.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
