"""Bandwidth limits: rates, schedules, the token bucket, agent.yaml, and a real limited transfer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.bandwidth import (
    BandwidthConfig,
    Limiter,
    RateError,
    format_rate,
    parse_bandwidth,
    parse_bwlimit,
    parse_rate,
    parse_window,
)
from agent.config import parse_config
from agent.errors import ConfigError
from agent.journal import Journal
from agent.localvip import LocalVip
from tests.agenthelpers import run_agent, write_dataset

MB = 1_000_000
MiB = 1 << 20


# -- rates -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20MB/s", 20 * MB), ("20 MB/s", 20 * MB), ("5MiB/s", 5 * MiB), ("500kB/s", 500_000),
        ("1.5GB/s", 1.5e9), ("160Mbit/s", 20 * MB), ("20M", 20 * MB), ("10MBps", 10 * MB),
        (1000, 1000.0), ("off", None), ("OFF", None), (None, None), ("unlimited", None),
    ],
)  # fmt: skip
def test_rates_are_read(text: object, expected: float | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fast", "20MB/s"), ("20 MB/h", "20MB/s"), (0, "more than 0"), (-5, "more than 0"),
        ("20Mb/s", "ambiguous: write 20MB/s (bytes) or 20Mbit/s (bits)"), (True, "20MB/s"),
        ([1], "20MB/s"),
    ],
)  # fmt: skip
def test_bad_rates_say_what_is_expected(text: object, says: str) -> None:
    with pytest.raises(RateError, match=None) as info:
        parse_rate(text)
    assert says in str(info.value)


def test_rates_print_readably() -> None:
    assert format_rate(20 * MB) == "20 MB/s"
    assert format_rate(1500) == "1.5 kB/s"
    assert format_rate(None) == "off"


def test_bwlimit_takes_one_rate_or_upload_colon_download() -> None:
    assert parse_bwlimit("1MB/s") == BandwidthConfig(MB, MB)
    assert parse_bwlimit("5MB/s:off") == BandwidthConfig(5 * MB, None)
    with pytest.raises(RateError):
        parse_bwlimit("5MB/s:slow")


# -- windows and schedules ---------------------------------------------------------------
def test_windows_are_read_and_may_wrap_midnight() -> None:
    assert parse_window("08:00-19:00") == (480, 1140)
    assert parse_window("19:00-08:00") == (1140, 480)
    assert parse_window("0:00-24:00") == (0, 0)
    for bad in ("8-19", "25:00-26:00", "08:61-09:00", 800):
        with pytest.raises(RateError):
            parse_window(bad)


def _config(value: object) -> BandwidthConfig | None:
    return parse_bandwidth(value, lambda key, problem: ConfigError(f"agent.yaml: {key}: {problem}"))


def test_a_schedule_overrides_the_named_direction_inside_its_window() -> None:
    bw = _config({"upload": "20MB/s", "download": "50MB/s",
                  "schedule": [{"at": "08:00-19:00", "upload": "5MB/s"},
                               {"at": "22:00-06:00", "download": "off"}]})  # fmt: skip
    assert bw is not None
    at = lambda h, m=0: h * 60 + m  # noqa: E731 - a tiny local clock
    assert bw.rate("upload", at(7, 59)) == 20 * MB
    assert bw.rate("upload", at(8)) == 5 * MB
    assert bw.rate("upload", at(18, 59)) == 5 * MB
    assert bw.rate("upload", at(19)) == 20 * MB
    assert bw.rate("download", at(12)) == 50 * MB  # the working-hours window names upload only
    assert bw.rate("download", at(23)) is None  # wraps midnight
    assert bw.rate("download", at(3)) is None
    assert bw.rate("download", at(6)) == 50 * MB
    assert "08:00-19:00 upload 5 MB/s" in bw.describe()


def test_a_bare_rate_limits_both_directions() -> None:
    assert _config("10MB/s") == BandwidthConfig(10 * MB, 10 * MB)
    assert _config(None) is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"upload": "fast"}, "bandwidth.upload: expected a rate such as 20MB/s"),
        ({"uplaod": "5MB/s"}, "bandwidth.uplaod: unknown setting"),
        ({"schedule": {"at": "08:00-19:00"}}, "bandwidth.schedule: must be a list"),
        ({"schedule": [{"upload": "5MB/s"}]}, "bandwidth.schedule[0].at: is required"),
        ({"schedule": [{"at": "8h-19h", "upload": "5MB/s"}]}, "bandwidth.schedule[0].at: expected a time window"),
        ({"schedule": [{"at": "08:00-19:00"}]}, "bandwidth.schedule[0]: names no rate"),
        ({"schedule": [{"at": "08:00-19:00", "upload": "5Mb/s"}]}, "schedule[0].upload: '5Mb/s' is ambiguous"),
    ],
)  # fmt: skip
def test_bad_bandwidth_settings_name_the_key(value: object, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(value)
    assert says in str(info.value)


def test_agent_yaml_takes_bandwidth_in_defaults_and_per_drop_folder(tmp_path: Path) -> None:
    data = {
        "defaults": {"bandwidth": {"upload": "20MB/s", "schedule": [{"at": "08:00-19:00", "upload": "5MB/s"}]}},
        "drops": [
            {"path": str(tmp_path / "a"), "output": str(tmp_path / "out")},
            {"path": str(tmp_path / "b"), "output": str(tmp_path / "out"), "bandwidth": {"download": "1MB/s"}},
        ],
    }  # fmt: skip
    config = parse_config(data, source="agent.yaml", base=tmp_path)
    a, b = config.drops
    assert a.bandwidth is not None and a.bandwidth.upload == 20 * MB
    assert a.bandwidth.rate("upload", 9 * 60) == 5 * MB
    # a drop folder's own mapping replaces the defaults' one (as every other key does)
    assert b.bandwidth == BandwidthConfig(None, MB)


def test_a_mistake_in_agent_yaml_names_file_and_key(tmp_path: Path) -> None:
    data = {"drops": [{"path": str(tmp_path / "a"), "output": str(tmp_path / "o"),
                       "bandwidth": {"upload": "20 MB per second"}}]}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="agent.yaml", base=tmp_path)
    assert str(info.value).startswith("agent.yaml: drops[0].bandwidth.upload: expected a rate")


# -- the limiter -------------------------------------------------------------------------
class FakeTime:
    """A controlled monotonic clock whose sleep advances it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_the_limiter_keeps_a_direction_under_its_rate() -> None:
    t = FakeTime()
    lim = Limiter(BandwidthConfig(upload=MB), clock=t.clock, sleep=t.sleep)
    for _ in range(20):  # 2 MB in 100 kB pieces, back to back
        lim.consume("upload", 100_000)
    assert t.slept == pytest.approx(2.0, abs=0.01)  # 2 MB at 1 MB/s, nothing free at the start
    lim.consume("download", 10 * MB)  # download is not limited
    assert t.slept == pytest.approx(2.0, abs=0.01)


