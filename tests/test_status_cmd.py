"""`vip-agent status`, `retry` and `cancel` against a real journal (and the real server for cancel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from agenthelpers import drive, run_agent, start_runner, wait_for, write_dataset

from agent.cli import main as cli
from agent.config import config_from_args
from agent.daemon import WatchService
from agent.journal import Journal
from agent.localvip import LocalVip
from agent.vip.client import VipClient


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    assert cli(["status", "--json", *args]) == 0
    return list(json.loads(capsys.readouterr().out))


def seed(journal: Journal) -> dict[str, int]:
    """One dataset per public state the table must show."""
    ids: dict[str, int] = {}

    def add(name: str, stage: str, **fields: object) -> None:
        ids[name] = journal.add_dataset(
            name=name, path=f"/drop/{name}", server="http://127.0.0.1:9", output_root="/out",
            fingerprint=f"fp-{name}", drop_dir="/drop", stage=stage,
        )  # fmt: skip
        if fields:
            journal.update(ids[name], **fields)

    add("w", "waiting", progress={"kind": "waiting", "reason": "waiting for the marker file READY"})
    add("u", "upload", progress={"kind": "upload", "done": 500, "total": 1000})
    add("r", "monitor")
    journal.add_execution(ids["r"], key="default-r1", name="r-x", variant="default", run=1, inputs={})
    journal.update_execution(ids["r"], "default-r1", vip_id="workflow-ABC", status="Running")
    add("f", "failed", error="the dataset cannot be run:\n  - pipeline 'Nope/1' does not exist")
    add("p", "launch", paused="API key refused by http://127.0.0.1:9: Bad credentials")
    add("d", "done", output_dir="/out/d")
    return ids


def test_status_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    ids = seed(Journal.in_state_dir(state))
    records = {str(r["name"]): r for r in run_json(capsys, "--state", str(state))}
    assert {n: r["state"] for n, r in records.items()} == {
        "w": "waiting", "u": "uploading", "r": "running", "f": "failed", "p": "paused", "d": "done",
    }  # fmt: skip
    for name, rec in records.items():
        for key in ("name", "state", "executions", "error", "path", "fingerprint", "output_dir", "updated"):
            assert key in rec, (name, key)
        assert rec["id"] == ids[name]
    assert records["r"]["executions"] == ["workflow-ABC"]
    assert "- pipeline 'Nope/1'" in str(records["f"]["error"])  # JSON keeps the full text
    assert "Bad credentials" in str(records["p"]["error"])

    assert cli(["status", "--state", str(state)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].startswith("agent: NOT running")
    assert lines[1].split()[:3] == ["ID", "NAME", "STATE"]
    # a row and the lines its wrapped error continues on (the terminal's width decides where)
    row: dict[str, str] = {}
    for line in lines[2:]:
        if line.startswith("#"):
            name = line.split()[1]
            row[name] = line
        else:
            row[name] += " " + line.strip()
    assert all(row[name].startswith(f"#{ids[name]} ") for name in ids)
    assert "waiting for the marker file READY" in row["w"]
    assert "50% of 1 KB" in row["u"]
    assert "0/1 executions ended" in row["r"] and "workflow-ABC" in row["r"]
    # the heading and its problem on one line: the table shows what is actually wrong
    assert "cannot be run: pipeline 'Nope/1'" in row["f"]
    # only some names
    assert [r["name"] for r in run_json(capsys, "--state", str(state), "f", "d")] == ["f", "d"]


def test_status_without_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a --state folder without a journal is a typo more often than not (issue 17 item 11)
    assert cli(["status", "--json", "--state", str(tmp_path / "none")]) == 1
    assert cli(["status", "--state", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert f"the state folder {tmp_path / 'none'} does not exist: nothing has run there" in err
    assert not (tmp_path / "none").exists()  # status never creates state
    (tmp_path / "empty").mkdir()
    assert cli(["status", "--state", str(tmp_path / "empty")]) == 1
    assert "holds no journal" in capsys.readouterr().err


def test_retry_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    ids = seed(journal)
    assert cli(["retry", "d", "--state", str(state)]) == 1
    assert "only a failed, cancelled or incomplete dataset" in capsys.readouterr().err
    assert cli(["retry", "f", "--state", str(state)]) == 1  # /drop/f does not exist
    assert "no longer exists" in capsys.readouterr().err
    assert cli(["retry", "nobody", "--state", str(state)]) == 1
    # a real folder: back to validate, attempts + 1, fingerprint refreshed
    folder = write_dataset(tmp_path / "drop" / "g", {"a.txt": "1"})
    (folder / "ERROR.txt").write_text("old report")
    gid = journal.add_dataset(name="g", path=str(folder), server="http://x:1", output_root="/o", stage="failed")
    assert cli(["retry", f"#{gid}", "--state", str(state)]) == 0
    g = journal.get(gid)
    assert g.stage == "validate" and g.attempts == 1 and g.fingerprint and g.error is None
    assert not (folder / "ERROR.txt").exists()
    assert "no agent is running" in capsys.readouterr().out
    assert journal.get(ids["d"]).stage == "done"


def test_cancel_waiting_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    ids = seed(journal)
    assert cli(["cancel", "w", "--state", str(state)]) == 0
    assert journal.get(ids["w"]).stage == "cancelled"
    assert cli(["cancel", "d", "--state", str(state)]) == 0
    assert "already done" in capsys.readouterr().out


SLEEP = {"pipeline": "Sleep/1.0", "inputs": {"duration": "60"}}


def running_dataset(tmp_path: Path, server: LocalVip, journal: Journal) -> int:
    """A dataset whose execution is Running on the server (driven by the real runner)."""
    ds = write_dataset(tmp_path / "drop" / "long", {"note.txt": "n"}, SLEEP)
    s = start_runner(tmp_path, ds, server, journal=journal, output_root=tmp_path / "out",
                     fingerprint="f1", name="long", poll_min=0.05)  # fmt: skip
    drive(s.runner, s.dataset_id, until=lambda o: o.stage == "monitor", timeout=30)
    return s.dataset_id


def test_cancel_without_agent_kills_and_cleans(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    dataset_id = running_dataset(tmp_path, vip_server, journal)
    assert vip_server.state.running() == 1
    assert cli(["cancel", "long", "--state", str(state), "--wait", "30"]) == 0
    assert "cancelling it here" in capsys.readouterr().out
    ds = journal.get(dataset_id)
    assert ds.stage == "cancelled" and ds.state == "cancelled"
    assert vip_server.state.running() == 0
    client = VipClient(vip_server.url, vip_server.api_key)
    assert ds.remote_root and not client.exists(ds.remote_root)


def test_cancel_with_agent_running(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump(SLEEP))
    config = config_from_args(drop, server=vip_server.url, output=tmp_path / "out",
                              state=tmp_path / "state", settle=0.2)  # fmt: skip
    config = replace(config, drops=(replace(config.drops[0], poll_interval=0.1),))
    service = WatchService(
        config, debounce=0.05,
        # monitor polls far apart: the cancel must wake the dataset, not wait for the poll
        runner_options={"poll_min": 30, "poll_max": 30},
        scheduler_options={"poll_journal": 0.2},
    )  # fmt: skip
    service.start()
    journal = Journal.in_state_dir(tmp_path / "state")
    try:
        write_dataset(drop / "long", {"note.txt": "n"})
        wait_for(lambda: any(d.stage == "monitor" for d in journal.datasets()), timeout=30)
        assert cli(["cancel", "long", "--state", str(tmp_path / "state"), "--wait", "20"]) == 0
        out = capsys.readouterr().out
        assert "the running agent" in out and "long: cancelled" in out
    finally:
        service.stop()
    assert vip_server.state.running() == 0


def test_rerun_done_dataset_through_cli(tmp_path: Path) -> None:
    """A done dataset (its job.yaml since fixed) runs again as a new attempt: `rerun #ID`, `retry --again`."""
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    folder = write_dataset(tmp_path / "drop" / "g", {"a.txt": "1"})
    gid = journal.add_dataset(name="g", path=str(folder), server="http://x:1", output_root="/o", stage="done")
    result = run_agent("retry", "g", "--state", str(state), api_key="k", cwd=tmp_path)
    assert result.returncode == 1 and "vip-agent rerun" in result.stderr
    result = run_agent("rerun", f"#{gid}", "--state", str(state), api_key="k", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"#{gid} g: queued again (attempt 2)" in result.stdout
    g = journal.get(gid)
    assert g.stage == "validate" and g.attempts == 1 and g.fingerprint
    # not finished yet: neither rerun nor retry --again may start it twice
    result = run_agent("retry", "--again", "g", "--state", str(state), api_key="k", cwd=tmp_path)
    assert result.returncode == 1 and "wait until it has finished" in result.stderr
    journal.set_stage(gid, "failed", error="boom")
    result = run_agent("retry", "--again", "g", "--state", str(state), api_key="k", cwd=tmp_path)
    assert result.returncode == 0 and journal.get(gid).attempts == 2
    result = run_agent("rerun", "#999", "--state", str(state), api_key="k", cwd=tmp_path)
    assert result.returncode == 1 and "no dataset with id #999" in result.stderr


def test_a_failed_status_write_leaves_no_hidden_file(tmp_path: Path) -> None:
    """Issue 17 #22: a disk-full episode leaves no ``.STATUS.json.<pid>-<tid>.tmp`` (nor a
    log's) in the output folder: the failed write removes its own, the next one sweeps
    what a dead writer or a failed one of ours left."""
    import errno
    import threading

    from agenthelpers import tmpfs

    from agent.fsutil import write_atomic

    folder = tmp_path / "out"
    folder.mkdir()
    with tmpfs(folder, "size=64k", "needs root to mount a small tmpfs (a real full disk)"):
        status = folder / "STATUS.json"
        write_atomic(status, "{}")
        (folder / "logs").mkdir()
        filler = folder / "filler"
        with pytest.raises(OSError) as caught:
            filler.write_bytes(b"x" * 200_000)
        assert caught.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            write_atomic(status, "y" * 100_000)
        with pytest.raises(OSError):
            write_atomic(folder / "logs" / "job0.stdout.txt", "z" * 100_000)
        assert sorted(p.name for p in folder.rglob(".*")) == []
        assert status.read_text() == "{}"  # the old file stays whole
        # leftovers of our naming: a dead process's, and one of a thread of ours that is gone
        gone = threading.Thread(target=lambda: None)
        gone.start()
        gone.join()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        filler.unlink()
        (folder / f".STATUS.json.{dead}-1.tmp").write_text("old")
        (folder / "logs" / f".job0.stdout.txt.{os.getpid()}-{gone.ident}.tmp").write_text("old")
        (folder / ".keep.me.tmp").write_text("not ours")
        write_atomic(status, '{"state": "done"}')
        write_atomic(folder / "logs" / "job0.stdout.txt", "out\n")
        assert sorted(p.name for p in folder.rglob(".*")) == [".keep.me.tmp"]
        assert status.read_text() == '{"state": "done"}'


def test_status_shows_only_current_figures(tmp_path: Path) -> None:
    """Issue 17 #5 and #7: an upload's figures are not shown while downloading nor after the
    end; a transfer nobody moves (no agent) says it is stopped, without rate or time left;
    the ERROR column breaks a long path at a '/', never mid-word."""
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    ids: dict[str, int] = {}
    long_dir = "/data/" + "/".join(f"instrument-{i:02d}-acquisitions" for i in range(4))
    for name, stage, fields in (
        ("up", "upload", {"progress": {"kind": "upload", "done": 78_000_000, "total": 300_000_000,
                                        "rate": 20_000_000.0, "eta": 14.0}}),
        ("dl", "mirror", {"progress": {"kind": "upload", "done": 300_000_000, "total": 300_000_000,
                                        "rate": 77_000_000.0}}),
        ("fin", "done", {"progress": {"kind": "download", "done": 349, "total": 698}}),
        ("bad", "failed", {"error": f"could not write {long_dir}/STATUS.json: No space left on device"}),
    ):  # fmt: skip
        ids[name] = journal.add_dataset(
            name=name, path=f"/drop/{name}", server="http://127.0.0.1:9", output_root="/out",
            fingerprint=f"fp-{name}", drop_dir="/drop", stage=stage,
        )  # fmt: skip
        journal.update(ids[name], **fields)
    with journal._db() as db:  # the agent stopped a minute ago: nothing was updated since
        db.execute("UPDATE datasets SET updated = updated - 60 WHERE id = ?", (ids["up"],))
    done = run_agent("status", "--state", str(state), api_key="unused", cwd=tmp_path, COLUMNS="100")
    assert done.returncode == 0, done.stderr
    table = done.stdout
    rows = {line.split()[1]: line for line in table.splitlines() if line.startswith("#")}
    assert "stopped at 26% of 300 MB: no agent" in rows["up"], table
    assert "left" not in rows["up"] and "/s" not in rows["up"], table
    assert "100% of" not in rows["dl"] and "77 MB/s" not in table, table
    assert "349" not in table and "50%" not in rows["fin"], table
    # the error wraps at spaces, and its path (longer than the column) at '/' only
    error_lines = [line.strip() for line in table.splitlines() if line.startswith("    ")]
    assert "".join(p for p in error_lines if p.startswith("/")) == f"{long_dir}/STATUS.json:", error_lines
    assert error_lines[0] == "could not write" and error_lines[-1] == "No space left on device", error_lines
    records = {r["name"]: r for r in json.loads(run_agent(
        "status", "--json", "--state", str(state), api_key="unused", cwd=tmp_path).stdout)}  # fmt: skip
    assert records["fin"]["progress"] is None and records["dl"]["progress"] is None
    assert records["up"]["progress"]["done"] == 78_000_000


def test_finished_status_json_carries_no_transfer_figures(tmp_path: Path, vip_server: LocalVip) -> None:
    """Issue 17 #5: a finished dataset's STATUS.json has no progress left over from its
    last transfer (a demo's said 'done: 349, total: 698' after it ended)."""
    ds = write_dataset(tmp_path / "drop" / "small", {"data.txt": "one two\n"},
                       {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}})  # fmt: skip
    done = run_agent("run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
                     "--output", str(tmp_path / "out"), "--poll", "0.1",
                     api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    status = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "STATUS.json").read_text())
    assert status["state"] == "done" and status["progress"] is None, status
