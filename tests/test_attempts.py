"""One attempt number and one folder rule everywhere (issue 17, item 6; docs/operations.md,
"Attempts and output folders").

Attempts count from 1; ``status NAME``, ``status --json``, ``STATUS.json`` and the page show
the same number. A retried dataset whose first attempt left nothing writes to ``NAME`` (not
``NAME-attempt2``); a later attempt after one that left outputs writes to ``NAME-attemptN``;
a dataset of the same name dropped again writes to ``NAME-2`` (not ``NAME-<hash>``). An
extracted archive is listed by ``status NAME`` as a folder. Real ``vip-agent`` processes
against the local server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthelpers import run_agent, wait_for, write_dataset
from webhelpers import (
    CHROMEDRIVER,
    CHROMIUM,
    TEMPLATE,
    Page,
    chromium,
    make_drop,
    page_service,
    require_tool,
)

from agent.journal import Journal
from agent.localvip import LocalVip

GOOD = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "scan.txt"}}


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)


def agent(server: LocalVip, tmp_path: Path, *args: str) -> Any:
    return run_agent(*args, "--state", str(tmp_path / "state"), api_key=server.api_key, cwd=tmp_path)


def run(server: LocalVip, tmp_path: Path, ds: Path) -> Any:
    return agent(server, tmp_path, "run", str(ds), "--server", server.url, "--poll", "0.1",
                 "--output", str(tmp_path / "out"))  # fmt: skip


def status_json(server: LocalVip, tmp_path: Path) -> list[dict[str, Any]]:
    out = agent(server, tmp_path, "status", "--json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_attempts_count_from_one_and_name_their_folders(tmp_path: Path, vip_server: LocalVip) -> None:
    out = tmp_path / "out"
    ds = write_dataset(tmp_path / "drop" / "scan", {"scan.txt": "abc\n"},
                       {"pipeline": "NoSuchPipeline/1.0", "inputs": {"input_file": "scan.txt"}})  # fmt: skip
    first = run(vip_server, tmp_path, ds)
    assert first.returncode == 2, first.stderr  # invalid: nothing ran, no output folder
    assert not (out / "scan").exists()
    (rec,) = status_json(vip_server, tmp_path)
    assert rec["attempt"] == 1 and rec["attempts"] == 0

    # fixed and retried: attempt 2, into `scan` (attempt 1 left nothing), not `scan-attempt2`
    (ds / "job.yaml").write_text(yaml.safe_dump(GOOD), encoding="utf-8")
    retried = agent(vip_server, tmp_path, "retry", "scan")
    assert retried.returncode == 0 and "(attempt 2)" in retried.stdout, retried.stdout + retried.stderr
    second = run(vip_server, tmp_path, ds)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == str(out / "scan")
    assert sorted(p.name for p in out.iterdir()) == ["scan"]
    (rec,) = status_json(vip_server, tmp_path)
    assert rec["attempt"] == 2 and rec["attempts"] == 1 and rec["output_dir"] == str(out / "scan")
    assert json.loads((out / "scan" / "STATUS.json").read_text())["attempt"] == 2
    shown = agent(vip_server, tmp_path, "status", "scan").stdout
    assert shown.splitlines()[0].endswith("done (attempt 2)"), shown

    # the extracted result archive: listed as a folder of the archive's name (VipSession's)
    (archive,) = [p for p in (out / "scan").rglob("*.tgz")]
    assert archive.is_dir()
    (line,) = [x for x in shown.splitlines() if archive.name in x]
    assert line.rstrip().endswith(f"-> folder {archive}/ (extracted)"), line

    # run again after outputs: attempt 3 beside them, in `scan-attempt3`
    rerun = agent(vip_server, tmp_path, "rerun", "scan")
    assert rerun.returncode == 0 and "(attempt 3)" in rerun.stdout, rerun.stdout + rerun.stderr
    third = run(vip_server, tmp_path, ds)
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip().splitlines()[-1] == str(out / "scan-attempt3")
    assert json.loads((out / "scan" / "STATUS.json").read_text())["attempt"] == 2  # kept
    assert json.loads((out / "scan-attempt3" / "STATUS.json").read_text())["attempt"] == 3
    (rec,) = status_json(vip_server, tmp_path)
    assert rec["attempt"] == 3
    assert agent(vip_server, tmp_path, "status", "scan").stdout.splitlines()[0].endswith("(attempt 3)")


def test_a_dataset_dropped_again_gets_a_numbered_folder(tmp_path: Path, vip_server: LocalVip) -> None:
    out = tmp_path / "out"
    ds = write_dataset(tmp_path / "drop" / "late", {"scan.txt": "first\n"}, GOOD)
    assert run(vip_server, tmp_path, ds).returncode == 0
    (ds / "scan.txt").write_text("second, other content\n", encoding="utf-8")
    again = run(vip_server, tmp_path, ds)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == str(out / "late-2")
    assert sorted(p.name for p in out.iterdir()) == ["late", "late-2"]
    records = status_json(vip_server, tmp_path)
    assert [(r["name"], r["attempt"], r["output_dir"]) for r in records] == [
        ("late", 1, str(out / "late")), ("late", 1, str(out / "late-2"))]
    # each folder's STATUS.json says whose it is: the first is untouched
    firsts = json.loads((out / "late" / "STATUS.json").read_text())
    assert firsts["created"] == records[0]["created"] and firsts["state"] == "done"


def test_a_users_own_folder_of_that_name_is_never_written_into(tmp_path: Path, vip_server: LocalVip) -> None:
    out = tmp_path / "out"
    mine = out / "subject"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's own\n", encoding="utf-8")
    ds = write_dataset(tmp_path / "drop" / "subject", {"scan.txt": "abc\n"}, GOOD)
    done = run(vip_server, tmp_path, ds)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out / "subject-2")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_the_page_shows_the_same_attempt_and_extracted_folders(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service (watch) and its page in Chromium: a dataset that failed validation and was
    retried is "attempt 2" in the detail, writes to NAME, and its archive is a folder."""
    require_tool(CHROMIUM, "chromium")
    require_tool(CHROMEDRIVER, "chromium-driver")
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)  # input_file: data.txt
    service = page_service(tmp_path, vip_server.url, drop)
    service.start()
    browser = chromium(tmp_path / "profile")
    journal = Journal.in_state_dir(tmp_path / "state")
    try:
        page = Page(tmp_path / "state")
        write_dataset(drop / "scan-typo", {"date.txt": "typo\n"})
        wait_for(lambda: [d.stage for d in journal.datasets()] == ["failed"], timeout=30, what="failed")
        (ds,) = journal.datasets()
        (drop / "job.yaml").write_text(yaml.safe_dump({**TEMPLATE, "inputs": {"input_file": "*.txt"}}))
        assert page.post(f"/api/datasets/{ds.id}/retry", token=page.token).status_code == 200
        wait_for(lambda: journal.get(ds.id).stage == "done", timeout=60, what="retried and done")
        assert journal.get(ds.id).output_dir == str(tmp_path / "out" / "scan-typo")

        browser.get(f"{page.url}#/dataset/{ds.id}")

        def facts() -> dict[str, str] | None:
            pairs = browser.execute_script(
                "return [...document.querySelectorAll('#d-facts dt')]"
                ".map((dt) => [dt.textContent, dt.nextElementSibling.textContent])")
            got = dict(pairs or [])
            return got if got.get("attempt") else None

        assert wait_for(facts, timeout=15, what="the detail's facts")["attempt"] == "2"
        outputs = browser.execute_script(
            "return [...document.querySelectorAll('#d-outputs tbody tr')]"
            ".map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent))")
        (row,) = [r for r in outputs if r[0].endswith(".tgz/")]
        assert row[2] == "yes, extracted into a folder" and Path(row[0]).is_dir()
    finally:
        browser.quit()
        service.stop()
