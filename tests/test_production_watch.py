"""``vip-agent watch`` against the local server's production behaviours: uploads held back
ahead of the running slot, and issue 16's Done-when run (about twenty datasets under the
production profile, with short staging and result delays and tiny pipelines)."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthelpers import wait_for, write_dataset

from agent.config import load_config
from agent.daemon import WatchService
from agent.journal import UPLOAD_HELD, Journal
from agent.localvip import FaultSpec, LocalVip

#: a pipeline of this test: copies its input file after sleeping (one job per file)
SLOW_COPY = {
    "name": "SlowCopy", "tool-version": "1.0", "schema-version": "0.5",
    "description": "Sleep DURATION seconds, then copy the input file (tests).",
    "command-line": '"$PYTHON" "$DESCRIPTOR_DIR/slowcopy.py" [INPUT_FILE] [DURATION] [OUT]',
    "inputs": [
        {"id": "input_file", "name": "Input", "type": "File", "value-key": "[INPUT_FILE]"},
        {"id": "duration", "name": "Seconds", "type": "Number", "value-key": "[DURATION]"},
    ],
    "output-files": [
        {"id": "copy", "name": "Copy", "path-template": "[INPUT_FILE]_copy.out",
         "path-template-stripped-extensions": [".txt"], "value-key": "[OUT]"},
    ],
}
SLOW_COPY_SCRIPT = (
    "import shutil, sys, time\n"
    "time.sleep(float(sys.argv[2]))\n"
    "shutil.copyfile(sys.argv[1], sys.argv[3])\n"
)


def pipelines_dir(tmp_path: Path) -> Path:
    """A folder with the SlowCopy/1.0 descriptor and its script (``LocalVip(pipelines_dir=)``)."""
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "SlowCopy.json").write_text(json.dumps(SLOW_COPY), encoding="utf-8")
    (folder / "slowcopy.py").write_text(SLOW_COPY_SCRIPT, encoding="utf-8")
    return folder


#: a SlowCopy/1.0 run of 1.5 s on each dataset's note.txt
SLOW_JOB: dict[str, Any] = {"pipeline": "SlowCopy/1.0", "inputs": {"input_file": "note.txt", "duration": 1.5}}


@contextmanager
def _one_slot_vip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalVip]:
    """A LocalVip with one run slot and SlowCopy/1.0; its key in VIP_API_KEY."""
    key = secrets.token_urlsafe(16)
    monkeypatch.setenv("VIP_API_KEY", key)
    with LocalVip(tmp_path / "vip", api_keys=[key], max_running=1,
                  pipelines_dir=pipelines_dir(tmp_path)) as vip:  # fmt: skip
        yield vip


def _slow_copy_drop(tmp_path: Path) -> Path:
    """tmp_path/drop with a job.yaml running SLOW_JOB."""
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump(SLOW_JOB), encoding="utf-8")
    return drop


def _config(tmp_path: Path, drops: list[dict[str, Any]]) -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"drops": drops, "state": str(tmp_path / "state")}))
    return cfg


def _service(cfg: Path) -> WatchService:
    return WatchService(
        load_config(cfg), debounce=0.05, runner_options={"poll_min": 0.05, "poll_max": 0.3},
        scheduler_options={"poll_journal": 0.2}, grace=1.0,
    )  # fmt: skip


def test_uploads_run_ahead_of_the_slot_by_upload_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1, upload_ahead 2, six datasets dropped at once: at most the running dataset, one
    finishing and two uploaded ahead have folders on VIP; the rest wait here, queued with
    the reason; all end done."""
    with _one_slot_vip(tmp_path, monkeypatch) as vip:
        drop = _slow_copy_drop(tmp_path)
        cfg = _config(tmp_path, [{
            "path": str(drop), "server": vip.url, "output": str(tmp_path / "out"),
            "max_running": 1, "max_uploads": 4, "upload_ahead": 2,
            "readiness": {"settle_seconds": 0.2},
        }])  # fmt: skip
        assert load_config(cfg).upload_ahead(vip.url) == 2
        sessions = vip.home() / "vip-agent"
        peak = [0]
        queued_reasons: set[str] = set()
        stop = threading.Event()
        journal = Journal.in_state_dir(tmp_path / "state")

        def sample() -> None:
            while not stop.wait(0.02):
                if sessions.is_dir():
                    peak[0] = max(peak[0], sum(1 for _ in sessions.iterdir()))
                for d in journal.datasets():
                    if d.state == "queued" and (d.error or "").startswith(UPLOAD_HELD):
                        queued_reasons.add(d.error or "")

        service = _service(cfg)
        sampler = threading.Thread(target=sample)
        sampler.start()
        service.start()
        try:
            for i in range(6):
                write_dataset(drop / f"s{i}", {"note.txt": f"subject {i}\n"})
            wait_for(lambda: len(journal.datasets()) == 6 and all(d.final for d in journal.datasets()),
                     timeout=60, what="six datasets done")  # fmt: skip
        finally:
            stop.set()
            sampler.join()
            service.stop()
    rows = journal.datasets()
    assert all(d.stage == "done" for d in rows), [d.error for d in rows]
    # one running + one finishing (mirror/cleanup) + two uploaded ahead; six without the gate
    assert 1 <= peak[0] <= 4, peak[0]
    assert queued_reasons and all("upload_ahead: 2" in r for r in queued_reasons)
    assert not any((d.error or "").startswith(UPLOAD_HELD) for d in rows)


