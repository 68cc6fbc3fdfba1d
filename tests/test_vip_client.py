"""Tests for agent.vip.VipClient against the real local server (agent.localvip) over HTTP.

Faults are injected by the server (``vip_server.faults``); nothing is mocked. One test runs a
tiny stdlib HTTP server that echoes request headers in a 502 page, to prove the key is
scrubbed even from a hostile proxy page (localvip never echoes headers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import wait_for

from agent.localvip import LocalVip
from agent.vip import (
    ApiError,
    AuthError,
    CapacityError,
    DeleteTimeout,
    EmptyFileError,
    InvalidNameError,
    LaunchUncertain,
    NotFoundError,
    PathInfo,
    TooLargeError,
    TransientError,
    VipClient,
    VipError,
    encode_pipeline_id,
    start_seconds,
)
from agent.vip.models import to_seconds

HOME = "/vip/Home"


def _client(server: LocalVip, key: str | None = None, **kw: Any) -> VipClient:
    opts: dict[str, Any] = {"timeout": 20, "retries": 4, "backoff": 0.01, "transfer_grace": 5}
    opts.update(kw)
    return VipClient(server.url, server.api_key if key is None else key, **opts)


@pytest.fixture
def client(vip_server: LocalVip) -> Iterator[VipClient]:
    c = _client(vip_server)
    try:
        yield c
    finally:
        c.close()


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _no_key(err: BaseException, key: str) -> None:
    assert isinstance(err, VipError)
    for text in (str(err), repr(err), err.full(), err.detail or ""):
        assert key not in text


# ---------------------------------------------------------------- pure helpers


def test_timestamps_and_path_records() -> None:
    assert to_seconds(None) is None
    assert to_seconds(1751292000000) == 1751292000.0  # VIP: ms
    assert to_seconds(1751292000) == 1751292000.0  # CARMIN: s
    assert start_seconds({"startDate": 1751292000123}) == pytest.approx(1751292000.123)
    assert start_seconds({"startDate": None}) is None
    vip = PathInfo.from_json({"path": "/vip/Home/a", "isDirectory": False, "exists": True,
                              "size": 3, "lastModificationDate": None, "mimeType": "text/plain"})
    carmin = PathInfo.from_json({"platformPath": "/vip/Home/a", "isDirectory": False, "size": 3,
                                 "lastModificationDate": 1751292000000})
    assert vip.path == carmin.path == "/vip/Home/a"
    assert vip.mtime is None and carmin.mtime == 1751292000.0
    assert carmin.exists  # a listing entry without the key exists


def test_pipeline_id_encoding() -> None:
    assert encode_pipeline_id("LCModel/0.2") == "LCModel/0.2"
    assert encode_pipeline_id("FreeSurfer-Recon-all+segmentHA_T1/7.3.2") == (
        "FreeSurfer-Recon-all%252BsegmentHA_T1/7.3.2"
    )
    assert encode_pipeline_id("My Tool 50%/1.0") == "My%20Tool%2050%2525/1.0"
    assert encode_pipeline_id("a/b/c") == "a%2Fb/c"  # split at the last '/'


def test_repr_and_bad_paths_never_show_the_key(vip_server: LocalVip) -> None:
    c = _client(vip_server)
    assert vip_server.api_key not in repr(c)
    assert vip_server.api_key not in repr(vars(c))
    with pytest.raises(ValueError):
        c.exists("vip/Home")
    with pytest.raises(ValueError):
        c.exists("/vip/Home/../Trash")


# ---------------------------------------------------------------- auth and platform


def test_check_key_and_platform(client: VipClient) -> None:
    client.check_key()
    plat = client.platform()
    assert plat["maxSizeDirectTransfer"] == 15_000_000
    assert client.max_transfer_size() == 15_000_000


@pytest.mark.parametrize("bad_key", ["wrong-key-0123456789", "   "])
def test_bad_key_is_auth_error_without_key(vip_server: LocalVip, bad_key: str) -> None:
    c = _client(vip_server, key=bad_key)
    with pytest.raises(AuthError) as caught:
        c.check_key()
    err = caught.value
    assert err.code == 8002 and err.http_status == 401
    assert "vip-agent login" in err.message
    assert err.exit_code == 3
    if bad_key.strip():
        _no_key(err, bad_key)
    # public endpoints too: VIP checks any key that is sent
    with pytest.raises(AuthError):
        c.platform()


def test_missing_key_is_8003(vip_server: LocalVip) -> None:
    c = _client(vip_server, key="")
    with pytest.raises(AuthError) as caught:
        c.exists(HOME)
    assert caught.value.code == 8003
    assert "no API key" in caught.value.message


def test_key_scrubbed_from_proxy_page_that_echoes_headers(tmp_path: Path) -> None:
    """A real (hostile) HTTP server echoing the request headers in a 502 page."""

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = ("<html>502 Bad Gateway " + json.dumps(dict(self.headers)) + "</html>").encode()
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    key = "s3cret-key-that-must-not-leak"
    try:
        c = VipClient(f"http://127.0.0.1:{httpd.server_address[1]}", key, retries=1, backoff=0.01)
        with pytest.raises(TransientError) as caught:
            c.exists(HOME)
        assert caught.value.http_status == 502
        assert "<apikey>" in (caught.value.detail or "")  # the echo was there, and scrubbed
        _no_key(caught.value, key)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_unreachable_server_is_transient(tmp_path: Path) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    c = VipClient(f"http://127.0.0.1:{port}", "k3y-unreachable", retries=2, backoff=0.01)
    with pytest.raises(TransientError) as caught:
        c.properties(HOME)
    _no_key(caught.value, "k3y-unreachable")
    # a refused connection never reached VIP: a launch may be retried, and then fails plainly
    with pytest.raises(TransientError) as launch:
        c.create_execution("x", "Sleep/1.0", {"duration": "1"}, HOME)
    assert not isinstance(launch.value, LaunchUncertain)


# ---------------------------------------------------------------- paths


def test_folders_listing_and_properties(client: VipClient) -> None:
    client.makedirs(f"{HOME}/a/b/c")
    assert client.exists(f"{HOME}/a/b/c")
    client.makedirs(f"{HOME}/a/b/c")  # again: nothing to do
    client.mkdir(f"{HOME}/a/b")  # existing folder tolerated
    listing = client.list(f"{HOME}/a")
    assert [(p.path, p.is_dir) for p in listing] == [(f"{HOME}/a/b", True)]
    props = client.properties(f"{HOME}/a")
    assert props.exists and props.is_dir and props.size == 1
    missing = client.properties(f"{HOME}/nope")
    assert not missing.exists
    with pytest.raises(NotFoundError):
        client.list(f"{HOME}/nope")
    with pytest.raises(NotFoundError):
        client.mkdir(f"{HOME}/nope/child")


def test_odd_characters_are_encoded(client: VipClient, tmp_path: Path) -> None:
    name = "a#b%c?d+e(1).txt"
    src = _file(tmp_path / "odd.txt", 1000)
    client.upload(src, f"{HOME}/{name}")
    info = client.properties(f"{HOME}/{name}")
    assert info.exists and info.size == 1000 and info.name == name
    assert [p.name for p in client.list(HOME)] == [name]
    back = tmp_path / "back.txt"
    client.download(f"{HOME}/{name}", back)
    assert back.read_bytes() == src.read_bytes()


def test_names_vip_would_rename_are_refused(client: VipClient, tmp_path: Path) -> None:
    src = _file(tmp_path / "x.txt", 10)
    with pytest.raises(InvalidNameError):
        client.upload(src, f"{HOME}/my file.txt")
    with pytest.raises(InvalidNameError):
        client.mkdir(f"{HOME}/résultats")
    assert client.list(HOME) == []


def test_delete_and_wait_deleted_with_delay(vip_server: LocalVip, client: VipClient, tmp_path: Path) -> None:
    vip_server.faults.delete_delay = 0.6
    client.makedirs(f"{HOME}/gone/sub")
    client.upload(_file(tmp_path / "f.bin", 100), f"{HOME}/gone/sub/f.bin")
    client.delete(f"{HOME}/gone")
    assert client.exists(f"{HOME}/gone")  # VIP deletes in the background
    with pytest.raises(DeleteTimeout):
        client.wait_deleted(f"{HOME}/gone", timeout=0.05, interval=0.01)
    start = time.monotonic()
    client.wait_deleted(f"{HOME}/gone", timeout=10, interval=0.05)
    assert time.monotonic() - start < 5
    assert not client.exists(f"{HOME}/gone")
    with pytest.raises(NotFoundError):
        client.delete(f"{HOME}/gone")
    client.delete(f"{HOME}/gone", missing_ok=True)


# ---------------------------------------------------------------- transfers


def test_round_trip_multi_mb(client: VipClient, tmp_path: Path) -> None:
    src = _file(tmp_path / "data.bin", 6 * 2**20 + 123)
    sent: list[int] = []
    client.makedirs(f"{HOME}/in")
    client.upload(src, f"{HOME}/in/data.bin", progress=sent.append)
    assert sum(sent) == src.stat().st_size
    assert len(sent) > 1 and max(sent) <= 2**20  # streamed in bounded pieces
    assert client.properties(f"{HOME}/in/data.bin").size == src.stat().st_size

    dest = tmp_path / "out" / "data.bin"
    got: list[int] = []
    n = client.download(f"{HOME}/in/data.bin", dest, expected_size=src.stat().st_size,
                        progress=got.append)
    assert n == src.stat().st_size == sum(got)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.bin"]  # no .part left


def test_upload_of_existing_same_size_file_is_done_and_wrong_size_is_replaced(
    vip_server: LocalVip, client: VipClient, tmp_path: Path
) -> None:
    src = _file(tmp_path / "a.bin", 5000)
    client.upload(src, f"{HOME}/a.bin")
    client.upload(src, f"{HOME}/a.bin")  # already there with the right size: done
    bigger = _file(tmp_path / "a2.bin", 7000)
    vip_server.faults.delete_delay = 0.2
    client.upload(bigger, f"{HOME}/a.bin")  # wrong size there: delete, wait, send again
    assert client.properties(f"{HOME}/a.bin").size == 7000
    assert (vip_server.home() / "a.bin").read_bytes() == bigger.read_bytes()


def test_zero_byte_upload_refused(client: VipClient, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(EmptyFileError) as caught:
        client.upload(empty, f"{HOME}/empty.txt")
    assert "empty" in caught.value.message
    assert not client.exists(f"{HOME}/empty.txt")  # no folder was created


def test_download_too_large(vip_server: LocalVip, tmp_path: Path) -> None:
    vip_server.max_download = 1000
    c = _client(vip_server)
    c.upload(_file(tmp_path / "big.bin", 2000), f"{HOME}/big.bin")
    dest = tmp_path / "dl" / "big.bin"
    with pytest.raises(TooLargeError) as caught:
        c.download(f"{HOME}/big.bin", dest)
    assert "2,000 bytes" in caught.value.message and "1,000 bytes" in caught.value.message
    with pytest.raises(TooLargeError):
        c.download(f"{HOME}/big.bin", dest, expected_size=2000)  # refused before asking
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_missing_and_folder(client: VipClient, tmp_path: Path) -> None:
    dl = tmp_path / "dl"
    with pytest.raises(NotFoundError):
        client.download(f"{HOME}/nothing.bin", dl / "x")
    client.mkdir(f"{HOME}/dir")
    with pytest.raises(ApiError) as caught:
        client.download(f"{HOME}/dir", dl / "x")
    assert "folder" in caught.value.message
    assert list(dl.iterdir()) == []  # no file, no .part


def test_streaming_memory_stays_flat(vip_server: LocalVip, tmp_path: Path) -> None:
    """Upload then download 160 MB in a child process and measure its peak RSS growth."""
    size = 160 * 2**20
    vip_server.max_download = 2 * size
    src = tmp_path / "huge.bin"
    with open(src, "wb") as f:  # sparse file: fast to make, still 160 MB to read and send
        f.truncate(size)
    child = r"""
