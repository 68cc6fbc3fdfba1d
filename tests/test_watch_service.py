"""The watch service end to end: real observers, real runner, real local VIP server.

Settle times are 0.3-0.5 s and the server's FileStats pipeline is fast, so the
whole file runs in well under a minute. Waiting is always a poll with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthelpers import agent_env, wait_for, write_dataset

from agent.config import Limits, Readiness, config_from_args
from agent.daemon import WatchService
from agent.journal import Journal
from agent.localvip import LocalVip
from agent.watch.after import ERROR_FILE

TEMPLATE = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VIP_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)


def make_drop(tmp_path: Path) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump(TEMPLATE), encoding="utf-8")
    return drop


def make_service(
    tmp_path: Path, server: LocalVip, drop: Path, *, settle: float = 0.3,
    readiness: Readiness | None = None, max_running: int = 1, observer: str = "auto",
    **drop_fields: Any,
) -> WatchService:  # fmt: skip
    config = config_from_args(
        drop, server=server.url, output=tmp_path / "out", state=tmp_path / "state", settle=settle,
        observer=observer,
    )  # fmt: skip
    d = config.drops[0]
    d = replace(
        d, readiness=readiness or d.readiness, limits=Limits(2, 2, max_running),
        poll_interval=0.1, **drop_fields,
    )  # fmt: skip
    config = replace(config, drops=(d,))
    return WatchService(
        config,
        debounce=0.05,
        runner_options={"poll_min": 0.05, "poll_max": 0.3},
        scheduler_options={"poll_journal": 0.2, "auth_retry": (0.2, 1.0)},
        client_options={"retries": 1, "backoff": 0.1},
        grace=1.0,
    )


def journal_of(tmp_path: Path) -> Journal:
    return Journal.in_state_dir(tmp_path / "state")


def finished(journal: Journal, n: int) -> bool:
    rows = journal.datasets()
    return len(rows) >= n and all(d.final for d in rows)


def server_names(server: LocalVip) -> Counter[str]:
    return Counter(row[0] for row in server.state.query("SELECT name FROM executions"))


def status_json(tmp_path: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--state", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=30, env=agent_env("unused"), check=True,
    )  # fmt: skip
    return {r["name"]: r for r in json.loads(out.stdout)}


def report_sha(journal: Journal, name: str) -> str:
    (ds,) = [d for d in journal.find(name=name) if d.stage == "done"]
    (report,) = Path(ds.output_dir or "").rglob("report.json")
    return str(json.loads(report.read_text())["sha256"])


@pytest.mark.parametrize("observer", ["native", "polling"])
def test_slow_instrument_writer_is_not_taken_early(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch, observer: str
) -> None:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    service = make_service(tmp_path, vip_server, drop, settle=0.5, observer=observer)
    service.start()
    journal = journal_of(tmp_path)
    pieces = [f"line {i}\n".encode() * 50 for i in range(8)]
    done_writing: list[float] = []

    def instrument() -> None:
        target = drop / "subject-1" / "data.txt"
        target.parent.mkdir()
        with target.open("ab") as fh:
            for piece in pieces:
                fh.write(piece)
                fh.flush()
                time.sleep(0.15)  # the instrument's pace, shorter than the quiet period
        done_writing.append(time.time())

    writer = threading.Thread(target=instrument)
    writer.start()
    try:
        wait_for(lambda: finished(journal, 1) and done_writing, timeout=30)
    finally:
        writer.join()
        service.stop()
    (ds,) = journal.datasets()
    assert ds.stage == "done", ds.error
    taken = [e.time for e in journal.events(ds.id) if e.message.startswith("complete")]
    assert taken and taken[0] >= done_writing[0]
    assert report_sha(journal, "subject-1") == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_marker_dataset_waits_for_its_marker(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    service = make_service(
        tmp_path, vip_server, drop, readiness=Readiness(rule="marker", marker="READY", stale_after=0)
    )
    service.start()
    journal = journal_of(tmp_path)
    try:
        write_dataset(drop / "plate-1", {"data.txt": "a b c\n"})
        wait_for(lambda: journal.find(name="plate-1"), timeout=10)
        deadline = time.monotonic() + 1.0  # far longer than any settle time used here
        while time.monotonic() < deadline:
            assert journal.find(name="plate-1")[0].stage == "waiting"
            time.sleep(0.1)
        rec = status_json(tmp_path)["plate-1"]
        assert rec["state"] == "waiting" and "READY" in rec["progress"]["reason"]
        (drop / "plate-1" / "READY").write_text("")
        wait_for(lambda: finished(journal, 1), timeout=30)
    finally:
        service.stop()
    (ds,) = journal.datasets()
    assert ds.stage == "done", ds.error
    # the marker is not an input: only data.txt went to the server
    assert [f.rel for f in journal.files(ds.id)] == ["data.txt"]


def test_restart_runs_nothing_twice_and_new_content_runs_again(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    for i in range(6):  # dropped while no agent runs
        write_dataset(drop / f"s{i}", {"data.txt": f"subject {i}\n"})
    journal = journal_of(tmp_path)
    first = make_service(tmp_path, vip_server, drop)
    first.start()
    try:
        # stop in the middle: some done, some not
        wait_for(lambda: sum(d.stage == "done" for d in journal.datasets()) >= 2, timeout=30)
    finally:
        first.stop()
    middle = {d.name: d.stage for d in journal.datasets()}
    assert any(s != "done" for s in middle.values()), middle

    second = make_service(tmp_path, vip_server, drop)
    second.start()
    try:
        wait_for(lambda: finished(journal, 6), timeout=40)
        # same name, new content: a new run; a brand-new dataset too
        (drop / "s0" / "data.txt").write_text("subject 0, corrected\n")
        write_dataset(drop / "s6", {"data.txt": "subject 6\n"})
        wait_for(lambda: finished(journal, 8), timeout=30)
    finally:
        second.stop()
    third = make_service(tmp_path, vip_server, drop)  # a restart with everything done
    third.start()
    third.stop()
    rows = journal.datasets()
    assert all(d.stage == "done" for d in rows), [(d.name, d.error) for d in rows]
    per_name = Counter(d.name for d in rows)
    assert per_name == Counter({f"s{i}": 1 for i in range(1, 7)} | {"s0": 2})
    # on the server: exactly one execution per (dataset, content)
    names = server_names(vip_server)
    assert len(names) == 8 and set(names.values()) == {1}
    assert report_sha(journal, "s6") == hashlib.sha256(b"subject 6\n").hexdigest()
    s0 = [d for d in rows if d.name == "s0"]
    assert s0[0].fingerprint != s0[1].fingerprint


def test_fifty_datasets_with_cap_and_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 2
    with LocalVip(tmp_path / "vip", max_running=cap) as server:
        monkeypatch.setenv("VIP_API_KEY", server.api_key)
        drop = make_drop(tmp_path)
        service = make_service(tmp_path, server, drop, max_running=cap)
        journal = journal_of(tmp_path)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                peak[0] = max(peak[0], server.state.running())

        sampler = threading.Thread(target=sample)
        sampler.start()
        service.start()
        try:
            for i in range(50):  # dropped at once, while the agent runs
                write_dataset(drop / f"d{i:02}", {"data.txt": f"dataset {i}\n" * (i + 1)})
            wait_for(lambda: finished(journal, 50), timeout=80)
        finally:
            stop.set()
            sampler.join()
            service.stop()
        rows = journal.datasets()
        assert len(rows) == 50 and all(d.stage == "done" for d in rows), [d.error for d in rows if d.error]
        assert 1 <= peak[0] <= cap
        assert len(server_names(server)) == 50

    def stage_times(ds_id: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in journal.events(ds_id):
            if e.stage and e.stage not in out:
                out[e.stage] = e.time
        return out

    times = {d.id: stage_times(d.id) for d in rows}
    uploads = [(i, t["upload"], t["launch"]) for i, t in times.items()]
    runs = [(i, t["monitor"], t["mirror"]) for i, t in times.items()]
    overlapping = sum(
        1 for (u, u0, u1) in uploads
        if any(r != u and u0 < r1 and r0 < u1 for (r, r0, r1) in runs)
    )  # fmt: skip
    assert overlapping >= 5, "uploads should proceed while other datasets run"


def test_bad_job_fails_alone_then_retry(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.cli import main as cli_main

    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    write_dataset(drop / "good-1", {"data.txt": "1\n"})
    write_dataset(drop / "bad", {"data.txt": "2\n", "job.yaml": "pipeline: FileStats/1.0\nrunz: 2\n"})
    write_dataset(drop / "good-2", {"data.txt": "3\n"})
    journal = journal_of(tmp_path)
    service = make_service(tmp_path, vip_server, drop)
    service.start()
    try:
        wait_for(lambda: finished(journal, 3), timeout=30)
        states = {d.name: d.stage for d in journal.datasets()}
        assert states == {"good-1": "done", "good-2": "done", "bad": "failed"}
        report = wait_for(lambda: (drop / "bad" / ERROR_FILE).is_file() and drop / "bad" / ERROR_FILE)
        text = report.read_text()
        assert "runz" in text and "vip-agent retry bad" in text
        rec = status_json(tmp_path)
        assert rec["bad"]["state"] == "failed" and "runz" in rec["bad"]["error"]
        assert rec["good-1"]["state"] == "done" and rec["good-1"]["executions"]

        # fix the job file, retry: the running agent picks it up
        write_dataset(drop / "bad", {"job.yaml": "pipeline: FileStats/1.0\nruns: 1\n"})
        assert cli_main(["retry", "bad", "--state", str(tmp_path / "state")]) == 0
        wait_for(lambda: journal.find(name="bad")[0].stage == "done", timeout=30)
    finally:
        service.stop()
    (bad,) = journal.find(name="bad")
    assert bad.attempts == 1 and not (drop / "bad" / ERROR_FILE).exists()
    assert len(journal.datasets()) == 3


def test_refused_key_pauses_then_resumes(tmp_path: Path, vip_server: LocalVip) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("not-the-right-key-123\n")
    key_file.chmod(0o600)
    drop = make_drop(tmp_path)
    service = make_service(tmp_path, vip_server, drop, key_file=key_file)
    service.provider.key_files = {vip_server.url: key_file}  # type: ignore[union-attr]
    service.start()
    journal = journal_of(tmp_path)
    try:
        write_dataset(drop / "s1", {"data.txt": "x\n"})
        write_dataset(drop / "s2", {"data.txt": "y\n"})
        wait_for(
            lambda: len(journal.datasets()) == 2
            and all(d.state == "paused" for d in journal.datasets()),
            timeout=20,
        )
        recs = status_json(tmp_path)
        assert {r["state"] for r in recs.values()} == {"paused"}
        assert "refused" in recs["s1"]["error"]
        assert not any(d.final for d in journal.datasets())
        key_file.write_text(vip_server.api_key + "\n")  # the operator fixes the key
        wait_for(lambda: finished(journal, 2), timeout=30)
    finally:
        service.stop()
    assert all(d.stage == "done" and not d.paused for d in journal.datasets())


def test_service_process_signals(tmp_path: Path, vip_server: LocalVip) -> None:
    drop = make_drop(tmp_path)
    # a job that outlasts the test, so the agent is still polling it when SIGTERM comes
    (drop / "job.yaml").write_text(
        yaml.safe_dump({"pipeline": "Sleep/1.0", "inputs": {"duration": 60}}), encoding="utf-8"
    )
    state = tmp_path / "state"
    env = agent_env(vip_server.api_key)
    log_file = tmp_path / "agent.log"
    log_fh = log_file.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "watch", str(drop), "--server", vip_server.url,
         "--output", str(tmp_path / "out"), "--state", str(state), "--settle", "0.3"],
        env=env, stdout=subprocess.PIPE, stderr=log_fh, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        journal = Journal.in_state_dir(state)
        write_dataset(drop / "s1", {"data.txt": "z\n"})
        # work in flight: the execution runs, the agent polls it
        wait_for(lambda: any(d.stage == "monitor" for d in journal.datasets()), timeout=30)
        # a second agent on the same state folder is refused
        other = subprocess.run(
            [sys.executable, "-m", "agent", "watch", str(drop), "--server", vip_server.url,
             "--state", str(state)],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert other.returncode == 1 and "already uses the state folder" in other.stderr
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "checking keys again" in log_file.read_text(), timeout=10)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        log_fh.close()
    err = log_file.read_text()
    assert proc.returncode == 0, err
    assert "stopping on SIGTERM" in err and "checking keys again" in err
    assert vip_server.api_key not in err + out
    assert "from environment VIP_API_KEY" in err
    # the journal is consistent and resumable: the dataset is still "running"
    assert {r["state"] for r in status_json(tmp_path).values()} == {"running"}


@pytest.mark.parametrize("after", ["archive", "delete"])
def test_after_archive_or_delete(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    archive = drop / "_archive"
    (archive / "s1").mkdir(parents=True)  # taken already: never overwritten
    service = make_service(
        tmp_path, vip_server, drop, after=after, archive_dir=archive, failed_dir=drop / "_failed"
    )
    service.start()
    journal = journal_of(tmp_path)
    try:
        write_dataset(drop / "s1", {"data.txt": "keep me\n"})
        # the journal records the move (or the delete) right after it: wait for that record
        wait_for(
            lambda: finished(journal, 1)
            and any(
                "moved to the archive folder" in e.message
                or "deleted from the drop folder" in e.message
                for e in journal.events(journal.datasets()[0].id)
            ),
            timeout=30,
        )
        assert not (drop / "s1").exists()
    finally:
        service.stop()
    (ds,) = journal.datasets()
    assert ds.stage == "done"
    if after == "archive":
        assert (archive / "s1-1" / "data.txt").read_text() == "keep me\n"
        assert ds.path == str(archive / "s1-1")
    else:
        assert not (archive / "s1-1").exists()
        assert any("deleted from the drop folder" in e.message for e in journal.events(ds.id))
    assert list((archive / "s1").iterdir()) == []
    assert len(journal.datasets()) == 1  # the archive is not a drop folder


def test_one_file_per_dataset_runs_each_file_alone(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``datasets: files``: each acquisition file is its own dataset, named after it."""
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = tmp_path / "drop"
    drop.mkdir()
    # the template names the input by pattern; only the dataset's own file is in scope
    (drop / "job.yaml").write_text(
        yaml.safe_dump({"pipeline": "FileStats/1.0", "inputs": {"input_file": "*.txt"}}),
        encoding="utf-8",
    )
    service = make_service(tmp_path, vip_server, drop, datasets="files", pattern="*.txt")
    service.start()
    journal = journal_of(tmp_path)
    contents = {"scan-a": b"first acquisition\n", "scan-b": b"second\nacquisition\n"}
    try:
        for stem, data in contents.items():
            (drop / f"{stem}.txt").write_bytes(data)
        (drop / "notes.md").write_text("not an acquisition")  # does not match the pattern
        wait_for(lambda: finished(journal, 2), timeout=30)
    finally:
        service.stop()
    assert sorted(d.name for d in journal.datasets()) == ["scan-a", "scan-b"]
    for stem, data in contents.items():
        assert report_sha(journal, stem) == hashlib.sha256(data).hexdigest()
        (ds,) = journal.find(name=stem)
        assert [f.rel for f in journal.files(ds.id)] == [f"{stem}.txt"]  # only its own file