# -- issue 16's Done-when run -------------------------------------------------------------------
def _stage_dataset(root: Path, name: str, files: dict[str, str], job: dict[str, Any]) -> Path:
    """Write a dataset outside the drop folder (it lands there whole, by one rename)."""
    return write_dataset(root / name, dict(files), job)


def test_watch_takes_twenty_datasets_to_the_end_under_the_production_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One watch service, the production profile (short staging, result and landing delays;
    every other behaviour at its documented default): a 50-job execution, 300 small files,
    an input in a group folder, a missing platform-path input and 16 small datasets. The
    missing input fails at validation with nothing sent; every other dataset ends done;
    no execution is launched twice; nothing is left on VIP."""
    from agent import pacer

    # the engine's "try later" backoff is a minute at first: a second here (the refusals
    # and the backoff are what is tested, not its length)
    monkeypatch.setitem(pacer.POLICIES, "engine", pacer.WaitPolicy(base=0.5, cap=2.0, jitter=0.0))
    key = secrets.token_urlsafe(16)
    monkeypatch.setenv("VIP_API_KEY", key)
    faults = FaultSpec.for_profile(
        "production", staging_delay=0.05, results_delay=0.01, transfer_wait=1.0,
        late_landing=0.01, late_landing_delay=0.5, delete_delay=0.3, seed=16,
    )  # fmt: skip
    staging = tmp_path / "staging"
    stats = {"pipeline": "FileStats/1.0"}
    datasets: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
        "jobs50": ({f"in/f{i:02d}.txt": f"file {i}\n" for i in range(50)},
                   {**stats, "inputs": {"input_file": "in/*.txt"}}),
        "files300": ({f"f/{i:03d}.txt": f"{i}\n" for i in range(300)},
                     {"pipeline": "ConcatFiles/1.0", "inputs": {"files": "f/*.txt"}}),
        "grouped": ({"notes.txt": "g\n"},
                    {**stats, "inputs": {"input_file": "/vip/lab (group)/shared/scan.txt"}}),
        "missing": ({"notes.txt": "m\n"},
                    {**stats, "inputs": {"input_file": "/vip/Home/nowhere/scan.txt"}}),
        **{f"small{i:02d}": ({"scan.txt": f"small {i}\n" * (i + 1)},
                             {**stats, "inputs": {"input_file": "scan.txt"}}) for i in range(16)},
    }  # fmt: skip
    for name, (files, job) in datasets.items():
        _stage_dataset(staging, name, files, job)
    with LocalVip(tmp_path / "vip", api_keys=[key], profile="production", faults=faults,
                  groups={"lab": ["user"]}) as vip:  # fmt: skip
        vip.group_dir("lab").joinpath("shared").mkdir(parents=True)
        vip.group_dir("lab").joinpath("shared", "scan.txt").write_text("in the group\n")
        drop = tmp_path / "drop"
        drop.mkdir()
        cfg = _config(tmp_path, [{
            "path": str(drop), "server": vip.url, "output": str(tmp_path / "out"),
            "max_running": 1, "max_uploads": 2, "upload_ahead": 2,
            "readiness": {"settle_seconds": 0.2},
        }])  # fmt: skip
        journal = Journal.in_state_dir(tmp_path / "state")
        service = _service(cfg)
        service.start()
        try:
            for name in datasets:
                (staging / name).rename(drop / name)
            wait_for(lambda: len(journal.datasets()) == len(datasets)
                     and all(d.final for d in journal.datasets()),
                     timeout=110, interval=0.2, what="every dataset final")  # fmt: skip
        finally:
            service.stop()
        rows = {d.name: d for d in journal.datasets()}
        counts = vip.stats_snapshot()["counts"]
        names = [row[0] for row in vip.state.query("SELECT name FROM executions")]
        sessions = vip.home() / "vip-agent"
        leftovers = sorted(p.name for p in sessions.iterdir()) if sessions.is_dir() else []
        group_left = sorted(p.name for p in vip.group_dir("lab").iterdir())
    missing = rows.pop("missing")
    assert missing.stage == "failed"
    assert "/vip/Home/nowhere/scan.txt does not exist on VIP" in (missing.error or "")
    assert not journal.files(missing.id) or not any(f.uploaded for f in journal.files(missing.id))
    assert not journal.executions(missing.id)
    assert {n: d.stage for n, d in rows.items() if d.stage != "done"} == {}, {
        n: d.error for n, d in rows.items() if d.stage != "done"}
    # 0 duplicate launches: one execution per dataset that ran, each POSTed once
    assert len(names) == len(set(names)) == len(rows)
    refused = counts.get("launch refused", 0)
    assert counts.get("POST /executions", 0) == len(names) + refused + _capacity_refusals(journal)
    # 0 leftovers once the late-landing sweep is over; the group's file untouched
    assert leftovers == [] and group_left == ["shared"]
    (jobs50,) = journal.executions(rows["jobs50"].id)
    assert len(jobs50.jobs or {}) == 50
    assert len(journal.outputs(rows["jobs50"].id)) == 50
    assert len(journal.files(rows["files300"].id)) == 300
    for d in rows.values():
        warnings = [e.message for e in journal.events(d.id) if "did not complete" in e.message]
        assert warnings == [], (d.name, warnings)


def _capacity_refusals(journal: Journal) -> int:
    """Launches VIP refused for the account's cap (2001), as the journal's events say."""
    return sum(
        1 for d in journal.datasets() for e in journal.events(d.id)
        if "maximum number of executions" in e.message
    )


# -- 2001 backs off launches in every mode ------------------------------------------------------
def _capacity_posts(vip: LocalVip) -> tuple[int, int]:
    """(launch POSTs, executions created) of a server."""
    posts = int(vip.stats_snapshot()["counts"].get("POST /executions", 0))
    return posts, len(vip.state.query("SELECT name FROM executions"))


def test_run_backs_off_launches_refused_for_the_cap(tmp_path: Path) -> None:
    """`vip-agent run` with three runs at VIP's cap of 1: each refusal (2001) holds launches
    for the capacity backoff (reset when a run is seen ending), never a POST per poll."""
    from agenthelpers import run_agent

    with LocalVip(tmp_path / "vip", max_running=1, pipelines_dir=pipelines_dir(tmp_path)) as vip:
        job = {**SLOW_JOB, "runs": 3}
        ds = write_dataset(tmp_path / "ds", {"note.txt": "n\n"}, job)
        done = run_agent("run", str(ds), "--server", vip.url, "--state", str(tmp_path / "state"),
                         "--output", str(tmp_path / "out"), "--poll", "0.1:0.3",
                         api_key=vip.api_key, cwd=tmp_path, timeout=120)  # fmt: skip
        posts, created = _capacity_posts(vip)
    assert done.returncode == 0, done.stdout + done.stderr
    assert created == 3
    assert posts - created <= 4, posts  # a POST per 0.1 s poll would be dozens


def test_watch_backs_off_launches_refused_for_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`watch` believing it may run 3 where VIP allows 1: the refusals (2001) back off every
    launch on the server together; all three datasets end done."""
    from agent import pacer

    monkeypatch.setitem(pacer.POLICIES, "capacity", pacer.WaitPolicy(base=1.0, cap=4.0, jitter=0.0))
    with _one_slot_vip(tmp_path, monkeypatch) as vip:
        drop = _slow_copy_drop(tmp_path)
        cfg = _config(tmp_path, [{
            "path": str(drop), "server": vip.url, "output": str(tmp_path / "out"),
            "max_running": 3, "upload_ahead": 3, "readiness": {"settle_seconds": 0.2},
        }])  # fmt: skip
        journal = Journal.in_state_dir(tmp_path / "state")
        service = _service(cfg)
        service.start()
        try:
            for i in range(3):
                write_dataset(drop / f"c{i}", {"note.txt": f"{i}\n"})
            wait_for(lambda: len(journal.datasets()) == 3 and all(d.final for d in journal.datasets()),
                     timeout=60, what="three datasets done")  # fmt: skip
        finally:
            service.stop()
        posts, created = _capacity_posts(vip)
    assert all(d.stage == "done" for d in journal.datasets())
    assert created == 3
    assert 0 < posts - created <= 8, posts  # refused, and backed off: never one per poll