def test_a_quiet_spell_allows_only_a_small_burst() -> None:
    t = FakeTime()
    lim = Limiter(BandwidthConfig(upload=MB), clock=t.clock, sleep=t.sleep)
    t.now += 3600  # an hour of nothing
    lim.consume("upload", 1 * MB)
    assert t.slept == pytest.approx(0.9, abs=0.01)  # only 0.1 s of the rate was saved up


def test_the_limit_follows_the_schedule_and_the_smallest_config_wins() -> None:
    t = FakeTime()
    minute = [9 * 60]
    day = BandwidthConfig(upload=10 * MB, schedule=_config(
        {"schedule": [{"at": "08:00-19:00", "upload": "1MB/s"}]}).schedule)  # type: ignore[union-attr]
    other = BandwidthConfig(upload=4 * MB)
    lim = Limiter([day, other], clock=t.clock, sleep=t.sleep, minute=lambda: minute[0])
    assert lim.current() == {"upload": MB, "download": None}
    lim.consume("upload", MB)
    assert t.slept == pytest.approx(1.0, abs=0.01)
    minute[0] = 20 * 60  # evening: the drop folder allows 10 MB/s, the other one 4 MB/s
    assert lim.rate("upload") == 4 * MB
    lim.consume("upload", 4 * MB)  # 1 s at 4 MB/s, less the 0.1 s burst the bucket holds
    assert t.slept == pytest.approx(1.9, abs=0.01)


def test_threads_share_one_limit() -> None:
    t = FakeTime()
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            t.sleep(seconds)

    lim = Limiter(BandwidthConfig(download=MB), clock=t.clock, sleep=sleep)
    def send() -> None:
        for _ in range(10):
            lim.consume("download", 50_000)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # 2 MB in all: at least 2 s of waiting on the shared clock, however the threads interleave
    assert t.now - 100.0 >= 1.9


def test_a_stop_ends_a_wait_at_once() -> None:
    stop = threading.Event()
    lim = Limiter(BandwidthConfig(upload=1000.0), stop=stop)
    stopper = threading.Timer(0.2, stop.set)
    stopper.start()
    started = threading.Event()
    done = []

    def send() -> None:
        started.set()
        lim.consume("upload", 1_000_000)  # 1,000 s at 1 kB/s
        done.append(True)

    th = threading.Thread(target=send)
    th.start()
    th.join(timeout=5)
    assert done == [True] and not th.is_alive()


