"""One agent per drop folder (issue 17 item 17): the claim file, on real folders, and two real
`vip-agent watch` processes with different state folders on one drop folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from agenthelpers import run_agent, wait_for, watch_process, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip
from agent.watch.claim import CLAIM_NAME, CLAIM_TTL, DropClaim, read_claim

TEMPLATE = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_claim_is_taken_renewed_and_released(tmp_path: Path) -> None:
    mine = DropClaim(tmp_path, agent_id="aaaa1111", state=tmp_path / "state-a")
    assert mine.take() is None and mine.held
    claim = read_claim(tmp_path)
    assert claim is not None and claim.agent_id == "aaaa1111" and claim.pid == os.getpid()
    assert claim.state == str(tmp_path / "state-a")
    assert mine.renew() is None and mine.take() is None  # its own claim: kept
    renewed = read_claim(tmp_path)
    assert renewed is not None and renewed.beat >= claim.beat and renewed.since == claim.since
    mine.release()
    assert not (tmp_path / CLAIM_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left behind


def test_another_live_agent_keeps_its_claim(tmp_path: Path) -> None:
    first = DropClaim(tmp_path, agent_id="aaaa1111", state=tmp_path / "state-a")
    second = DropClaim(tmp_path, agent_id="bbbb2222", state=tmp_path / "state-b")
    assert first.take() is None
    other = second.take()
    assert other is not None and other.agent_id == "aaaa1111" and not second.held
    assert "agent aaaa1111 on" in other.describe() and str(tmp_path / "state-a") in other.describe()
    second.release()  # not its claim: left alone
    assert read_claim(tmp_path) == other


def test_a_dead_agents_claim_is_taken_over(tmp_path: Path) -> None:
    gone = DropClaim(tmp_path, agent_id="aaaa1111", state=tmp_path / "state-a")
    gone.me = replace(gone.me, pid=dead_pid())  # it was SIGKILLed: its claim stays behind
    assert gone.take() is None
    second = DropClaim(tmp_path, agent_id="bbbb2222", state=tmp_path / "state-b")
    assert second.take() is None
    claim = read_claim(tmp_path)
    assert claim is not None and claim.agent_id == "bbbb2222"
    # the first agent, if it were alive after all, sees it lost the folder at its heartbeat
    assert gone.renew() is not None and not gone.held


def test_another_hosts_claim_lives_as_long_as_its_heartbeat(tmp_path: Path) -> None:
    now = time.time()
    remote = {"agent_id": "cccc3333", "host": "scanner-pc", "pid": 4242, "started": None,
              "state": "/var/lib/vip-agent", "since": now - 3600, "beat": now - 5}  # fmt: skip
    (tmp_path / CLAIM_NAME).write_text(json.dumps(remote), encoding="utf-8")
    mine = DropClaim(tmp_path, agent_id="aaaa1111", state=tmp_path / "state-a")
    other = mine.take()
    assert other is not None and other.host == "scanner-pc"
    remote["beat"] = now - CLAIM_TTL - 1  # that PC stopped renewing it
    (tmp_path / CLAIM_NAME).write_text(json.dumps(remote), encoding="utf-8")
    assert mine.take() is None
    claim = read_claim(tmp_path)
    assert claim is not None and asdict(claim)["agent_id"] == "aaaa1111"


def test_a_torn_claim_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / CLAIM_NAME).write_text("{not json", encoding="utf-8")
    mine = DropClaim(tmp_path, agent_id="aaaa1111", state=tmp_path / "state-a")
    assert mine.take() is None and read_claim(tmp_path) is not None


@contextmanager
def watch(tmp_path: Path, server: LocalVip, name: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    log_file = tmp_path / f"{name}.log"
    args = [str(tmp_path / "drop"), "--server", server.url, "--output", str(tmp_path / "out"),
            "--state", str(tmp_path / f"state-{name}"), "--settle", "0.3"]  # fmt: skip
    with watch_process(args, api_key=server.api_key, cwd=tmp_path, log=log_file, what=f"{name} ready") as proc:
        yield proc, log_file


def test_two_agents_on_one_drop_folder_one_takes_it_the_other_says_so(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump(TEMPLATE), encoding="utf-8")
    with watch(tmp_path, vip_server, "a") as (a, log_a):
        a_id = Journal.in_state_dir(tmp_path / "state-a").agent_id()
        with watch(tmp_path, vip_server, "b") as (b, log_b):
            line = wait_for(lambda: [x for x in log_b.read_text().splitlines() if "claimed by" in x],
                            timeout=30, what="b reports the claim")  # fmt: skip
            assert len(line) == 1 and f"agent {a_id} on" in line[0] and f"pid {a.pid}" in line[0]
            assert "WARNING" in line[0]
            status = run_agent("status", "--state", str(tmp_path / "state-b"),
                               api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
            assert f"drop folder {drop}: CLAIMED" in status.stdout, status.stdout
            for name in ("s1", "s2"):
                write_dataset(drop / name, {"data.txt": f"{name}\n"})
            wait_for(lambda: "s1: done" in log_a.read_text() and "s2: done" in log_a.read_text(),
                     timeout=90, what="a runs both")  # fmt: skip
            assert Journal.in_state_dir(tmp_path / "state-b").datasets() == []
            assert vip_server.stats.counts["POST /executions"] == 2
            # by hand, with b's state folder: refused too, naming a
            write_dataset(drop / "s9", {"data.txt": "s9\n"})
            by_hand = run_agent("run", str(drop / "s9"), "--server", vip_server.url,
                                "--state", str(tmp_path / "state-b"),
                                api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
            assert by_hand.returncode == 75, by_hand.stderr
            assert "claimed by another vip-agent" in by_hand.stderr and f"pid {a.pid}" in by_hand.stderr
            wait_for(lambda: "s9: done" in log_a.read_text(), timeout=90, what="a runs s9")
            # a dies without releasing its claim; b takes the folder at its next look (SIGHUP:
            # at once) and, seeing s1 and s2 mirrored already, runs neither again
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=10)
            b.send_signal(signal.SIGHUP)
            wait_for(lambda: "watching" in log_b.read_text(), timeout=30, what="b watches drop")
            write_dataset(drop / "s3", {"data.txt": "s3\n"})
            wait_for(lambda: "s3: done" in log_b.read_text(), timeout=90, what="b runs s3")
            log = log_b.read_text()
            claim = read_claim(drop)
    assert claim is not None and claim.state == str(tmp_path / "state-b")
    assert "s1: already done" in log and "s2: already done" in log and "s9: already done" in log
    assert vip_server.stats.counts["POST /executions"] == 4
    assert "Traceback" not in log + log_a.read_text()
    assert not (drop / CLAIM_NAME).exists()  # b released it when it stopped


def test_doctor_warns_about_a_drop_folder_another_agent_claimed(tmp_path: Path) -> None:
    import io

    from agent.doctor import Report, check_claims

    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    mine = Journal.in_state_dir(state)
    other = DropClaim(drop, agent_id="dddd4444", state=tmp_path / "elsewhere")
    assert other.take() is None
    report = Report(io.StringIO())
    check_claims(report, state, [drop])
    (check,) = report.checks
    assert check.status == "WARN" and "claimed by another vip-agent: agent dddd4444" in check.title
    assert "stop one of the two agents" in check.fix
    other.release()
    ours = DropClaim(drop, agent_id=mine.agent_id(), state=state)  # this state folder's own claim
    assert ours.take() is None
    report = Report(io.StringIO())
    check_claims(report, state, [drop])
    assert report.checks == []


def test_two_agents_never_share_a_remote_session_and_a_resumed_plan_keeps_its_name(
    tmp_path: Path,
) -> None:
    from agenthelpers import drive, start_runner

    from agent.backend.memory import MemoryBackend

    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}
    ds = write_dataset(tmp_path / "share" / "subject", {"data.txt": "x\n"}, job)
    backend = MemoryBackend()  # one VIP account, seen by two agents misconfigured alike
    sessions = []
    for agent in ("pc1", "pc2"):
        started = start_runner(tmp_path / agent, ds, backend, poll_min=1.0, poll_max=5.0)
        outcome = drive(started.runner, started.dataset_id, sleep=backend.clock.advance, timeout=20)
        row = started.journal.get(started.dataset_id)
        assert outcome.stage == "done", row.error
        assert row.session is not None and started.journal.agent_id() in row.session
        sessions.append(row.remote_root)
    assert sessions[0] != sessions[1]
    # a plan made before (by an older release, or before a crash): its name is kept
    started = start_runner(tmp_path / "pc3", ds, backend, poll_min=1.0, poll_max=5.0)
    started.journal.update(started.dataset_id, session="subject-kept")
    drive(started.runner, started.dataset_id, sleep=backend.clock.advance, timeout=20)
    assert started.journal.get(started.dataset_id).session == "subject-kept"
