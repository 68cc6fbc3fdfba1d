"""LocalVip: authentication, platform, error model and /rest/path (docs/vip-rest.md: keys, errors, files)."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from pathlib import Path

import requests
from conftest import VipApi

from agent.localvip import LocalVip

WWW = "header; header-name=apikey"


def _is_error(r: requests.Response, status: int, code: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["errorCode", "errorMessage"]
    assert body["errorCode"] == code


# -- authentication ------------------------------------------------------------------
def test_bad_key_is_401_8002_everywhere_with_www_authenticate(vip_server: LocalVip) -> None:
    bad = VipApi(vip_server, key="not-the-key")
    for method, path in [("GET", "/platform"), ("PUT", "/platform"), ("POST", "/authenticate"),
                         ("GET", "/path/vip/Home?action=exists"), ("GET", "/no/such/url"),
                         ("GET", "/executions")]:
        r = bad.request(method, path)
        _is_error(r, 401, 8002)
        assert r.json()["errorMessage"] == "Bad credentials"
        assert r.headers["WWW-Authenticate"] == WWW
    _is_error(VipApi(vip_server, key="").get("/platform"), 401, 8002)


def test_missing_key_is_8003_on_protected_urls_only(vip_server: LocalVip) -> None:
    anon = requests.Session()
    base = vip_server.url + "/rest"
    for path in ["/path/vip/Home?action=exists", "/executions", "/executions/count", "/pipelines",
                 "/unmapped"]:
        r = anon.get(base + path, timeout=10)
        _is_error(r, 401, 8003)
        assert r.headers["WWW-Authenticate"] == WWW
    assert anon.get(base + "/platform", timeout=10).status_code == 200
    public = anon.get(base + "/pipelines?public", timeout=10)
    assert public.status_code == 200 and any(p["identifier"] == "FileStats/1.0" for p in public.json())
    # HTTP Basic is not a VIP credential
    _is_error(anon.get(base + "/executions", auth=("user@localvip", "localvip"), timeout=10), 401, 8003)


def test_platform_get_and_put(vip_api: VipApi, vip_server: LocalVip) -> None:
    for method in ("GET", "PUT", "POST"):
        r = vip_api.request(method, "/platform")
        assert r.status_code == 200
        info = r.json()
        assert info["maxSizeDirectTransfer"] == 15_000_000
        assert info["defaultLimitListExecutions"] == 500
        codes = {e["errorCode"] for e in info["APIErrorCodesAndMessages"]}
        assert {8000, 8002, 8013, 8015, 2001} <= codes
        assert info["apierrorCodesAndMessages"] == info["APIErrorCodesAndMessages"]
    assert vip_api.get("/platform/").status_code == 200  # trailing slash tolerated


def test_authenticate(vip_server: LocalVip) -> None:
    url = vip_server.url + "/rest/authenticate"
    r = requests.post(url, json={"username": "user@localvip", "password": "localvip"}, timeout=10)
    assert r.status_code == 200
    assert r.json() == {"httpHeader": "apikey", "httpHeaderValue": vip_server.api_key}
    r = requests.post(url, json={"username": "user@localvip", "password": "nope"}, timeout=10)
    _is_error(r, 401, 8002)
    assert r.json()["errorMessage"] == "Bad credentials (Error code 8002)"
    r = requests.post(url, json={"username": "user@localvip"}, timeout=10)
    _is_error(r, 400, 8009)
    assert r.json()["errorMessage"] == (
        "Input field 'password' is not valid. Cause : must not be null (Error code 8009)")
    _is_error(requests.post(url, data=b"{not json", timeout=10), 400, 8000)


def test_account_locks_after_more_than_five_failures(vip_server: LocalVip) -> None:
    url = vip_server.url + "/rest/authenticate"
    for _ in range(6):
        requests.post(url, json={"username": "user@localvip", "password": "bad"}, timeout=10)
    r = requests.get(vip_server.url + "/rest/executions/count",
                     headers={"apikey": vip_server.api_key}, timeout=10)
    _is_error(r, 401, 8004)


def test_unmapped_url_is_404_generic_and_wrong_method_405(vip_api: VipApi, vip_server: LocalVip) -> None:
    r = vip_api.get("/nothing/here")
    _is_error(r, 404, 8000)
    assert r.json()["errorMessage"] == "An error has been encountered on the VIP API"
    _is_error(requests.get(vip_server.url + "/elsewhere", timeout=10), 404, 8000)
    _is_error(vip_api.get("/executions/workflow-x/kill"), 400, 8000)  # unknown id first
    _is_error(vip_api.get("/authenticate"), 405, 8000)


def test_garbage_request_does_not_kill_the_server(vip_server: LocalVip, vip_api: VipApi) -> None:
    with socket.create_connection(("127.0.0.1", vip_server.port), timeout=5) as s:
        s.sendall(b"PUT /rest/path/vip/Home/x HTTP/1.1\r\nHost: x\r\napikey: " +
                  vip_server.api_key.encode() + b"\r\nContent-Length: abc\r\n\r\n")
        assert b" 400 " in s.recv(4096).split(b"\r\n")[0] + b" "
    assert vip_api.get("/platform").status_code == 200


def test_internal_errors_are_500_8000_without_traceback(vip_api: VipApi) -> None:
    # a JSON null input makes VIP dereference null (NullPointerException → 500)
    r = vip_api.request("POST", "/executions", json={
        "name": "n", "pipelineIdentifier": "FileStats/1.0", "inputValues": {"input_file": None}})
    _is_error(r, 500, 8000)
    assert "Traceback" not in r.text


# -- paths -------------------------------------------------------------------------
def test_exists_properties_list(vip_api: VipApi, vip_server: LocalVip) -> None:
    assert vip_api.put("/path/vip/Home/in").status_code == 201
    vip_api.upload("/vip/Home/in/a.txt", b"hello")
    assert vip_api.get("/path/vip/Home/in/a.txt?action=exists").json() == {"exists": True}
    assert vip_api.get("/path/vip/Home/nope?action=exists").json() == {"exists": False}
    assert vip_api.get("/path/vip?action=exists").json() == {"exists": True}
    props = vip_api.get("/path/vip/Home/in/a.txt?action=properties").json()
    assert props == {"path": "/vip/Home/in/a.txt", "lastModificationDate": None, "isDirectory": False,
                     "exists": True, "size": 5, "executionId": None, "mimeType": "text/plain"}
    d = vip_api.get("/path/vip/Home/in?action=properties").json()
    assert d["isDirectory"] is True and d["size"] == 1 and d["mimeType"] == "text/directory"
    assert isinstance(d["lastModificationDate"], int) and abs(d["lastModificationDate"] - time.time()) < 60
    missing = vip_api.get("/path/vip/Home/zz?action=properties")
    assert missing.status_code == 200
    assert missing.json() == {"path": "/vip/Home/zz", "lastModificationDate": None, "isDirectory": None,
                              "exists": False, "size": None, "executionId": None, "mimeType": None}
    assert vip_api.put("/path/vip/Home/in/sub").status_code == 201
    listing = {e["path"]: e for e in vip_api.get("/path/vip/Home/in?action=list").json()}
    assert listing["/vip/Home/in/sub"]["size"] == 0 and listing["/vip/Home/in/sub"]["isDirectory"] is True
    assert listing["/vip/Home/in/sub"]["lastModificationDate"] is None
    assert listing["/vip/Home/in/a.txt"]["size"] == 5
    assert vip_api.put("/path/vip/Home/empty").status_code == 201
    assert vip_api.get("/path/vip/Home/empty?action=list").json() == []
    _is_error(vip_api.get("/path/vip/Home/zz?action=list"), 400, 8000)
    _is_error(vip_api.get("/path/vip/Home/in/a.txt?action=list"), 400, 8000)
    _is_error(vip_api.get("/path/vip/Home/in/a.txt?action=md5"), 400, 8000)
    _is_error(vip_api.get("/path/vip/Home/in/a.txt?action=bogus"), 400, 8000)
    _is_error(vip_api.get("/path/vip/Home/in/a.txt"), 400, 8000)  # no action


def test_vip_root_and_forbidden_paths(vip_api: VipApi) -> None:
    roots = vip_api.get("/path/vip?action=list").json()
    assert [e["path"] for e in roots] == ["/vip/Home", "/vip/Trash"]
    assert all(e["size"] is None and e["mimeType"] == "text/directory" for e in roots)
    props = vip_api.get("/path/vip?action=properties").json()
    assert props["isDirectory"] is True and props["size"] == 2
    for path in ["/etc?action=exists", "/vip/Users/other?action=list", "/vip/Home/../../x?action=exists",
                 "/vip/Other%20(group)?action=exists"]:
        _is_error(vip_api.get("/path" + path), 400, 8013)
    for path in ["/vip", "/vip/Home", "/vip/Trash"]:
        _is_error(vip_api.put("/path" + path, data=b"x"), 400, 8013)
        _is_error(vip_api.request("DELETE", "/path" + path), 400, 8013)
    assert vip_api.get("/path/vip/Trash?action=list").json() == []


def test_upload_rules(vip_api: VipApi, vip_server: LocalVip) -> None:
    r = vip_api.put("/path/vip/Home/f.bin", data=b"\x00\x01")
    assert r.status_code == 201 and r.content == b""
    _is_error(vip_api.put("/path/vip/Home/f.bin", data=b"again"), 400, 8000)  # no overwrite
    assert (vip_server.home() / "f.bin").read_bytes() == b"\x00\x01"
    _is_error(vip_api.put("/path/vip/Home/missing/f.bin", data=b"x"), 400, 8000)  # parent must exist
    _is_error(vip_api.put("/path/vip/Home/a/b/"), 400, 8000)  # mkdir is not recursive
    assert vip_api.put("/path/vip/Home/a/").status_code == 201  # trailing slash (vip-client)
    assert vip_api.put("/path/vip/Home/a").status_code == 201  # existing dir: silently fine
    assert (vip_server.home() / "a").is_dir()
    # sanitised name: spaces → _, accents decomposed, other non-ASCII dropped
    assert vip_api.put("/path/vip/Home/my%20file%20%C3%A9%E2%82%AC.txt", data=b"x").status_code == 201
    assert (vip_server.home() / "my_file_e.txt").read_bytes() == b"x"
    # '+' is not a space in paths
    assert vip_api.put("/path/vip/Home/a+b.txt", data=b"y").status_code == 201
    assert (vip_server.home() / "a+b.txt").exists()
    # CARMIN base64 upload
    payload = {"type": "File", "base64Content": base64.b64encode(b"b64 data").decode(), "md5": "x"}
    r = vip_api.put("/path/vip/Home/b64.txt", json=payload, headers={"Content-Type": "application/carmin+json"})
    assert r.status_code == 201
    assert (vip_server.home() / "b64.txt").read_bytes() == b"b64 data"
    payload["type"] = "Archive"
    _is_error(vip_api.put("/path/vip/Home/arch.zip", json=payload,
                          headers={"Content-Type": "application/carmin+json"}), 400, 8000)


def test_chunked_upload_and_streamed_download(vip_api: VipApi, vip_server: LocalVip) -> None:
    blob = bytes(range(256)) * 20000  # ~5 MB

    def gen():  # requests sends a generator with Transfer-Encoding: chunked
        for i in range(0, len(blob), 300001):
            yield blob[i:i + 300001]

    r = vip_api.put("/path/vip/Home/big.bin", data=gen())
    assert r.status_code == 201
    r = vip_api.get("/path/vip/Home/big.bin?action=content", stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/octet-stream"
    assert int(r.headers["Content-Length"]) == len(blob)
    got = hashlib.sha256()
    for part in r.iter_content(1 << 16):
        got.update(part)
    assert got.hexdigest() == hashlib.sha256(blob).hexdigest()
    # keep-alive still works after the big transfer
    assert vip_api.get("/path/vip/Home/big.bin?action=exists").json() == {"exists": True}
    # no leftover temp files
    assert list((vip_server.root / ".localvip" / "tmp").iterdir()) == []


def test_content_errors_and_size_cap(tmp_path: Path) -> None:
    with LocalVip(tmp_path / "r", max_download=10) as server:
        api = VipApi(server)
        assert api.get("/platform").json()["maxSizeDirectTransfer"] == 10
        api.upload("/vip/Home/small", b"0123456789")
        api.upload("/vip/Home/large", b"0123456789A")
        assert api.get("/path/vip/Home/small?action=content").content == b"0123456789"
        _is_error(api.get("/path/vip/Home/large?action=content"), 400, 8000)
        _is_error(api.get("/path/vip/Home?action=content"), 400, 8000)
        _is_error(api.get("/path/vip/Home/none?action=content"), 400, 8000)
        _is_error(api.get("/path/vip?action=content"), 400, 8000)


def test_delete_is_recursive_and_missing_is_8000(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_api.put("/path/vip/Home/d")
    vip_api.put("/path/vip/Home/d/e")
    vip_api.upload("/vip/Home/d/e/f.txt", b"x")
    r = vip_api.request("DELETE", "/path/vip/Home/d")
    assert r.status_code == 204
    assert vip_api.get("/path/vip/Home/d?action=exists").json() == {"exists": False}
    assert not (vip_server.home() / "d").exists()
    _is_error(vip_api.request("DELETE", "/path/vip/Home/d"), 400, 8000)


def test_delete_visibility_delay(tmp_path: Path) -> None:
    with LocalVip(tmp_path / "r", delete_delay=0.5) as server:
        api = VipApi(server)
        api.upload("/vip/Home/x.txt", b"x")
        t0 = time.monotonic()
        assert api.request("DELETE", "/path/vip/Home/x.txt").status_code == 204
        assert api.get("/path/vip/Home/x.txt?action=exists").json() == {"exists": True}
        assert [e["path"] for e in api.get("/path/vip/Home?action=list").json()] == ["/vip/Home/x.txt"]
        _is_error(api.put("/path/vip/Home/x.txt", data=b"y"), 400, 8000)  # still there: no overwrite
        deadline = time.monotonic() + 5
        while api.get("/path/vip/Home/x.txt?action=exists").json()["exists"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert time.monotonic() - t0 >= 0.45


def test_other_users_cannot_see_each_other(tmp_path: Path) -> None:
    with LocalVip(tmp_path / "r", api_keys=["key-one", "key-two"]) as server:
        one, two = VipApi(server, "key-one"), VipApi(server, "key-two")
        one.upload("/vip/Home/mine.txt", b"1")
        assert two.get("/path/vip/Home/mine.txt?action=exists").json() == {"exists": False}
        assert (tmp_path / "r" / "user_localvip" / "mine.txt").exists()
        assert server.home(1) == tmp_path.resolve() / "r" / "user2_localvip"
        _is_error(two.get("/path/vip/Users/user_localvip?action=list"), 400, 8013)
        one.upload("/vip/Home/in.txt", b"abc")
        ex = one.launch("FileStats/1.0", {"input_file": "/vip/Home/in.txt"})
        _is_error(two.get(f"/executions/{ex['identifier']}"), 400, 8000)
        assert two.get("/executions/count").text == "0"