# -- a real transfer ------------------------------------------------------------------------
def test_run_bwlimit_keeps_a_real_upload_under_the_limit(tmp_path: Path, vip_server: LocalVip) -> None:
    """2 MB through ``vip-agent run --bwlimit 1MB/s`` against the local server: the upload
    (timed by the journal's own events around it) runs at or below 1 MB/s, and not far below."""
    data = bytes(range(256)) * (2 * MB // 256)
    ds = write_dataset(tmp_path / "big", {"data.bin": data},
                       job={"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.bin"}})  # fmt: skip
    state = tmp_path / "state"
    done = run_agent("run", str(ds), "--server", vip_server.url, "--state", str(state),
                     "--output", str(tmp_path / "out"), "--bwlimit", "1MB/s",
                     api_key=vip_server.api_key, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    journal = Journal.in_state_dir(state)
    (row,) = journal.datasets()
    events = journal.events(row.id)
    start = next(e.time for e in events if e.message.startswith("uploading 1 file"))
    end = next(e.time for e in events if e.message.startswith("inputs uploaded"))
    rate = len(data) / (end - start)
    assert 0.5 * MB <= rate <= 1.1 * MB, f"upload ran at {rate / MB:.2f} MB/s"  # 0.1 s burst at most


def test_run_applies_the_bandwidth_of_the_datasets_drop_folder(tmp_path: Path, vip_server: LocalVip) -> None:
    """``vip-agent run`` of a dataset in a drop folder of agent.yaml limits as the service would."""
    drop = tmp_path / "drop"
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"state: {tmp_path / 'state'}\n"
        f"drops: [{{path: {drop}, server: '{vip_server.url}', output: {tmp_path / 'out'},"
        " bandwidth: {upload: 1MB/s}}]\n",
        encoding="utf-8",
    )
    ds = write_dataset(drop / "big", {"data.bin": bytes(1_500_000)},
                       job={"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.bin"}})  # fmt: skip
    done = run_agent("run", str(ds), "--config", str(config), api_key=vip_server.api_key, cwd=tmp_path,
                     timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    journal = Journal.in_state_dir(tmp_path / "state")
    (row,) = journal.datasets()
    events = journal.events(row.id)
    start = next(e.time for e in events if e.message.startswith("uploading 1 file"))
    end = next(e.time for e in events if e.message.startswith("inputs uploaded"))
    assert 1_500_000 / (end - start) <= 1.1 * MB


def test_run_bwlimit_refuses_a_rate_it_cannot_read(tmp_path: Path) -> None:
    done = run_agent("run", str(tmp_path), "--bwlimit", "20Mb/s", api_key="unused", cwd=tmp_path)
    assert done.returncode == 2
    assert "argument --bwlimit: '20Mb/s' is ambiguous: write 20MB/s (bytes) or 20Mbit/s (bits)" in done.stderr


def test_install_gives_each_server_the_limits_of_its_drop_folders(tmp_path: Path) -> None:
    from agent.bandwidth import current_limits, install

    data = {"drops": [
        {"path": str(tmp_path / "a"), "output": str(tmp_path / "o"), "server": "https://one.example",
         "bandwidth": {"upload": "20MB/s"}},
        {"path": str(tmp_path / "b"), "output": str(tmp_path / "o"), "server": "https://one.example",
         "bandwidth": {"upload": "5MB/s", "download": "8MB/s"}},
        {"path": str(tmp_path / "c"), "output": str(tmp_path / "o"), "server": "https://two.example"},
    ]}  # fmt: skip
    limiters = install(parse_config(data, source="agent.yaml", base=tmp_path).drops)
    assert limiters["https://two.example"] is None
    assert current_limits() == {
        "https://one.example": {"upload": 5 * MB, "download": 8 * MB},  # the smallest of each
        "https://two.example": {"upload": None, "download": None},
    }
    from agent.pacer import budget_for

    assert budget_for("https://one.example")._bandwidth is limiters["https://one.example"]
    install(())  # nothing configured any more (SIGHUP): every limit goes
    assert current_limits() == {}
    assert budget_for("https://one.example")._bandwidth is None


def test_status_shows_the_limit_in_force_now(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    (tmp_path / "drop").mkdir()
    config.write_text(
        "state: state\n"
        "defaults: {bandwidth: {upload: 5MB/s, schedule: [{at: '00:00-24:00', download: 20MB/s}]}}\n"
        "drops: [{path: drop, server: 'https://vip.example', output: out}]\n",
        encoding="utf-8",
    )
    done = run_agent("status", "--config", str(config), api_key="unused", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bandwidth limit on https://vip.example now: upload 5 MB/s, download 20 MB/s" in done.stdout
