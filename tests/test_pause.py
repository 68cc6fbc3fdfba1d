"""Pause and resume (issue 17 item 23): a real ``vip-agent watch`` process, the real CLI,
the local VIP server; the pause holds across a restart and everything completes after resume."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.journal import Journal
from agent.localvip import LocalVip
from tests.agenthelpers import run_agent, wait_for, watch_process, write_dataset

TEMPLATE = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)


def make_drop(tmp_path: Path, job: dict[str, Any] | None = None) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "job.yaml").write_text(yaml.safe_dump(job or TEMPLATE), encoding="utf-8")
    return drop


@contextmanager
def watching(
    tmp_path: Path, server: LocalVip, drop: Path, config: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``vip-agent watch`` as a real process, stopped with SIGTERM (its log in agent.log)."""
    where = ["--config", str(config)] if config else [
        str(drop), "--server", server.url, "--output", str(tmp_path / "out"),
        "--state", str(tmp_path / "state")]  # fmt: skip
    with watch_process([*where, "--settle", "0.3"], api_key=server.api_key, cwd=tmp_path,
                       log=tmp_path / "agent.log", ready="ready", timeout=30, what="agent ready",
                       append=True) as proc:  # fmt: skip
        yield proc


def cli(tmp_path: Path, server: LocalVip, *args: str) -> subprocess.CompletedProcess[str]:
    return run_agent(*args, "--state", str(tmp_path / "state"), api_key=server.api_key, cwd=tmp_path)


def status(tmp_path: Path, server: LocalVip) -> dict[str, dict[str, Any]]:
    done = cli(tmp_path, server, "status", "--json")
    assert done.returncode == 0, done.stderr
    return {r["name"]: r for r in json.loads(done.stdout)}


def launched(server: LocalVip) -> int:
    return len(list(server.state.query("SELECT name FROM executions")))


def uploaded(journal: Journal) -> int:
    return sum(f.uploaded for d in journal.datasets() for f in journal.files(d.id))


