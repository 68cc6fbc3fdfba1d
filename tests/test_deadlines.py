"""Deadlines: a server that drip-feeds, never answers, or keeps failing cannot hold the agent.

The server is :class:`hostilevip.HostileVip` (no upstream: only its spoiled answers exist),
since the local VIP server answers promptly by design.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agenthelpers import run_agent, write_dataset
from hostilevip import HostileVip

from agent.localvip import LocalVip
from agent.vip.client import VipClient
from agent.vip.errors import DeadlineExceeded, TransientError


@pytest.fixture
def hostile() -> Iterator[HostileVip]:
    with HostileVip() as server:
        yield server


def test_a_drip_fed_answer_is_cut_at_the_overall_deadline(hostile: HostileVip) -> None:
    # one byte every 0.1 s: each read succeeds, so a read timeout alone never fires
    hostile.add("GET", r"^/rest/executions/", "drip", interval=0.1, size=500, max_bytes=300)
    client = VipClient(hostile.url, "k", timeout=0.5, deadline=1.5, retries=0)
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="overall deadline"):
        client.execution("workflow-x")
    assert time.monotonic() - began < 4


def test_a_server_that_never_answers_times_out(hostile: HostileVip) -> None:
    hostile.add("GET", r"^/rest/platform", "hang")
    client = VipClient(hostile.url, "k", timeout=0.3, retries=0)
    began = time.monotonic()
    with pytest.raises(TransientError):
        client.platform()
    assert time.monotonic() - began < 3


def test_retries_stop_at_the_deadline(hostile: HostileVip) -> None:
    hostile.add("GET", r"^/rest/platform", "hang")
    client = VipClient(hostile.url, "k", timeout=0.2, deadline=1.0, retries=50, backoff=0.2)
    began = time.monotonic()
    with pytest.raises(TransientError):
        client.platform()
    assert time.monotonic() - began < 4
    assert 2 <= len(hostile.requests("GET", "^/rest/platform")) < 10


def test_a_stalled_download_is_abandoned_by_the_progress_rule(
    hostile: HostileVip, tmp_path: Path
) -> None:
    hostile.add("GET", r"^/rest/platform", "json", body={"maxSizeDirectTransfer": 10**9})
    hostile.add("GET", r"^/rest/path/", "drip", interval=0.05, size=10_000, max_bytes=400)
    client = VipClient(
        hostile.url, "k", timeout=5, retries=0, transfer_window=0.5, transfer_min_bytes=1000
    )
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="moved less than"):
        client.download("/vip/Home/big.bin", tmp_path / "big.bin", expected_size=10_000)
    assert time.monotonic() - began < 4
    assert list(tmp_path.iterdir()) == []  # no .part left behind


def test_run_gives_up_on_a_dead_server_and_says_how_to_resume(
    hostile: HostileVip, tmp_path: Path
) -> None:
    hostile.add("GET", "", "hang")
    ds = write_dataset(
        tmp_path / "drop" / "d-1", {"x.txt": "x\n"}, {"pipeline": "Sleep/1.0", "inputs": {"duration": 1}}
    )
    began = time.monotonic()
    result = run_agent(
        "run", str(ds), "--server", hostile.url, "--state", str(tmp_path / "state"),
        "--output", str(tmp_path / "out"), "--timeout", "0.3", "--give-up-after", "1",
        api_key="k", cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 75, result.stderr
    assert "unreachable or failing" in result.stderr  # said once, when it started
    assert "gave up" in result.stderr and "run the same command again" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 30


def test_a_stuck_server_never_holds_back_datasets_of_another(
    tmp_path: Path, hostile: HostileVip, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drop folders, two servers: one drip-feeds every answer, the other is healthy."""
    from dataclasses import replace

    import yaml
    from agenthelpers import wait_for

    from agent.config import config_from_args
    from agent.daemon import WatchService
    from agent.journal import Dataset, Journal

    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    hostile.add("GET", "", "drip", interval=0.1, size=10_000, max_bytes=600)
    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}
    drops = []
    for name, url in (("stuck", hostile.url), ("fine", vip_server.url)):
        drop = tmp_path / name
        drop.mkdir()
        (drop / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
        config = config_from_args(
            drop, server=url, output=tmp_path / f"out-{name}", state=tmp_path / "state", settle=0.3
        )
        drops.append(replace(config.drops[0], poll_interval=0.1))
    service = WatchService(
        replace(config, drops=tuple(drops)),
        debounce=0.05,
        runner_options={"poll_min": 0.05, "poll_max": 0.3, "retry_base": 0.2},
        scheduler_options={"poll_journal": 0.2},
        client_options={"retries": 1, "backoff": 0.1, "timeout": 0.5, "deadline": 1.0},
        grace=1.0,
    )
    began = time.monotonic()
    service.start()
    try:
        write_dataset(tmp_path / "stuck" / "s-1", {"data.txt": "s\n"})
        write_dataset(tmp_path / "fine" / "f-1", {"data.txt": "f\n"})
        journal = Journal.in_state_dir(tmp_path / "state")

        def by_name() -> dict[str, Dataset]:
            return {d.name: d for d in journal.datasets()}

        wait_for(lambda: getattr(by_name().get("f-1"), "stage", None) == "done", timeout=30,
                 what="the healthy server's dataset done")  # fmt: skip
        assert time.monotonic() - began < 30
        stuck = wait_for(
            lambda: (d := by_name().get("s-1")) is not None and "unreachable since" in (d.error or "")
            and d, timeout=15, what="the stuck dataset says it waits",
        )  # fmt: skip
        assert not stuck.final
    finally:
        service.stop()
