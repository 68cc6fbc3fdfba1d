"""A pipeline that fails on VIP says why (issue 17, item 1).

``ERROR.txt``, ``vip-agent status NAME``, the webhook/command/e-mail text and the page's row
of a dataset whose execution failed all carry the last lines of the failed job's stderr, under
a heading that names the job and the execution. Real parts: ``vip-agent watch`` as a process,
the local VIP server running TextTransform (which fails on an input whose first line is
``FAIL``, writing one line to stderr), a real webhook receiver, an SMTP server, a command, the
page's JSON API and, where Chromium is installed, the page itself.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthelpers import agent_env, drive, start_runner, wait_for, write_dataset
from receivers import Receiver, Smtp
from webhelpers import Page, headless_chromium, make_drop, page_service

from agent.backend import open_backend
from agent.backend.memory import MemoryBackend
from agent.journal import Execution, Journal
from agent.localvip import LocalVip
from agent.runner.failure import (
    EXCERPT_BYTES,
    EXCERPT_LINES,
    MAX_QUOTED,
    headline,
    redactor,
    stderr_excerpt,
)

FAILING = {"pipeline": "TextTransform/1.0", "inputs": {"input_file": "input.txt", "mode": "upper"}}
#: what TextTransform writes to stderr when the first line of its input is FAIL
STDERR_LINE = "TextTransform: the input file's first line is FAIL: failing on purpose"
HEADING = re.compile(r"job \S+ \(execution \S+\) stderr, last lines:")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def _cli(state: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "agent", *args, "--state", str(state)],
        capture_output=True, text=True, timeout=60, env=agent_env("unused"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_every_surface_says_what_the_failed_job_wrote_to_stderr(
    tmp_path: Path, vip_server: LocalVip, receiver: Receiver
) -> None:
    key = vip_server.api_key
    smtp = Smtp(tmp_path, "smtp-pw-9")
    drop = make_drop(tmp_path, FAILING)
    env_dump = tmp_path / "command-env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    state = tmp_path / "state"
    config = {
        "state": str(state),
        "drops": [{
            "path": str(drop), "output": str(tmp_path / "out"), "server": vip_server.url,
            "readiness": {"settle_seconds": 0.3}, "poll_interval": 0.1, "poll": {"min": 0.2, "max": 0.5},
            "notify": [
                {"on": ["failed"], "webhook": receiver.url},
                {"on": ["failed"], "command": [sys.executable, "-c", script, str(env_dump)]},
                {"on": ["failed"], "email": {
                    "host": "127.0.0.1", "port": smtp.port, "to": "pi@example.org",
                    "user": "lab@example.org", "ca_file": str(smtp.ca)}},
            ],
        }],
    }  # fmt: skip
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "watch", "--config", str(tmp_path / "agent.yaml"),
             "--http", "127.0.0.1:0"],
            env=agent_env(key, VIP_AGENT_SMTP_PASSWORD="smtp-pw-9"), stdout=log_fh, stderr=log_fh,
            cwd=tmp_path, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: (state / "http-url").exists(), timeout=30, what="http-url written")
        page = Page(state)
        dataset = write_dataset(drop / "scan-bad", {"input.txt": "FAIL\nsecond line\n"})
        wait_for(lambda: [d["state"] for d in page.get("/api/datasets").json()] == ["failed"],
                 timeout=60, interval=0.2, what="the dataset failed")  # fmt: skip

        # the page's JSON API (the row's source) and the dataset's detail
        (row,) = page.get("/api/datasets").json()
        assert STDERR_LINE in row["error"] and HEADING.search(row["error"]), row["error"]
        assert "ended ExecutionFailed; its logs are in" in row["error"]  # the reason is kept
        assert STDERR_LINE in page.get(f"/api/datasets/{row['id']}").json()["error"]

        # ERROR.txt beside the dataset: the heading, then the job's line, indented
        report = (dataset / "ERROR.txt").read_text(encoding="utf-8")
        lines = report.splitlines()
        (at,) = [i for i, line in enumerate(lines) if HEADING.search(line)]
        assert lines[at + 1].strip() == STDERR_LINE, report

        # `vip-agent status NAME`, and the table's ERROR column (the last stderr line)
        detail = _cli(state, "status", "scan-bad")
        assert HEADING.search(detail) and STDERR_LINE in detail, detail
        table = _cli(state, "status")
        assert "stderr: TextTransform: the input file's first line is FAIL" in " ".join(table.split()), table
        as_json = json.loads(_cli(state, "status", "--json"))
        assert STDERR_LINE in as_json[0]["error"]

        # webhook, command and e-mail: the same words
        wait_for(lambda: receiver.bodies and smtp.messages and env_dump.exists(), timeout=30,
                 what="webhook, e-mail and command")  # fmt: skip
        hook = receiver.bodies[0]
        assert STDERR_LINE in hook["error"] and STDERR_LINE in hook["text"], hook
        assert HEADING.search(hook["text"])
        env = json.loads(env_dump.read_text())
        assert STDERR_LINE in env["VIP_AGENT_ERROR"] and STDERR_LINE in env["VIP_AGENT_TEXT"]
        mail = smtp.messages[0].decode()
        assert STDERR_LINE in " ".join(mail.split()), mail

        # the service log's ERROR line says it too, on one line
        wait_for(lambda: re.search(r"ERROR +scan-bad failed: .*stderr: TextTransform: the input",
                                   log_path.read_text()), timeout=10, what="ERROR log line")  # fmt: skip
        received = [*receiver.raw, *smtp.messages, env_dump.read_bytes(), report.encode()]
        assert not [r for r in received if key.encode() in r]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        smtp.close()


def _execution(vip_id: str = "workflow-XYZ") -> Execution:
    fields: dict[str, Any] = dict.fromkeys(Execution.__dataclass_fields__)
    fields.update(key="default-r1", vip_id=vip_id, name="scan-default-r1")
    return Execution(**fields)


def test_the_excerpt_is_bounded_scrubbed_and_names_the_failed_job(tmp_path: Path) -> None:
    """The last meaningful lines only (no blank lines, no terminal colours), at most
    EXCERPT_LINES and EXCERPT_BYTES, without the key; the failed job's log, not another's."""
    key = "k3y-0123456789abcdef"
    logs = tmp_path / "logs" / "default-r1"
    logs.mkdir(parents=True)
    (logs / "job1.stderr.txt").write_text("job 1 went fine\n", encoding="utf-8")
    noise = [f"progress {i}" for i in range(50)]
    last = ["", "\x1b[31mERROR: cannot read the header of input.nii\x1b[0m",
            f"(request sent with apikey {key})", "   ", "x" * 5000]  # fmt: skip
    (logs / "job3.stderr.txt").write_text("\n".join(noise + last) + "\n", encoding="utf-8")
    backend = open_backend("http://127.0.0.1:9", key)  # the key as the runner's backend holds it
    try:
        text = stderr_excerpt(logs, _execution(), ["3"], redact=redactor(backend))
    finally:
        backend.close()
    assert text is not None
    head, *body = text.splitlines()
    assert head == "job 3 (execution workflow-XYZ) stderr, last lines:"
    assert "job 1 went fine" not in text and key not in text and "\x1b" not in text
    assert "  ERROR: cannot read the header of input.nii" in body
    assert "  (request sent with apikey <apikey>)" in body
    assert len(body) <= EXCERPT_LINES and len("\n".join(body).encode()) <= EXCERPT_BYTES + 2 * EXCERPT_LINES
    assert body[-1].endswith("…") and all(line.strip() for line in body)
    assert headline("execution x ended ExecutionFailed\n" + text).endswith("stderr: " + body[-1].strip())


def test_no_stderr_means_no_heading(tmp_path: Path) -> None:
    """A job that wrote nothing to stderr (or whose log could not be read) adds nothing."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "stderr.txt").write_text("\n\n(not available: VIP answered 500)\n", encoding="utf-8")
    assert stderr_excerpt(logs, _execution(), []) is None
    assert stderr_excerpt(tmp_path / "missing", _execution(), ["1"]) is None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path) as driver:
        yield driver