def stays(check: Any, seconds: float) -> None:
    """``check()`` holds for ``seconds`` (an observation window: the agent looks at the
    journal every 2 s, so 3 s covers at least one chance to start work)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check()
        time.sleep(0.1)


def test_pause_all_holds_new_datasets_across_a_restart_then_resume_completes(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path)
    journal = Journal.in_state_dir(tmp_path / "state")
    with watching(tmp_path, vip_server, drop):
        paused = cli(tmp_path, vip_server, "pause", "--all")
        assert paused.returncode == 0, paused.stderr
        assert "the whole agent paused" in paused.stdout and "applies it within seconds" in paused.stdout
        write_dataset(drop / "s1", {"data.txt": "one two three\n"})
        # detected and recorded (the agent keeps watching), shown paused with who paused it
        wait_for(lambda: status(tmp_path, vip_server).get("s1", {}).get("state") == "paused",
                 timeout=30, what="s1 recorded and paused")  # fmt: skip
        rec = status(tmp_path, vip_server)["s1"]
        assert rec["paused_by"]["scope"] == "all" and rec["paused_by"]["via"] == "command line"
        assert rec["paused_by"]["by"] and rec["paused_by"]["since"] > 0
        assert "vip-agent resume --all" in rec["paused"]
        stays(lambda: uploaded(journal) == 0 and launched(vip_server) == 0
              and journal.find(name="s1")[0].stage == "validate", 3.0)  # fmt: skip
        table = cli(tmp_path, vip_server, "status")
        assert "paused: the whole agent" in table.stdout and "s1" in table.stdout
    # a restart: the pause is in the journal, not in the process
    with watching(tmp_path, vip_server, drop):
        wait_for(lambda: "picked up" in (tmp_path / "agent.log").read_text()
                 or "resuming 1 unfinished" in (tmp_path / "agent.log").read_text(), timeout=30)  # fmt: skip
        stays(lambda: uploaded(journal) == 0 and launched(vip_server) == 0, 3.0)
        assert status(tmp_path, vip_server)["s1"]["state"] == "paused"
        resumed = cli(tmp_path, vip_server, "resume")
        assert resumed.returncode == 0 and "1 pause(s) lifted" in resumed.stdout, resumed.stdout
        wait_for(lambda: journal.find(name="s1")[0].final, timeout=60, what="s1 finished")
    (ds,) = journal.find(name="s1")
    assert ds.stage == "done" and ds.paused is None
    assert launched(vip_server) == 1
    assert "paused_by" not in status(tmp_path, vip_server)["s1"]
    assert json.loads((Path(ds.output_dir or "") / "STATUS.json").read_text())["state"] == "done"


def test_a_dataset_paused_while_running_is_polled_but_not_downloaded(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = make_drop(tmp_path, {"pipeline": "Sleep/1.0", "inputs": {"duration": 3}})
    journal = Journal.in_state_dir(tmp_path / "state")
    with watching(tmp_path, vip_server, drop):
        write_dataset(drop / "nap", {"data.txt": "z\n"})
        wait_for(lambda: any(d.stage == "monitor" for d in journal.datasets()), timeout=30)
        (ds,) = journal.datasets()
        paused = cli(tmp_path, vip_server, "pause", f"#{ds.id}")
        assert paused.returncode == 0 and f"dataset #{ds.id} paused" in paused.stdout, paused.stdout
        # the execution on VIP runs to its end and the agent sees it (polling is harmless) ...
        wait_for(lambda: journal.get(ds.id).stage == "mirror", timeout=60, what="execution seen ending")
        assert all(e.status == "Finished" for e in journal.executions(ds.id))
        # ... but nothing is downloaded while paused
        stays(lambda: journal.get(ds.id).stage == "mirror" and not journal.outputs(ds.id), 3.0)
        rec = status(tmp_path, vip_server)["nap"]
        assert rec["state"] == "paused" and rec["paused_by"]["scope"] == "dataset"
        # STATUS.json beside the outputs says so too (the runner does not step it meanwhile)
        report = Path(journal.get(ds.id).output_dir or "") / "STATUS.json"
        wait_for(lambda: json.loads(report.read_text())["state"] == "paused", timeout=10)
        resumed = cli(tmp_path, vip_server, "resume", "nap")
        assert resumed.returncode == 0 and "resumed" in resumed.stdout
        wait_for(lambda: journal.get(ds.id).final, timeout=60)
    assert journal.get(ds.id).stage == "done"
    assert all(o.downloaded for o in journal.outputs(ds.id))


def test_an_upload_in_flight_stops_at_a_pause_and_completes_after_resume(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    """agent.yaml's bandwidth: keeps a 3 MB upload at 500 kB/s long enough to pause it in
    the middle: it stops there (no byte more), and resume sends it to the end."""
    drop = make_drop(tmp_path, {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.bin"}})
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "state": str(tmp_path / "state"),
        "defaults": {"bandwidth": {"upload": "500kB/s"}},
        "drops": [{"path": str(drop), "server": vip_server.url, "output": str(tmp_path / "out")}],
    }), encoding="utf-8")  # fmt: skip
    journal = Journal.in_state_dir(tmp_path / "state")

    def sent() -> int:
        rows = journal.datasets()
        return int(((rows[0].progress or {}).get("done") or 0) if rows else 0)

    with watching(tmp_path, vip_server, drop, config):
        write_dataset(drop / "big", {"data.bin": bytes(3_000_000)})
        wait_for(lambda: sent() > 200_000, timeout=30, what="upload under way")
        paused = cli(tmp_path, vip_server, "pause", "big")
        assert paused.returncode == 0, paused.stderr
        (ds,) = journal.datasets()
        wait_for(lambda: journal.has_event(ds.id, "paused: the upload stopped (files already sent are "
                                           "kept; the file in flight starts again on resume)"),
                 timeout=10, what="upload stopped")  # fmt: skip
        assert sent() < 3_000_000 and journal.get(ds.id).stage == "upload"
        at_pause = sent()
        stays(lambda: sent() == at_pause and journal.get(ds.id).stage == "upload", 2.5)
        assert status(tmp_path, vip_server)["big"]["state"] == "paused"
        resumed = cli(tmp_path, vip_server, "resume", "big")
        assert resumed.returncode == 0 and "resumed" in resumed.stdout
        wait_for(lambda: journal.get(ds.id).final, timeout=60, what="big finished")
    assert journal.get(ds.id).stage == "done"
    assert all(f.uploaded for f in journal.files(ds.id))


def test_cancel_passes_a_pause(tmp_path: Path, vip_server: LocalVip) -> None:
    drop = make_drop(tmp_path)
    journal = Journal.in_state_dir(tmp_path / "state")
    with watching(tmp_path, vip_server, drop):
        assert cli(tmp_path, vip_server, "pause").returncode == 0
        write_dataset(drop / "c1", {"data.txt": "x\n"})
        wait_for(lambda: status(tmp_path, vip_server).get("c1", {}).get("state") == "paused", timeout=30)
        done = cli(tmp_path, vip_server, "cancel", "c1")
        assert done.returncode == 0 and "c1: cancelled" in done.stdout, done.stdout + done.stderr
    assert journal.find(name="c1")[0].stage == "cancelled" and launched(vip_server) == 0


def test_pause_names_what_it_cannot_pause(tmp_path: Path, vip_server: LocalVip) -> None:
    drop = make_drop(tmp_path)
    state = tmp_path / "state"
    Journal.in_state_dir(state).add_dataset(
        name="old", path=drop / "old", server=vip_server.url, output_root=tmp_path / "out",
        drop_dir=drop, stage="done",
    )  # fmt: skip
    done = cli(tmp_path, vip_server, "pause", "old")
    assert done.returncode == 1 and "old is done: it has ended, there is nothing to pause" in done.stderr
    other = tmp_path / "elsewhere"
    other.mkdir()
    done = cli(tmp_path, vip_server, "pause", "--drop", str(other))
    assert done.returncode == 1 and f"is not a drop folder of this agent (its drop folders: {drop})" in done.stderr
    done = cli(tmp_path, vip_server, "pause", "--drop", str(drop))
    assert done.returncode == 0 and f"drop folder {drop} paused" in done.stdout
    assert "no agent is running" in done.stdout
    again = cli(tmp_path, vip_server, "pause", "--drop", str(drop))
    assert "was already paused" in again.stdout
    both = cli(tmp_path, vip_server, "pause", "old", "--all")
    assert both.returncode == 1 and "not several" in both.stderr
    assert cli(tmp_path, vip_server, "resume", "--drop", str(drop)).stdout.startswith(f"drop folder {drop} resumed")
    # a drop folder known only by its pause (no dataset, no agent watching it) can be resumed
    assert cli(tmp_path, vip_server, "pause", "--drop", str(other)).returncode == 1
    gone = tmp_path / "gone"
    journal = Journal.in_state_dir(state)
    journal._db().execute("INSERT INTO pauses VALUES ('drop', ?, 'x', 'command line', 1)", (str(gone),))
    assert cli(tmp_path, vip_server, "resume", "--drop", str(gone)).stdout.startswith(f"drop folder {gone} resumed")
    assert "nothing was paused" in cli(tmp_path, vip_server, "resume").stdout


def test_the_page_pauses_and_resumes_the_agent_a_drop_folder_and_a_dataset(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buttons in a real headless Chromium, with the token the page keeps."""
    from tests.webhelpers import CHROMEDRIVER, CHROMIUM, Page, chromium, page_service, require_tool

    require_tool(CHROMIUM, "chromium")
    require_tool(CHROMEDRIVER, "chromium-driver")
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    from agent.bandwidth import BandwidthConfig

    # a limit high enough to cost nothing here, to be seen on the page and in /metrics
    service = page_service(tmp_path, vip_server.url, drop, bandwidth=BandwidthConfig(upload=50e6))
    service.start()
    journal = Journal.in_state_dir(tmp_path / "state")
    browser = chromium(tmp_path / "profile")

    def js(script: str) -> Any:
        return browser.execute_script(script)

    def click(selector: str) -> None:  # from script: the page redraws 4 times a second
        wait_for(lambda: js(f"const b = document.querySelector({selector!r});"
                            " if (!b || b.disabled) return false; b.click(); return true;"),
                 timeout=10, what=f"click {selector}")  # fmt: skip

    def row(name: str) -> str | None:
        return js(f"""const tr = [...document.querySelectorAll('#datasets tbody tr')]
            .find((r) => r.querySelector('td.name')?.textContent === {name!r});
            return tr ? tr.dataset.state : null;""")  # fmt: skip

    def toast() -> str:
        return str(js("return document.querySelector('#toast').textContent"))

    try:
        page = Page(tmp_path / "state")
        browser.get(page.url + "#token=" + page.token)  # the page keeps the token, then hides it
        wait_for(lambda: js("return document.querySelector('#conn').dataset.ok === '1'"), timeout=15)
        # the whole agent
        click("#pause-all")
        wait_for(lambda: js("return document.querySelector('#pause-all').textContent") == "Resume all",
                 timeout=10, what="button turns to Resume all")  # fmt: skip
        assert "the whole agent paused" in toast()
        write_dataset(drop / "p1", {"data.txt": "one\n"})
        wait_for(lambda: row("p1") == "paused", timeout=20, what="p1 shown paused")
        metrics = page.get("/metrics").text
        assert 'vip_agent_paused{scope="agent",target=""} 1.0' in metrics
        assert f'vip_agent_paused{{scope="drop",target="{drop}"}} 0.0' in metrics
        assert f'vip_agent_bandwidth_limit_bytes_per_second{{direction="upload",server="{vip_server.url}"}} 5e+07' in metrics
        assert f'vip_agent_datasets{{drop="{drop}",state="paused"}} 1.0' in metrics
        assert "limit up 50.0 MB/s, down off" in js("return document.querySelector('#health').innerText")
        stays(lambda: uploaded(journal) == 0 and launched(vip_server) == 0, 1.5)
        click("#pause-all")
        wait_for(lambda: row("p1") == "done", timeout=30, what="p1 done after Resume all")
        (p1,) = journal.find(name="p1")
        refused = page.post(f"/api/datasets/{p1.id}/pause", token=page.token)
        assert refused.status_code == 409 and "it has ended" in refused.json()["error"]
        assert page.post("/api/pause", token="wrong").status_code == 401  # token-protected like Retry
        # one drop folder
        click(f"#drops button[data-drop='{drop}']")
        wait_for(lambda: js(f"return document.querySelector(\"#drops button[data-drop='{drop}']\").textContent")
                 == "Resume", timeout=10)  # fmt: skip
        write_dataset(drop / "p2", {"data.txt": "two\n"})
        wait_for(lambda: row("p2") == "paused", timeout=20, what="p2 shown paused")
        (p2,) = journal.find(name="p2")
        # one dataset: its own Resume says what still holds it
        js(f"location.hash = '#/dataset/{p2.id}'")
        wait_for(lambda: js("return !document.querySelector('#act-resume').disabled"
                            " && document.querySelector('#act-pause').disabled"), timeout=10)  # fmt: skip
        click("#act-resume")
        wait_for(lambda: f"drop folder {drop} is paused" in toast(), timeout=10, what="still paused by the folder")
        assert journal.get(p2.id).stage == "validate" and launched(vip_server) == 1
        js("location.hash = '#/'")
        click(f"#drops button[data-drop='{drop}']")
        wait_for(lambda: row("p2") == "done", timeout=30, what="p2 done after the folder's Resume")
        assert not list(journal._db().execute("SELECT * FROM pauses"))
        severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe  # no script error, no CSP refusal
    finally:
        browser.quit()
        service.stop()
