"""Small files go through the light transport (agent/vip/smallput.py): one request each,
over kept-alive connections, with the same errors as every other request.

Real peers only: the local VIP server, and :class:`hostilevip.HostileVip` in front of it
for what a real server or proxy does to keep-alive connections (and for HTTPS, with a
certificate made for the test).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostilevip import HostileVip
from receivers import self_signed

from agent.localvip import LocalVip
from agent.vip.client import VipClient
from agent.vip.errors import AuthError, NotFoundError, SourceChanged, TransientError

FOLDER = "/vip/Home/small"


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(12):
        path = tmp_path / "data" / f"f{i:02d}.dat"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(4000) + bytes([i]))
        out.append(path)
    return out


@pytest.fixture
def front(vip_server: LocalVip) -> Iterator[HostileVip]:
    with HostileVip(upstream=vip_server.url) as server:
        yield server


def stored(vip_server: LocalVip, name: str) -> bytes:
    return (vip_server.home() / "small" / name).read_bytes()


def test_each_small_file_is_one_request_over_one_kept_connection(
    vip_server: LocalVip, front: HostileVip, files: list[Path]
) -> None:
    with VipClient(front.url, vip_server.api_key) as client:
        client.makedirs(FOLDER)
        front.seen.clear()
        before = front.connections
        for f in files:
            assert client.upload(f, f"{FOLDER}/{f.name}", verify=False) is True
    assert front.requests("PUT") == [f"/rest/path{FOLDER}/{f.name}" for f in files]
    assert [m for m, _ in front.seen] == ["PUT"] * len(files)  # no properties, no listing
    assert front.connections - before == 1  # one connection, kept alive
    for f in files:
        assert stored(vip_server, f.name) == f.read_bytes()


def test_parallel_small_uploads_are_byte_identical(
    vip_server: LocalVip, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = tmp_path / "many"
    data.mkdir()
    paths = []
    for i in range(200):
        p = data / f"m{i:03d}.bin"
        p.write_bytes(os.urandom(1 + i * 37))
        paths.append(p)
    with VipClient(vip_server.url, vip_server.api_key, pool=8) as client:
        client.makedirs(FOLDER)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(
                lambda p: client.upload(p, f"{FOLDER}/{p.name}", verify=False), paths))
        sizes = client.sizes(FOLDER)
    assert all(results)
    assert sizes == {p.name: p.stat().st_size for p in paths}
    for p in paths:
        assert stored(vip_server, p.name) == p.read_bytes()


def test_a_connection_dropped_as_the_request_goes_out_is_replaced_at_once(
    vip_server: LocalVip, front: HostileVip, files: list[Path]
) -> None:
    with VipClient(front.url, vip_server.api_key, backoff=30) as client:
        client.makedirs(FOLDER)
        assert client.upload(files[0], f"{FOLDER}/{files[0].name}", verify=False)
        # the next PUT reaches a server that closes the (reused) connection without answering
        front.add("PUT", files[1].name, "close", times=1)
        front.seen.clear()
        # backoff=30: had the client gone through its retry loop, this would take 30 s+
        assert client.upload(files[1], f"{FOLDER}/{files[1].name}", verify=False) is True
    assert front.seen == [("PUT", f"/rest/path{FOLDER}/{files[1].name}")] * 2
    assert stored(vip_server, files[1].name) == files[1].read_bytes()


def test_a_connection_the_server_closed_while_idle_is_not_used(
    vip_server: LocalVip, front: HostileVip, files: list[Path]
) -> None:
    with VipClient(front.url, vip_server.api_key, backoff=30) as client:
        client.makedirs(FOLDER)
        front.add("PUT", files[0].name, "answer_then_close", times=1)
        assert client.upload(files[0], f"{FOLDER}/{files[0].name}", verify=False)
        front.seen.clear()
        assert client.upload(files[1], f"{FOLDER}/{files[1].name}", verify=False)
    # noticed before sending: the request went out once, on a new connection
    assert front.seen == [("PUT", f"/rest/path{FOLDER}/{files[1].name}")]
    assert stored(vip_server, files[1].name) == files[1].read_bytes()


def test_small_upload_errors_are_the_client_s_typed_errors(
    vip_server: LocalVip, files: list[Path], tmp_path: Path
) -> None:
    with VipClient(vip_server.url, "not-a-key", retries=0) as bad:
        with pytest.raises(AuthError, match="vip-agent login"):
            bad.upload(files[0], f"{FOLDER}/x.dat")
    with VipClient(vip_server.url, vip_server.api_key, retries=0, transfer_grace=0) as client:
        with pytest.raises(NotFoundError, match="does not exist on VIP"):
            client.upload(files[0], "/vip/Home/no-such-folder/x.dat")
    # nobody listens on that port any more
    with VipClient(f"http://127.0.0.1:{_free_port()}", "k", retries=0) as gone:
        with pytest.raises(TransientError, match="could not reach VIP"):
            gone.upload(files[0], f"{FOLDER}/x.dat", verify=False)


def test_a_file_that_shrank_before_it_was_read_is_refused(
    vip_server: LocalVip, files: list[Path]
) -> None:
    seen: list[int] = []

    def shrink_first(n: int) -> None:
        seen.append(n)

    with VipClient(vip_server.url, vip_server.api_key) as client:
        client.makedirs(FOLDER)
        size = files[0].stat().st_size
        files[0].write_bytes(b"short")
        with pytest.raises(SourceChanged, match="shrank"):
            client._put_file(files[0], f"{FOLDER}/{files[0].name}", size, shrink_first)
    assert seen == []  # nothing reported as sent
    assert not (vip_server.home() / "small" / files[0].name).exists()


def test_a_server_that_never_answers_a_small_put_is_cut(
    vip_server: LocalVip, front: HostileVip, files: list[Path]
) -> None:
    front.add("PUT", files[0].name, "hang", max_wait=20)
    with VipClient(front.url, vip_server.api_key, timeout=0.5, retries=0) as client:
        client.makedirs(FOLDER)
        with pytest.raises(TransientError, match="did not answer within 0.5 s"):
            client.upload(files[0], f"{FOLDER}/{files[0].name}", verify=False)


def test_small_files_over_https_are_verified_against_the_ca_bundle(
    vip_server: LocalVip, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    with HostileVip(upstream=vip_server.url, tls=(cert, key)) as tls_front:
        assert tls_front.url.startswith("https://")
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        with VipClient(tls_front.url, vip_server.api_key, retries=0) as untrusting:
            with pytest.raises(TransientError, match="not trusted"):
                untrusting.upload(files[0], f"{FOLDER}/{files[0].name}", verify=False)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        with VipClient(tls_front.url, vip_server.api_key) as client:
            client.makedirs(FOLDER)  # through requests, same CA bundle
            before = tls_front.connections
            for f in files[:3]:
                assert client.upload(f, f"{FOLDER}/{f.name}", verify=False)
            assert tls_front.connections - before == 1  # one TLS handshake, then kept alive
            assert client.sizes(FOLDER) == {f.name: f.stat().st_size for f in files[:3]}
    for f in files[:3]:
        assert stored(vip_server, f.name) == f.read_bytes()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ended_transfers_do_not_pile_up_in_the_deadline_watchdog() -> None:
    # each transfer's progress guard is due minutes later; a 20,000-file dataset used to keep
    # 20,000 of them (and their locks) alive in the watchdog's heap until then
    from agent.vip.client import _WATCHDOG, _Guard

    before = len(_WATCHDOG._heap)
    for _ in range(2000):
        _Guard(window=600).close()
    assert len(_WATCHDOG._heap) - before < 600
    live = _Guard(window=600)  # a live guard stays watched
    for _ in range(600):
        _Guard(window=600).close()
    assert any(item[2] is live for item in _WATCHDOG._heap)
    live.close()
