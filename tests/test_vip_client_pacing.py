"""The client under the pacer, redirects, slow results and the listing cap (issues 15.3, 16),
against the real local server (and small loopback servers for redirects)."""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hostilevip import HostileVip
from receivers import self_signed

from agent.errors import ConfigError
from agent.health import Health
from agent.journal import Journal
from agent.localvip import LocalVip
from agent.metrics import Metrics
from agent.pacer import ServerBudget, budget_for, policy
from agent.vip import RedirectError, TransientError, VipClient

HOME = "/vip/Home"


def _client(server: LocalVip | str, key: str, **kw: Any) -> VipClient:
    opts: dict[str, Any] = {"timeout": 20, "retries": 2, "backoff": 0.01, "transfer_grace": 5}
    opts.update(kw)
    url = server if isinstance(server, str) else server.url
    return VipClient(url, key, **opts)


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


# ---------------------------------------------------------------- retry policy


def test_retry_waits_follow_the_retry_policy_from_the_client_s_backoff() -> None:
    client = VipClient("http://127.0.0.1:9", "k", backoff=2.0)
    rule = policy("retry")
    random.seed(3)
    waits = [client._delay(a) for a in range(12)]
    for attempt, wait in enumerate(waits):
        exact = min(rule.cap, 2.0 * 2**attempt)
        assert exact * (1 - rule.jitter) <= wait <= exact * (1 + rule.jitter)
    assert len(set(waits)) == len(waits)  # jittered
    assert VipClient("http://127.0.0.1:9", "k", backoff=0)._delay(5) == 0.0


# ---------------------------------------------------------------- the budget


def test_every_request_is_counted_and_transfers_are_bounded_by_the_server_s_slots(
    vip_server: LocalVip, tmp_path: Path
) -> None:
    budget = ServerBudget(vip_server.url, max_rate=0, max_transfers=2)
    files = [_file(tmp_path / f"f{i}.bin", 300_000 + i) for i in range(10)]
    with _client(vip_server, vip_server.api_key, budget=budget) as client:
        client.makedirs(f"{HOME}/slots")
        vip_server.faults.latency = 0.1  # every request takes a while: 8 threads would overlap
        vip_server.stats.reset()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: client.upload(p, f"{HOME}/slots/{p.name}"), files))
        peak = vip_server.stats.snapshot()["peak_in_flight"]
        vip_server.faults.latency = 0.0
        assert client.sizes(f"{HOME}/slots") == {p.name: p.stat().st_size for p in files}
    snap = budget.snapshot()
    # two slots: the server counts a request until its handler returns, just after the client
    # has the answer, so one may still be counted as the next starts (8 threads: about 8)
    assert 2 <= peak <= 3
    assert snap["transfers_total"] == 10 and snap["transfers_in_use"] == 0
    assert snap["bytes_uploaded_total"] == sum(p.stat().st_size for p in files)
    # makedirs, 10 PUTs and their checks, the listing: every one went through acquire()
    assert snap["requests_total"] >= 22


def test_small_uploads_and_downloads_report_their_bytes_to_the_budget(
    vip_server: LocalVip, tmp_path: Path
) -> None:
    budget = ServerBudget(vip_server.url, max_rate=0)
    seen: list[tuple[str, int]] = []

    class Meter:
        def consume(self, direction: str, nbytes: int) -> None:
            seen.append((direction, nbytes))

    budget.set_bandwidth(Meter())
    small = _file(tmp_path / "s.txt", 5_000)  # the light transport
    big = _file(tmp_path / "b.bin", 3 * 2**20 + 7)  # sendfile, in 1 MiB pieces
    with _client(vip_server, vip_server.api_key, budget=budget) as client:
        client.upload(small, f"{HOME}/s.txt")
        client.upload(big, f"{HOME}/b.bin")
        assert client.download(f"{HOME}/b.bin", tmp_path / "back.bin") == big.stat().st_size
    up = [n for d, n in seen if d == "upload"]
    down = [n for d, n in seen if d == "download"]
    assert sum(up) == small.stat().st_size + big.stat().st_size and len(up) >= 5
    assert sum(down) == big.stat().st_size and len(down) >= 2  # per block, not once at the end
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_transfer_timeouts_lower_the_server_s_concurrent_transfers(
    vip_server: LocalVip, tmp_path: Path
) -> None:
    budget = ServerBudget(vip_server.url, max_rate=0, max_transfers=8)
    src = _file(tmp_path / "t.bin", 100_000)
    with _client(vip_server, vip_server.api_key, budget=budget) as client:
        client.upload(src, f"{HOME}/t.bin")
        assert budget.snapshot()["transfers_limit"] == 8
        vip_server.faults.transfer_timeout = 1.0
        vip_server.faults.methods = frozenset({"GET"})
        vip_server.faults.times = 2
        assert client.download(f"{HOME}/t.bin", tmp_path / "t.out") == 100_000
    snap = budget.snapshot()
    assert vip_server.faults.injected == 2
    assert snap["transfer_timeouts_total"] == 2 and snap["transfers_limit"] == 2  # 8 -> 4 -> 2