import resource, sys
from pathlib import Path
from agent.vip import VipClient
url, src, dest = sys.argv[1:4]
key = sys.stdin.readline().strip()
c = VipClient(url, key, backoff=0.01)
c.check_key()
c.max_transfer_size()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c.upload(Path(src), "/vip/Home/huge.bin")
up = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = c.download("/vip/Home/huge.bin", Path(dest))
down = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, up, down, n)
"""
    dest = tmp_path / "back.bin"
    # the key goes through stdin, never argv or the environment
    proc = subprocess.run(
        [sys.executable, "-c", child, vip_server.url, str(src), str(dest)],
        input=vip_server.api_key + "\n", capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, up, down, n = (int(x) for x in proc.stdout.split())
    assert n == size and dest.stat().st_size == size
    # ru_maxrss is in KiB on Linux; reading the file whole would add ~160 MB
    assert up - base < 40 * 1024, (base, up)
    assert down - base < 40 * 1024, (base, down)


# ---------------------------------------------------------------- faults and retries


def test_retries_on_proxy_errors(vip_server: LocalVip, client: VipClient) -> None:
    vip_server.faults.error_rate = 1.0
    vip_server.faults.times = 3
    assert client.exists(HOME) is True
    assert vip_server.faults.injected == 3


def test_retries_exhausted_is_transient(vip_server: LocalVip) -> None:
    c = _client(vip_server, retries=2)
    vip_server.faults.error_rate = 1.0
    with pytest.raises(TransientError) as caught:
        c.list(HOME)
    assert caught.value.http_status in (500, 502)
    assert vip_server.faults.injected == 3  # first try + 2 retries
    _no_key(caught.value, vip_server.api_key)


def test_retries_on_dropped_connections(vip_server: LocalVip, client: VipClient, tmp_path: Path) -> None:
    client.mkdir(f"{HOME}/d")
    vip_server.faults.drop_rate = 1.0
    vip_server.faults.times = 2
    assert [p.name for p in client.list(HOME)] == ["d"]
    assert vip_server.faults.injected == 2
    # an upload dropped mid-body: nothing lands, the client sends it again
    vip_server.faults.seed = 1
    vip_server.faults.times = 3
    vip_server.faults.methods = frozenset({"PUT"})
    src = _file(tmp_path / "u.bin", 3 * 2**20)
    client.upload(src, f"{HOME}/d/u.bin")
    assert (vip_server.home() / "d" / "u.bin").read_bytes() == src.read_bytes()
    # a download dropped halfway: retried, and no partial file is left
    vip_server.faults.methods = frozenset({"GET"})
    vip_server.faults.match = r"^/rest/path/.*u\.bin$"
    vip_server.faults.times = 5
    dest = tmp_path / "dl" / "u.bin"
    assert client.download(f"{HOME}/d/u.bin", dest) == src.stat().st_size
    assert vip_server.faults.injected == 5
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["u.bin"]


def test_transfer_timeout_upload_lands_later_without_duplicate(
    vip_server: LocalVip, client: VipClient, tmp_path: Path
) -> None:
    vip_server.faults.transfer_timeout = 1.0
    vip_server.faults.transfer_land_delay = 0.3
    vip_server.faults.methods = frozenset({"PUT"})
    vip_server.faults.times = 1
    src = _file(tmp_path / "t.bin", 2 * 2**20)
    client.makedirs(f"{HOME}/up")
    client.upload(src, f"{HOME}/up/t.bin")  # no error although VIP answered 400 8000
    assert vip_server.faults.injected == 1
    assert [(p.name, p.size) for p in client.list(f"{HOME}/up")] == [("t.bin", src.stat().st_size)]
    assert (vip_server.home() / "up" / "t.bin").read_bytes() == src.read_bytes()


def test_transfer_timeout_download_is_retried(vip_server: LocalVip, client: VipClient, tmp_path: Path) -> None:
    src = _file(tmp_path / "t.bin", 100_000)
    client.upload(src, f"{HOME}/t.bin")
    vip_server.faults.transfer_timeout = 1.0
    vip_server.faults.methods = frozenset({"GET"})
    vip_server.faults.times = 2
    dest = tmp_path / "t.out"
    assert client.download(f"{HOME}/t.bin", dest, expected_size=100_000) == 100_000
    assert vip_server.faults.injected == 2
    assert dest.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------- pipelines


def test_pipelines_and_boutiques(client: VipClient) -> None:
    ids = {p["identifier"] for p in client.pipelines()}
    assert "Sleep/1.0" in ids
    detail = client.pipeline("Sleep/1.0")
    assert detail["identifier"] == "Sleep/1.0"
    assert {p["name"] for p in detail["parameters"]} >= {"duration"}
    assert client.boutiques("Sleep/1.0")["name"] == "Sleep"
    with pytest.raises(NotFoundError) as caught:
        client.pipeline("Sleep/9.9")
    assert caught.value.code == 8007


def test_pipeline_ids_with_plus_space_percent(tmp_path: Path) -> None:
    pipes = tmp_path / "pipes"
    pipes.mkdir()
    names = ["Recon-all+segmentHA_T1", "My Tool 50%"]
    for i, name in enumerate(names):
        desc = {"name": name, "tool-version": "7.1+b", "command-line": "true [X]",
                "schema-version": "0.5", "description": "d",
                "inputs": [{"id": "x", "name": "x", "type": "String", "value-key": "[X]"}]}
        (pipes / f"p{i}.json").write_text(json.dumps(desc))
    with LocalVip(tmp_path / "root", pipelines_dir=pipes) as server:
        c = _client(server)
        for name in names:
            ident = f"{name}/7.1+b"
            assert c.pipeline(ident)["identifier"] == ident
            assert c.boutiques(ident)["name"] == name
        with pytest.raises(NotFoundError):
            c.pipeline("Recon-all segmentHA_T1/7.1+b")  # a '+' is not a space


# ---------------------------------------------------------------- executions


def _finished(c: VipClient, exec_id: str) -> dict[str, Any] | None:
    e = c.execution(exec_id)
    return e if e["status"] not in ("Running", "Ready", "Initializing") else None


def test_execution_lifecycle(client: VipClient) -> None:
    client.makedirs(f"{HOME}/out")
    created = client.create_execution("run_1", "Sleep/1.0", {"duration": "0.05"}, f"{HOME}/out")
    exec_id = created["identifier"]
    assert created["status"] == "Running"
    assert start_seconds(created) == pytest.approx(time.time(), abs=60)
    done = wait_for(lambda: _finished(client, exec_id), what="execution end")
    assert done["status"] == "Finished"
    results = client.results(exec_id)
    assert results and all(r.exists and r.path.startswith(f"{HOME}/out/") for r in results)
    assert isinstance(client.stdout(exec_id), str)
    assert isinstance(client.stderr(exec_id, job="0"), str)
    client.delete_execution(exec_id, delete_files=False)
    with pytest.raises(NotFoundError) as caught:
        client.execution(exec_id)
    assert caught.value.code == 8015
    client.delete_execution(exec_id)  # already deleted: harmless
    with pytest.raises(NotFoundError):
        client.execution("workflow-nope")


def test_kill_and_capacity(client: VipClient) -> None:
    first = client.create_execution("long", "Sleep/1.0", {"duration": "60"}, HOME)
    with pytest.raises(CapacityError) as caught:  # the local server allows 1 running per user
        client.create_execution("second", "Sleep/1.0", {"duration": "1"}, HOME)
    assert caught.value.code == 2001
    with pytest.raises(ApiError):
        client.delete_execution(first["identifier"])  # still running
    client.kill(first["identifier"])
    client.kill(first["identifier"])  # idempotent
    killed = wait_for(lambda: _finished(client, first["identifier"]), what="kill")
    assert killed["status"] in ("Killed", "Unknown")


def test_capacity_fault_is_typed(vip_server: LocalVip, client: VipClient) -> None:
    vip_server.faults.capacity = 1.0
    with pytest.raises(CapacityError) as caught:
        client.create_execution("cap", "Sleep/1.0", {"duration": "1"}, HOME)
    assert caught.value.code == 2001 and "retried later" in caught.value.message
    assert client.executions() == []


def test_launch_not_retried_on_proxy_error(vip_server: LocalVip, client: VipClient) -> None:
    vip_server.faults.error_rate = 1.0
    vip_server.faults.methods = frozenset({"POST"})
    vip_server.faults.times = 1  # a retry would succeed and create an execution
    with pytest.raises(LaunchUncertain) as caught:
        client.create_execution("once", "Sleep/1.0", {"duration": "0.05"}, HOME)
    assert vip_server.faults.injected == 1
    assert isinstance(caught.value, TransientError)
    _no_key(caught.value, vip_server.api_key)
    assert client.find_execution("once") is None
    assert client.executions() == []


def test_launch_dropped_after_creation_is_uncertain_and_findable(
    vip_server: LocalVip, client: VipClient
) -> None:
    vip_server.faults.drop_rate = 1.0
    vip_server.faults.methods = frozenset({"POST"})
    vip_server.faults.times = 1
    with pytest.raises(LaunchUncertain):
        client.create_execution("dropped", "Sleep/1.0", {"duration": "0.05"}, HOME)
    found = client.find_execution("dropped")
    assert found is not None
    assert [e["name"] for e in client.executions()] == ["dropped"]  # exactly one, no duplicate


def test_find_execution_returns_newest(client: VipClient) -> None:
    a = client.create_execution("same", "Sleep/1.0", {"duration": "0.05"}, HOME)["identifier"]
    wait_for(lambda: _finished(client, a), what="first execution")
    b = client.create_execution("same", "Sleep/1.0", {"duration": "0.05"}, HOME)["identifier"]
    assert a != b
    found = client.find_execution("same")
    assert found is not None and found["identifier"] == b
    assert client.find_execution("sam") is None


def test_one_client_shared_by_threads(vip_server: LocalVip, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    c = _client(vip_server, pool=8)
    c.makedirs(f"{HOME}/many")
    sources = [_file(tmp_path / f"f{i}.bin", 200_000 + i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: c.upload(p, f"{HOME}/many/{p.name}"), sources))
        sizes = list(pool.map(
            lambda p: c.download(f"{HOME}/many/{p.name}", tmp_path / "back" / p.name), sources
        ))
    assert sizes == [p.stat().st_size for p in sources]
    for p in sources:
        assert (tmp_path / "back" / p.name).read_bytes() == p.read_bytes()
    assert len(c.list(f"{HOME}/many")) == 16


class _Stop(Exception):
    pass


def test_progress_callback_can_abort(client: VipClient, tmp_path: Path) -> None:
    src = _file(tmp_path / "s.bin", 4 * 2**20)

    def stop_after_first(n: int) -> None:
        raise _Stop()

    with pytest.raises(_Stop):
        client.upload(src, f"{HOME}/s.bin", progress=stop_after_first)
    assert not client.exists(f"{HOME}/s.bin")  # nothing half-written landed
    client.upload(src, f"{HOME}/s.bin")  # the client is still usable
    dest = tmp_path / "dl" / "s.bin"
    with pytest.raises(_Stop):
        client.download(f"{HOME}/s.bin", dest, progress=stop_after_first)
    assert list(dest.parent.iterdir()) == []  # no .part left
