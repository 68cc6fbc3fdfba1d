"""The running-executions cap is per server, decided in one place (``AgentConfig.max_running``).

Two real local servers, two drop folders: caps 3 and 1. Before, the scheduler applied the
cap per drop folder and the runner again as the minimum over every server (1 everywhere).
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest
import yaml
from agenthelpers import wait_for, write_dataset

from agent.config import load_config
from agent.daemon import WatchService
from agent.journal import Journal
from agent.localvip import LocalVip

SLEEP_JOB = {"pipeline": "Sleep/1.0", "inputs": {"duration": 1.5}}


def test_caps_three_and_one_on_two_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_urlsafe(16)
    monkeypatch.setenv("VIP_API_KEY", key)
    with (
        LocalVip(tmp_path / "vip-a", api_keys=[key], max_running=5) as a,
        LocalVip(tmp_path / "vip-b", api_keys=[key], max_running=5) as b,
    ):
        drops = []
        for name, server, cap in (("a", a, 3), ("b", b, 1)):
            drop = tmp_path / f"drop-{name}"
            drop.mkdir()
            (drop / "job.yaml").write_text(yaml.safe_dump(SLEEP_JOB), encoding="utf-8")
            drops.append({"path": str(drop), "server": server.url, "output": str(tmp_path / f"out-{name}"),
                          "max_running": cap, "max_uploads": 3, "readiness": {"settle_seconds": 0.2}})  # fmt: skip
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(yaml.safe_dump({"drops": drops, "state": str(tmp_path / "state")}))
        config = load_config(cfg)
        assert config.max_running(a.url) == 3 and config.max_running(b.url) == 1
        service = WatchService(
            config, debounce=0.05, runner_options={"poll_min": 0.05, "poll_max": 0.2},
            scheduler_options={"poll_journal": 0.2}, grace=1.0,
        )  # fmt: skip
        peaks = {"a": 0, "b": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                peaks["a"] = max(peaks["a"], a.state.running())
                peaks["b"] = max(peaks["b"], b.state.running())

        sampler = threading.Thread(target=sample)
        sampler.start()
        service.start()
        journal = Journal.in_state_dir(tmp_path / "state")
        try:
            for name in ("a", "b"):
                for i in range(3):
                    write_dataset(tmp_path / f"drop-{name}" / f"{name}{i}", {"note.txt": f"{name} {i}\n"})
            wait_for(lambda: len(journal.datasets()) == 6 and all(d.final for d in journal.datasets()),
                     timeout=60)  # fmt: skip
        finally:
            stop.set()
            sampler.join()
            service.stop()
    assert all(d.stage == "done" for d in journal.datasets()), [d.error for d in journal.datasets()]
    assert peaks == {"a": 3, "b": 1}