def test_a_missing_file_is_not_counted_as_a_transfer_timeout(
    vip_server: LocalVip, tmp_path: Path
) -> None:
    budget = ServerBudget(vip_server.url, max_rate=0)
    with _client(vip_server, vip_server.api_key, budget=budget) as client:
        with pytest.raises(Exception, match="does not exist"):
            client.download(f"{HOME}/nothing.bin", tmp_path / "n.out")
    assert budget.snapshot()["transfer_timeouts_total"] == 0
    assert budget.snapshot()["transfers_limit"] == budget.snapshot()["transfers_max"]


def test_clients_of_one_server_share_its_budget(vip_server: LocalVip) -> None:
    with _client(vip_server, vip_server.api_key) as a, _client(
        vip_server.url + "/", vip_server.api_key
    ) as b:
        assert a.budget is b.budget is budget_for(vip_server.url)
        before = a.budget.snapshot()["requests_total"]
        a.exists(HOME)
        b.exists(HOME)
        assert a.budget.snapshot()["requests_total"] - before == 2


def test_the_request_ceiling_paces_a_client(vip_server: LocalVip) -> None:
    budget = ServerBudget(vip_server.url, max_rate=20.0, burst=2)
    with _client(vip_server, vip_server.api_key, budget=budget) as client:
        started = time.monotonic()
        for _ in range(8):
            client.exists(HOME)
        elapsed = time.monotonic() - started
    snap = budget.snapshot()
    assert snap["requests_total"] == 8 and snap["waits_total"] >= 5
    assert elapsed >= 6 / 20.0 * 0.95  # the burst of two, then one every 50 ms


# ---------------------------------------------------------------- slow /results


def test_results_get_their_own_read_timeout(vip_server: LocalVip) -> None:
    def slow_results(method: str, path: str) -> None:
        if path.endswith("/results"):
            threading.Event().wait(1.0)  # the server taking its time over every output

    with HostileVip(upstream=vip_server.url, before=slow_results) as front:
        front.add("GET", r"/executions/workflow-x/results$", "json", body=[])
        with _client(front.url, vip_server.api_key, timeout=0.4, retries=0) as client:
            assert client.results("workflow-x") == []  # results_timeout (600 s) applies
            with pytest.raises(TransientError, match="did not answer within 0.4 s"):
                client.results("workflow-x", timeout=0.3)  # never below the client's timeout
        with _client(front.url, vip_server.api_key, timeout=0.4, retries=0,
                     results_timeout=0.5) as short:
            with pytest.raises(TransientError, match="did not answer within 0.5 s"):
                short.results("workflow-x")


# ---------------------------------------------------------------- listing cap


def test_execution_listing_drops_to_the_server_s_maximum(vip_server: LocalVip) -> None:
    vip_server.faults.list_limit = 20
    with _client(vip_server, vip_server.api_key) as client:
        assert client.executions() == []
        assert client._list_limit == 20
        asked = vip_server.stats.snapshot()["counts"].get("GET /executions", 0)
        assert client.find_execution("nothing") is None
        # the maximum is remembered: one request, not a refused one first
        assert vip_server.stats.snapshot()["counts"].get("GET /executions", 0) == asked + 1


# ---------------------------------------------------------------- redirects


