"""agent/pacer.py: wait policies and the per-server budget (fast, real threads, no sleeps)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from agenthelpers import run_agent, wait_for

from agent import pacer
from agent.config import load_config
from agent.errors import ConfigError
from agent.pacer import (
    POLICIES,
    ServerBudget,
    WaitPolicy,
    budget_for,
    configure_transfers,
    policy,
)


class FakeClock:
    """A monotonic clock the test moves; ``sleep`` advances it and records the wait."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)


def test_policy_doubles_from_base_up_to_cap_without_jitter() -> None:
    p = WaitPolicy(base=1.0, cap=10.0, jitter=0.0)
    assert [p.delay(a) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert p.delay(10_000) == 10.0  # no overflow on absurd attempt counts


def test_policy_jitter_stays_within_its_share_and_varies() -> None:
    p = WaitPolicy(base=4.0, cap=60.0, jitter=0.5)
    rng = random.Random(7)
    draws = [p.delay(0, rng) for _ in range(200)]
    assert all(2.0 <= d <= 6.0 for d in draws)
    assert max(draws) - min(draws) > 2.0  # spread, not one value
    capped = [p.delay(20, rng) for _ in range(200)]
    assert all(30.0 <= d <= 90.0 for d in capped)


def test_policy_deadline() -> None:
    assert not WaitPolicy(1, 2).expired(0.0, 1e9)  # no deadline: never
    p = WaitPolicy(1, 2, deadline=600)
    assert not p.expired(100.0, 699.9)
    assert p.expired(100.0, 700.0)


def test_named_policies_exist_and_are_sane() -> None:
    for name in ("retry", "outage", "capacity", "engine", "delete", "status", "auth_probe",
                 "webhook"):
        p = policy(name)
        assert 0 < p.base <= p.cap
        assert 0 <= p.jitter < 1
    assert policy("retry").cap == 60.0
    assert policy("delete").deadline == 600.0
    with pytest.raises(KeyError, match="known: "):
        policy("nope")
    assert set(POLICIES) >= {"retry", "webhook"}


def test_token_bucket_allows_a_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock()
    b = ServerBudget("https://x", max_rate=5.0, burst=10, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        b.acquire()
    assert clock.slept == []  # the burst goes at once
    for _ in range(5):
        b.acquire()
    # the 11th..15th requests are reserved 0.2 s apart
    assert clock.slept == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    snap = b.snapshot()
    assert snap["requests_total"] == 15 and snap["waits_total"] == 5
    assert snap["tokens"] == 0.0
    clock.now += 1.0  # one second refills five tokens (the debt of five is paid first)
    clock.now += 1.0
    b.acquire()
    assert len(clock.slept) == 5
    assert b.snapshot()["tokens"] == pytest.approx(4.0)


def test_acquire_never_waits_past_the_callers_deadline() -> None:
    clock = FakeClock()
    b = ServerBudget("https://x", max_rate=1.0, burst=1, clock=clock, sleep=clock.sleep)
    b.acquire()
    b.acquire(deadline=clock.now + 0.25)
    assert clock.slept == [0.25]


def test_no_rate_means_no_wait() -> None:
    clock = FakeClock()
    b = ServerBudget("https://x", max_rate=0, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        b.acquire()
    assert clock.slept == [] and b.snapshot()["max_rate"] == 0.0


def test_acquire_paces_real_threads_together() -> None:
    """Eight threads share one bucket: the waits they were given add up to the rate."""
    clock = FakeClock()
    b = ServerBudget("https://x", max_rate=10.0, burst=2, clock=clock, sleep=clock.sleep)
    def five() -> None:
        for _ in range(5):
            b.acquire()

    threads = [threading.Thread(target=five) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert b.snapshot()["requests_total"] == 40
    # 38 requests beyond the burst, reserved 0.1 s apart: 0.1, 0.2, ... 3.8
    assert sorted(clock.slept) == pytest.approx([0.1 * i for i in range(1, 39)])


def _hold_slots(b: ServerBudget, n: int) -> tuple[list[threading.Thread], threading.Event, list[int]]:
    """Start ``n`` threads that each take a transfer slot and hold it until released."""
    release = threading.Event()
    inside: list[int] = []
    lock = threading.Lock()
    peak = [0]

    def work() -> None:
        with b.transfer():
            with lock:
                inside.append(1)
                peak[0] = max(peak[0], int(b.snapshot()["transfers_in_use"]))
            release.wait(timeout=10)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, release, peak


def _wait_until(cond: Callable[[], bool]) -> None:
    wait_for(cond, timeout=10, interval=0.005, what="transfer slots")


def test_transfer_slots_bound_concurrency_across_threads() -> None:
    b = ServerBudget("https://x", max_transfers=3)
    threads, release, peak = _hold_slots(b, 7)
    _wait_until(lambda: b.snapshot()["transfers_in_use"] == 3)
    still = b.snapshot()
    assert still["transfers_in_use"] == 3 and still["transfers_max"] == 3
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert peak[0] == 3
    snap = b.snapshot()
    assert snap["transfers_in_use"] == 0 and snap["transfers_total"] == 7


def test_a_thread_holding_a_slot_does_not_wait_on_itself() -> None:
    b = ServerBudget("https://x", max_transfers=1)
    with b.transfer():
        with b.transfer():  # nested: no second slot, no deadlock
            assert b.snapshot()["transfers_in_use"] == 1
        assert b.snapshot()["transfers_in_use"] == 1
    assert b.snapshot()["transfers_in_use"] == 0 and b.snapshot()["transfers_total"] == 1


def test_requests_inside_a_transfer_slot_take_no_token() -> None:
    clock = FakeClock()
    b = ServerBudget("https://x", max_rate=1.0, burst=1, clock=clock, sleep=clock.sleep)
    with b.transfer():
        for _ in range(50):
            b.acquire()
    assert clock.slept == []
    b.acquire()
    b.acquire()  # outside: the bucket applies again
    assert clock.slept == [1.0]


def test_transfer_timeouts_halve_the_slots_and_quiet_gives_them_back() -> None:
    clock = FakeClock()
    b = ServerBudget("https://x", max_transfers=8, clock=clock, sleep=clock.sleep)
    assert b.transfer_timed_out() == 4
    assert b.transfer_timed_out() == 2
    assert b.transfer_timed_out() == 1
    assert b.transfer_timed_out() == 1  # never below one
    threads, release, peak = _hold_slots(b, 3)
    _wait_until(lambda: b.snapshot()["transfers_total"] >= 1)
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert peak[0] == 1  # the lowered limit held
    assert b.snapshot()["transfers_limit"] == 1  # no quiet minute yet
    clock.now += pacer.TRANSFER_RECOVERY
    with b.transfer():
        pass
    assert b.snapshot()["transfers_limit"] == 2
    assert b.snapshot()["transfer_timeouts_total"] == 4


def test_configure_changes_ceilings_and_wakes_waiters() -> None:
    b = ServerBudget("https://x", max_transfers=1)
    threads, release, peak = _hold_slots(b, 3)
    _wait_until(lambda: b.snapshot()["transfers_in_use"] == 1)
    b.configure(max_transfers=3)
    _wait_until(lambda: b.snapshot()["transfers_in_use"] == 3)
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert peak[0] == 3
    b.configure(max_rate=2.5)
    assert b.snapshot()["max_rate"] == 2.5


def test_launch_backoff_grows_then_resets() -> None:
    clock = FakeClock()
    b = ServerBudget("https://x", clock=clock, sleep=clock.sleep)
    assert b.launch_wait() == 0.0
    first = b.launch_refused(2001)
    cap = policy("capacity")
    assert cap.base * (1 - cap.jitter) <= first <= cap.base * (1 + cap.jitter)
    # a second dataset refused during the same wait does not lengthen it
    clock.now += 1.0
    assert b.launch_refused(2001) == pytest.approx(first - 1.0)
    assert b.launch_wait() == pytest.approx(first - 1.0)
    clock.now += first
    assert b.launch_wait() == 0.0
    second = b.launch_refused(2001)
    assert second >= cap.base * 2 * (1 - cap.jitter)
    engine = b.launch_refused(2003)  # during the wait: unchanged
    assert engine == pytest.approx(second)
    b.launch_accepted()
    assert b.launch_wait() == 0.0
    assert b.snapshot()["launches_refused_total"] == 4


def test_engine_refusals_use_the_engine_policy() -> None:
    clock = FakeClock()
    b = ServerBudget("https://x", clock=clock, sleep=clock.sleep)
    wait = b.launch_refused(2003)
    eng = policy("engine")
    assert eng.base * (1 - eng.jitter) <= wait <= eng.base * (1 + eng.jitter)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def consume(self, direction: str, nbytes: int) -> None:
        self.calls.append((direction, nbytes))


def test_consume_counts_bytes_and_calls_the_limiter() -> None:
    b = ServerBudget("https://x")
    b.consume("upload", 100)
    limiter = Recorder()
    b.set_bandwidth(limiter)
    b.consume("download", 7)
    b.consume("upload", 5)
    b.set_bandwidth(None)
    b.consume("upload", 1)
    assert limiter.calls == [("download", 7), ("upload", 5)]
    snap = b.snapshot()
    assert snap["bytes_uploaded_total"] == 106 and snap["bytes_downloaded_total"] == 7


def test_budget_for_is_one_per_server_whatever_the_spelling() -> None:
    a = budget_for("https://Pacer-Test.example:8443/")
    assert budget_for("https://pacer-test.example:8443/rest/") is a
    assert budget_for("pacer-test.example:8443") is a
    assert budget_for("http://pacer-test.example:8443") is not a
    assert a in pacer.budgets()
    assert a.snapshot()["transfers_max"] == pacer.DEFAULT_MAX_TRANSFERS
    assert a.snapshot()["max_rate"] == pacer.DEFAULT_MAX_RATE


def test_a_loopback_server_gets_no_request_ceiling_by_default() -> None:
    for url in ("http://127.0.0.1:18999", "http://localhost:18998", "http://[::1]:18997"):
        snap = budget_for(url).snapshot()
        assert snap["max_rate"] == 0.0  # nobody else to protect on this machine
        assert snap["transfers_max"] == pacer.DEFAULT_MAX_TRANSFERS  # slots apply all the same


# ---------------------------------------------------------------- max_transfers_per_server


def test_max_transfers_per_server_from_agent_yaml(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "out"):
        (tmp_path / name).mkdir()
    text = (
        "defaults:\n"
        "  max_transfers_per_server: 6\n"
        "drops:\n"
        "  - {path: a, output: out, server: https://vip.example.org}\n"
        "  - {path: b, output: out, server: https://vip.example.org, max_transfers_per_server: 3}\n"
        "  - {path: c, output: out, server: https://other.example.org}\n"
    )
    (tmp_path / "agent.yaml").write_text(text)
    config = load_config(tmp_path / "agent.yaml")
    assert [d.max_transfers_per_server for d in config.drops] == [6, 3, 6]
    assert config.transfer_limits() == {"https://vip.example.org": 3, "https://other.example.org": 6}
    configure_transfers(config.transfer_limits())
    assert budget_for("https://vip.example.org").snapshot()["transfers_max"] == 3
    assert budget_for("https://other.example.org").snapshot()["transfers_max"] == 6
    (tmp_path / "agent.yaml").write_text(text.replace("max_transfers_per_server: 3", "max_transfers_per_server: 0"))
    with pytest.raises(ConfigError, match=r"max_transfers_per_server.*>= 1"):
        load_config(tmp_path / "agent.yaml")
    (tmp_path / "agent.yaml").write_text("drops:\n  - {path: a, output: out}\n")
    assert load_config(tmp_path / "agent.yaml").drops[0].max_transfers_per_server == 8


def test_run_refuses_a_bad_max_transfers_per_server(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    out = run_agent("run", str(tmp_path / "ds"), "--max-transfers-per-server", "0",
                    api_key="k", cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert "--max-transfers-per-server" in out.stderr and "1 to 64" in out.stderr