def test_the_page_row_shows_the_job_stderr(
    tmp_path: Path, vip_server: LocalVip, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In Chromium: the failed row's error cell shows the heading and the job's line."""
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path, FAILING)
    service = page_service(tmp_path, vip_server.url, drop)
    service.start()
    journal = Journal.in_state_dir(tmp_path / "state")
    try:
        page = Page(tmp_path / "state")
        browser.get(page.url)
        write_dataset(drop / "scan-bad", {"input.txt": "FAIL\n"})
        wait_for(lambda: any(d.stage == "failed" for d in journal.datasets()), timeout=60,
                 what="the dataset failed")  # fmt: skip
        (failed,) = journal.datasets()

        def cell() -> str | None:
            return browser.execute_script(
                f"const c = document.querySelector('tr[data-id=\"{failed.id}\"] td.error');"
                "return c ? c.innerText : null;"
            )

        shown = wait_for(lambda: (cell() or "") if STDERR_LINE in (cell() or "") else None,
                         timeout=15, what="the row's error cell")  # fmt: skip
        assert HEADING.search(shown), shown
    finally:
        service.stop()


def test_many_failed_runs_quote_a_few_and_name_every_log(tmp_path: Path) -> None:
    """Five failed runs of one dataset (memory backend): each is named with its logs, the
    first MAX_QUOTED quote their stderr, so the error stays a few KiB."""
    backend = MemoryBackend()
    job = {"pipeline": "Sleep/1.0", "inputs": {"duration": 5, "exit_code": 3}, "runs": 5}
    ds = write_dataset(tmp_path / "drop" / "five", {"x.txt": "x\n"}, job)
    s = start_runner(tmp_path, ds, backend, poll_min=2.0, poll_max=60.0)
    assert drive(s.runner, s.dataset_id, sleep=backend.clock.advance, timeout=20).stage == "failed"
    error = s.journal.get(s.dataset_id).error or ""
    assert error.count("ended ExecutionFailed; its logs are in") == 5, error
    assert error.count("stderr, last lines:") == MAX_QUOTED, error
    assert len(error.encode()) < 4096