class _Redirector:
    """A loopback http server answering every request with a redirect to ``target`` + path,
    recording the headers it was sent."""

    def __init__(self, target: str, status: int = 301) -> None:
        self.target = target
        self.seen: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _answer(self) -> None:
                outer.seen.append({k.lower(): v for k, v in self.headers.items()})
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                self.send_header("Location", outer.target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_POST = do_DELETE = _answer  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Redirector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tls_front(vip_server: LocalVip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileVip]:
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with HostileVip(upstream=vip_server.url, tls=(cert, key)) as front:
        yield front


def test_a_redirect_to_the_same_host_over_https_is_followed_once_with_a_warning(
    vip_server: LocalVip, tls_front: HostileVip, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    https_port = tls_front.url.rsplit(":", 1)[1]
    with _Redirector(f"https://127.0.0.1:{https_port}") as moved, caplog.at_level(logging.WARNING):
        with _client(f"http://127.0.0.1:{moved.port}", vip_server.api_key) as client:
            assert client.exists(HOME)
            assert client.base_url == f"https://127.0.0.1:{https_port}"
            client.makedirs(f"{HOME}/moved")
            src = _file(tmp_path / "m.bin", 2 * 2**20)
            client.upload(src, f"{HOME}/moved/m.bin")
            client.upload(_file(tmp_path / "s.txt", 100), f"{HOME}/moved/s.txt")
        assert len(moved.seen) == 1  # everything after the first answer went to https
    warnings = [r.getMessage() for r in caplog.records if "redirects to" in r.getMessage()]
    assert len(warnings) == 1 and "set the VIP URL" in warnings[0]
    assert (vip_server.home() / "moved" / "m.bin").read_bytes() == src.read_bytes()


def test_a_redirect_elsewhere_is_a_clear_error_not_an_outage(vip_server: LocalVip) -> None:
    with _Redirector("https://elsewhere.example") as other, _Redirector(
        f"http://127.0.0.1:{vip_server.url.rsplit(':', 1)[1]}"
    ) as plain:
        with _client(f"http://127.0.0.1:{other.port}", vip_server.api_key) as client:
            with pytest.raises(RedirectError, match="elsewhere.example") as err:
                client.exists(HOME)
            assert "unreachable" not in err.value.message and "connection" not in err.value.message
        assert len(other.seen) == 1  # a permanent error: not retried
        with _client(f"http://127.0.0.1:{plain.port}", vip_server.api_key) as client:
            with pytest.raises(RedirectError, match="only sent over https"):
                client.exists(HOME)
        assert len(plain.seen) == 1


def test_the_key_never_goes_over_plain_http_to_a_server_that_redirects(
    vip_server: LocalVip, tls_front: HostileVip
) -> None:
    https_port = tls_front.url.rsplit(":", 1)[1]
    with _Redirector(f"https://localhost:{https_port}") as moved:
        # a host name, not a loopback address: asked once without the key first
        with _client(f"http://localhost:{moved.port}", vip_server.api_key) as client:
            assert client.exists(HOME)
            assert client.base_url == f"https://localhost:{https_port}"
        assert len(moved.seen) == 1 and "apikey" not in moved.seen[0]
    with _Redirector("https://elsewhere.example") as other:
        with _client(f"http://localhost:{other.port}", vip_server.api_key) as client:
            with pytest.raises(RedirectError, match="another host"):
                client.exists(HOME)
        assert all("apikey" not in headers for headers in other.seen)


# ---------------------------------------------------------------- /metrics


def test_metrics_show_each_server_s_budget(vip_server: LocalVip, tmp_path: Path) -> None:
    with _client(vip_server, vip_server.api_key) as client:
        client.exists(HOME)
    budget = budget_for(vip_server.url)
    budget.launch_refused(2001)
    health = Health(version="x", started=0.0, state=str(tmp_path), state_free=1)
    text = Metrics(Journal.in_state_dir(tmp_path), lambda: health).render().decode()
    server = f'{{server="{budget.server}"}}'
    values = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(vip_agent_server_\w+)" + re.escape(server) + r" (\S+)$", text, re.M)
    }
    assert values["vip_agent_server_requests_total"] >= 1
    assert values["vip_agent_server_transfers_max"] == budget.snapshot()["transfers_max"]
    assert values["vip_agent_server_max_requests_per_second"] == budget.snapshot()["max_rate"]
    assert values["vip_agent_server_launches_refused_total"] == 1
    assert values["vip_agent_server_launch_wait_seconds"] > 0


def test_any_spelling_of_the_server_reaches_the_same_rest_root(vip_server: LocalVip) -> None:
    port = vip_server.url.rsplit(":", 1)[1]
    for spelling in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/rest/"):
        with _client(spelling, vip_server.api_key) as client:
            assert client.base_url == vip_server.url
            assert client.exists(HOME)
    with pytest.raises(ConfigError, match="not a VIP server URL"):
        VipClient("ftp://127.0.0.1", "k")


def test_the_local_server_s_redirect_listener_is_refused_by_name(tmp_path: Path) -> None:
    """localvip's redirect_port fault: an http front answering 301 to the real (http) address,
    as VIP's front server sends http to https."""
    with LocalVip(tmp_path / "root", faults="redirect_port=0") as server:
        assert server.redirect_url is not None
        with _client(server.redirect_url, server.api_key) as client:
            for call in (lambda: client.exists(HOME), lambda: client.mkdir(f"{HOME}/x"),
                         client.check_key, client.executions):
                with pytest.raises(RedirectError) as err:
                    call()
                assert server.url in err.value.message and "https" in err.value.message
                assert err.value.http_status == 301


def test_uploads_that_meet_the_redirect_first_are_sent_again_to_https(
    vip_server: LocalVip, tls_front: HostileVip, tmp_path: Path
) -> None:
    https_port = tls_front.url.rsplit(":", 1)[1]
    (vip_server.home() / "first").mkdir()
    small = _file(tmp_path / "s.txt", 300)
    big = _file(tmp_path / "b.bin", 2 * 2**20)
    for first in (small, big):  # the light transport, then requests with a file body
        with _Redirector(f"https://127.0.0.1:{https_port}") as moved:
            with _client(f"http://127.0.0.1:{moved.port}", vip_server.api_key) as client:
                assert client.upload(first, f"{HOME}/first/{first.name}")
                assert client.base_url.startswith("https://")
            assert len(moved.seen) == 1
        assert (vip_server.home() / "first" / first.name).read_bytes() == first.read_bytes()


def test_the_budget_backs_off_when_the_platform_s_transfer_pool_is_full(
    vip_server: LocalVip, tmp_path: Path
) -> None:
    """A platform serving 2 transfers at a time (localvip platform_transfers, VIP's timeout
    after transfer_wait): 8 slots of our own cause timeouts, the budget halves its slots until
    they stop, and every file still arrives; within the platform's cap there are none."""
    files = [_file(tmp_path / f"d{i}.bin", 50_000 + i) for i in range(12)]
    with _client(vip_server, vip_server.api_key) as setup:
        setup.makedirs(f"{HOME}/pool")
        for p in files:
            setup.upload(p, f"{HOME}/pool/{p.name}", verify=False)
    vip_server.faults.platform_transfers = 2
    vip_server.faults.transfer_wait = 0.3
    vip_server.faults.staging_delay = 0.2

    def download_all(budget: ServerBudget, into: Path) -> None:
        with _client(vip_server, vip_server.api_key, budget=budget, retries=8, backoff=0.05) as c:
            with ThreadPoolExecutor(12) as pool:
                list(pool.map(lambda p: c.download(f"{HOME}/pool/{p.name}", into / p.name), files))
        for p in files:
            assert (into / p.name).read_bytes() == p.read_bytes()

    crowded = ServerBudget(vip_server.url, max_rate=0, max_transfers=8)
    download_all(crowded, tmp_path / "crowded")
    refused = vip_server.stats.snapshot()["counts"].get("transfer wait timeout", 0)
    assert refused >= 1
    assert crowded.snapshot()["transfer_timeouts_total"] == refused
    assert crowded.snapshot()["transfers_limit"] <= 4  # halved at least once
    polite = ServerBudget(vip_server.url, max_rate=0, max_transfers=2)
    download_all(polite, tmp_path / "polite")
    assert vip_server.stats.snapshot()["counts"].get("transfer wait timeout", 0) == refused
    assert polite.snapshot()["transfer_timeouts_total"] == 0
