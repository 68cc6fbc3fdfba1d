"""A drop folder that disappears, comes back, or is replaced: noticed within seconds,
logged once, watched again, shown by ``status`` and ``doctor`` (real ``vip-agent watch``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from agenthelpers import agent_env, run_agent, wait_for, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip
from agent.watch.presence import MISSING, WATCHING, Presence

JOB = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "a.txt"}}


def _fill(drop: Path, *names: str) -> None:
    """A drop folder with its template and complete datasets, made elsewhere and moved in."""
    stage = drop.parent / f".stage-{time.monotonic_ns()}"
    for name in names:
        write_dataset(stage / name, {"a.txt": f"{name}\n"})
    drop.mkdir(exist_ok=True)
    (drop / "job.yaml").write_text(yaml.safe_dump(JOB))
    for name in names:
        (stage / name).rename(drop / name)


def test_presence_says_each_change_once(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    p = Presence(drop)
    assert p.look() is None
    drop.rmdir()
    change = p.look()
    assert change is not None and change.state == MISSING and "disappeared" in change.message
    assert p.look() is None  # said once
    drop.mkdir()
    change = p.look()
    assert change is not None and change.state == WATCHING and "back" in change.message
    drop.rename(tmp_path / "old")
    drop.mkdir()
    change = p.look()
    assert change is not None and change.state == WATCHING and "replaced" in change.message


def test_watch_notices_a_drop_folder_removed_recreated_and_replaced(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    drop = tmp_path / "drop"
    _fill(drop, "d1")
    state = tmp_path / "state"
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "state": str(state),
        "drops": [{"path": str(drop), "server": vip_server.url, "output": str(tmp_path / "out"),
                   "readiness": {"settle_seconds": 0.2}}],
    }))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "watch", "--config", str(config)], cwd=tmp_path,
        env=agent_env(vip_server.api_key), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    journal = Journal.in_state_dir(state)

    def done(name: str) -> bool:
        return any(d.name == name and d.stage == "done" for d in journal.datasets())

    try:
        wait_for(lambda: done("d1"), timeout=60, what="d1 done")
        shutil.rmtree(drop)  # removed
        start = time.monotonic()
        wait_for(lambda: any(s.state == MISSING for s in journal.drop_states()), timeout=10,
                 what="the missing drop folder noticed")  # fmt: skip
        assert time.monotonic() - start < 6
        status = run_agent("status", "--state", str(state), api_key=vip_server.api_key, cwd=tmp_path)
        assert f"drop folder {drop}: MISSING" in status.stdout, status.stdout
        doctor = run_agent("doctor", "--config", str(config), api_key=vip_server.api_key, cwd=tmp_path)
        assert "the running agent reports it missing" in doctor.stdout, doctor.stdout
        time.sleep(2.5)  # let a few more looks pass (a duration under test: logged once)
        _fill(drop, "d2")  # recreated, with a new dataset: taken without waiting for a rescan
        wait_for(lambda: done("d2"), timeout=30, what="d2 done after the folder came back")
        drop.rename(tmp_path / "drop-old")  # renamed away, another folder put in its place
        _fill(drop, "d3")
        wait_for(lambda: done("d3"), timeout=30, what="d3 done in the replacing folder")
        assert [s.state for s in journal.drop_states()] == [WATCHING]
        assert "MISSING" not in run_agent("status", "--state", str(state), api_key="k", cwd=tmp_path).stdout
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert err.count("has disappeared") == 1, err
    assert "is back" in err or "replaced" in err
    assert "Traceback" not in err
