"""Outputs above VIP's direct-transfer limit, through the real CLI and the local server.

One execution writes a 20 MB archive (two 10 MB random inputs concatenated, so
gzip cannot shrink it) against localvip's default 15 MB ``maxSizeDirectTransfer``;
a second execution writes a small one. The dataset must end ``incomplete`` with
everything else mirrored, then ``retry`` (after the server's limit is raised)
fetches only the big file, or ``cancel --discard`` deletes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import run_agent, wait_for, write_dataset

from agent.journal import Journal
from agent.leftovers import LEFT_FILE
from agent.localvip import LocalVip
from agent.vip.client import VipClient

BIG = 10_000_000  # two of them: a 20 MB output
JOB = {
    "pipeline": "ConcatFiles/1.0",
    "inputs": {"output_name": "joined"},
    "variants": {"big": {"inputs": {"files": ["big/*"]}}, "small": {"inputs": {"files": ["small/*"]}}},
}


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)


def big_dataset(folder: Path, job: dict[str, Any] | None = JOB) -> Path:
    return write_dataset(
        folder,
        {"big/a.bin": os.urandom(BIG), "big/b.bin": os.urandom(BIG), "small/c.txt": "hello\n"},
        job,
    )


def agent(server: LocalVip, tmp_path: Path, *args: str) -> Any:
    return run_agent(*args, api_key=server.api_key, cwd=tmp_path)


def run_cmd(server: LocalVip, tmp_path: Path, ds: Path, *extra: str) -> Any:
    return agent(
        server, tmp_path, "run", str(ds), "--server", server.url, "--state", str(tmp_path / "state"),
        "--output", str(tmp_path / "out"), "--poll", "0.1", *extra,
    )  # fmt: skip


def status_of(server: LocalVip, tmp_path: Path, name: str) -> dict[str, Any]:
    result = agent(server, tmp_path, "status", "--json", "--state", str(tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    (rec,) = [r for r in json.loads(result.stdout) if r["name"] == name]
    return dict(rec)


def server_files(server: LocalVip) -> set[str]:
    """Every file under the user's /vip/Home on the server, as VIP paths."""
    client = VipClient(server.url, server.api_key)
    found: set[str] = set()
    todo = ["/vip/Home"]
    while todo:
        for entry in client.list(todo.pop()):
            if entry.is_dir:
                todo.append(entry.path)
            else:
                found.add(entry.path)
    return found


def check_incomplete(server: LocalVip, tmp_path: Path, name: str) -> tuple[str, Path]:
    """The shape of an incomplete dataset; returns the big output's VIP path and local folder."""
    journal = Journal.in_state_dir(tmp_path / "state")
    (ds,) = journal.find(name=name)
    assert ds.stage == "incomplete", ds.error
    assert status_of(server, tmp_path, name)["state"] == "incomplete"
    out = Path(ds.output_dir or "")
    (big,) = [o for o in journal.outputs(ds.id) if not o.downloaded]
    assert big.size is not None and big.size > 15_000_000
    # the list names the file's VIP path, its size and both ways to get it
    text = (out / LEFT_FILE).read_text()
    assert big.remote in text and f"{big.size:,}" in text
    assert f"vip-agent retry {name}" in text and "portal" in text
    assert f"vip-agent cancel {name} --discard" in text
    # on the server: the big file only (inputs and mirrored copies deleted)
    assert server_files(server) == {big.remote}
    # everything else is mirrored (and extracted)
    assert (next(out.glob("small-r1/*/concat/joined.tgz")) / "concatenated.txt").read_text() == (
        "hello\n"
    )
    assert not Path(big.local).exists()
    status = json.loads((out / "STATUS.json").read_text())
    assert status["state"] == "incomplete" and LEFT_FILE in status["error"]
    # session_data.json says what the server still holds
    session = json.loads((out / "session_data.json").read_text())
    listed = {
        o["path"]: o["exists"] for w in session["workflows"].values() for o in w["outputs"]
    }
    assert listed[big.remote] is True
    # the small one is gone: its execution was deleted ("Removed", listing no outputs, so that
    # VipSession does not ask VIP about it) and its file is among what cleanup removed
    assert any(w["status"] == "Removed" and not w["outputs"] for w in session["workflows"].values())
    assert any("/small-r1/" in p for p in session["removed_from_vip"]["paths"]), session
    return big.remote, out


def test_run_incomplete_then_retry_fetches_only_what_is_missing(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    ds = big_dataset(tmp_path / "drop" / "big-1")
    result = run_cmd(vip_server, tmp_path, ds)
    assert result.returncode == 3, result.stderr
    assert "incomplete" in result.stderr and LEFT_FILE in result.stderr
    remote, out = check_incomplete(vip_server, tmp_path, "big-1")
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert vip_server.downloads[remote] == 0
    before = dict(vip_server.downloads)

    # the limit is not raised yet: retry, then run, leaves it incomplete, nothing fetched
    retry = agent(vip_server, tmp_path, "retry", "big-1", "--state", str(tmp_path / "state"))
    assert retry.returncode == 0 and "vip-agent run" in retry.stdout, retry.stdout + retry.stderr
    again = run_cmd(vip_server, tmp_path, ds)
    assert again.returncode == 3, again.stderr
    assert dict(vip_server.downloads) == before

    vip_server.max_download = 30_000_000
    again = run_cmd(vip_server, tmp_path, ds)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == str(out)
    # only the missing file was fetched; nothing was downloaded twice
    assert vip_server.downloads[remote] == 1
    assert {k: v for k, v in vip_server.downloads.items() if k != remote} == before
    assert all(n == 1 for n in vip_server.downloads.values())
    big = next(out.glob("big-r1/*/concat/joined.tgz"))
    assert (big / "concatenated.txt").stat().st_size == 2 * BIG
    assert not (out / LEFT_FILE).exists()
    assert status_of(vip_server, tmp_path, "big-1")["state"] == "done"
    # the server is clean and session_data.json says so
    assert server_files(vip_server) == set()
    assert VipClient(vip_server.url, vip_server.api_key).executions() == []
    session = json.loads((out / "session_data.json").read_text())
    assert {w["status"] for w in session["workflows"].values()} == {"Removed"}


def test_cancel_discard_deletes_what_was_left(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = big_dataset(tmp_path / "drop" / "big-2")
    assert run_cmd(vip_server, tmp_path, ds).returncode == 3
    remote, out = check_incomplete(vip_server, tmp_path, "big-2")
    state = ("--state", str(tmp_path / "state"))
    # without --discard nothing is deleted: it says how
    plain = agent(vip_server, tmp_path, "cancel", "big-2", *state)
    assert plain.returncode == 1 and "--discard" in plain.stdout
    assert server_files(vip_server) == {remote}
    discard = agent(vip_server, tmp_path, "cancel", "big-2", "--discard", *state)
    assert discard.returncode == 0, discard.stdout + discard.stderr
    assert "cancelled" in discard.stdout
    assert server_files(vip_server) == set()
    assert VipClient(vip_server.url, vip_server.api_key).executions() == []
    assert not (out / LEFT_FILE).exists()
    assert (out / "small-r1").is_dir()  # what was mirrored stays
    assert status_of(vip_server, tmp_path, "big-2")["state"] == "cancelled"
    assert vip_server.downloads[remote] == 0


def test_watch_incomplete_then_retry_through_the_running_agent(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from agent.config import Limits, config_from_args
    from agent.daemon import WatchService

    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = tmp_path / "drop"
    drop.mkdir()
    config = config_from_args(
        drop, server=vip_server.url, output=tmp_path / "out", state=tmp_path / "state", settle=0.3,
    )  # fmt: skip
    config = replace(
        config, drops=(replace(config.drops[0], limits=Limits(2, 2, 2), poll_interval=0.1),)
    )
    service = WatchService(
        config, debounce=0.05, runner_options={"poll_min": 0.05, "poll_max": 0.3},
        scheduler_options={"poll_journal": 0.2}, client_options={"retries": 1, "backoff": 0.1},
        grace=1.0,
    )  # fmt: skip
    service.start()
    try:
        journal = Journal.in_state_dir(tmp_path / "state")
        big_dataset(tmp_path / "incoming" / "big-3")
        os.replace(tmp_path / "incoming" / "big-3", drop / "big-3")
        wait_for(
            lambda: any(d.stage == "incomplete" for d in journal.datasets()), timeout=60,
            what="incomplete",
        )  # fmt: skip
        remote, out = check_incomplete(vip_server, tmp_path, "big-3")
        assert vip_server.downloads[remote] == 0
        # the running agent cached the limit; retry makes it ask the server again
        vip_server.max_download = 30_000_000
        retry = agent(vip_server, tmp_path, "retry", "big-3", "--state", str(tmp_path / "state"))
        assert retry.returncode == 0 and "running agent" in retry.stdout, retry.stdout
        wait_for(
            lambda: journal.find(name="big-3")[0].stage == "done", timeout=60, what="done",
        )  # fmt: skip
    finally:
        service.stop()
    assert vip_server.downloads[remote] == 1
    assert all(n == 1 for n in vip_server.downloads.values())
    assert not (out / LEFT_FILE).exists()
    assert server_files(vip_server) == set()
