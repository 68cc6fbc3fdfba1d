"""LocalVip fault injection: every knob, targeting, determinism."""

from __future__ import annotations

import re
import time

import pytest
import requests
from conftest import VipApi

from agent.errors import ConfigError
from agent.localvip import FaultSpec, LocalVip


def test_parse_spec() -> None:
    spec = FaultSpec.parse("error_rate=0.1,drop_rate=0.05,latency=0.2,transfer_timeout=0.1,capacity=0.2,"
                           "unknown_blip=0.3,delete_delay=2,legacy_dates,legacy_defaults,seed=1,"
                           "match=^/rest/path/,methods=GET|PUT,times=3")
    assert (spec.error_rate, spec.drop_rate, spec.latency, spec.capacity) == (0.1, 0.05, 0.2, 0.2)
    assert spec.legacy_dates and spec.legacy_defaults and spec.delete_delay == 2 and spec.seed == 1
    assert spec.methods == frozenset({"GET", "PUT"}) and spec.match == "^/rest/path/" and spec.times == 3
    with pytest.raises(ConfigError):
        FaultSpec.parse("nonsense=1")
    with pytest.raises(ConfigError):
        FaultSpec.parse("error_rate=lots")


def test_faults_are_off_by_default(vip_api: VipApi, vip_server: LocalVip) -> None:
    assert not vip_server.faults.active
    for _ in range(20):
        assert vip_api.get("/platform").status_code == 200


def test_error_rate_is_non_json_5xx_and_seeded(vip_api: VipApi, vip_server: LocalVip) -> None:
    def pattern() -> list[int]:
        vip_server.faults = FaultSpec(error_rate=0.5, seed=7)
        return [vip_api.get("/executions/count").status_code for _ in range(30)]

    first = pattern()
    assert first == pattern()  # same seed, same sequence
    assert set(first) - {200} and set(first) <= {200, 500, 502}
    vip_server.faults = FaultSpec(error_rate=1.0)
    r = vip_api.get("/platform")
    assert r.status_code in (500, 502) and not r.headers["Content-Type"].startswith("application/json")


def test_targeting_by_url_method_and_times(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_server.faults = FaultSpec(error_rate=1.0, match=r"^/rest/executions", methods=frozenset({"GET"}), times=2)
    assert vip_api.get("/platform").status_code == 200  # URL not targeted
    assert vip_api.request("POST", "/executions", json={}).status_code == 400  # method not targeted
    assert [vip_api.get("/executions/count").status_code for _ in range(3)] in ([500, 500, 200],
                                                                               [502, 502, 200],
                                                                               [500, 502, 200],
                                                                               [502, 500, 200])
    assert vip_server.faults.injected == 2


def test_drop_rate_cuts_responses_and_uploads(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_api.upload("/vip/Home/f.bin", b"z" * 100_000)
    vip_server.faults = FaultSpec(drop_rate=1.0, times=1, methods=frozenset({"GET"}))
    with pytest.raises(requests.exceptions.RequestException):
        vip_api.get("/path/vip/Home/f.bin?action=content").content  # noqa: B018
    assert len(vip_api.get("/path/vip/Home/f.bin?action=content").content) == 100_000
    vip_server.faults = FaultSpec(drop_rate=1.0, times=1, methods=frozenset({"PUT"}))
    with pytest.raises(requests.exceptions.RequestException):
        vip_api.put("/path/vip/Home/g.bin", data=b"y" * 3_000_000)
    assert vip_api.get("/path/vip/Home/g.bin?action=exists").json() == {"exists": False}
    # a dropped POST still ran: the classic duplicate hazard
    vip_server.faults = FaultSpec(drop_rate=1.0, times=1, methods=frozenset({"POST"}))
    with pytest.raises(requests.exceptions.RequestException):
        vip_api.request("POST", "/executions", json={
            "name": "x", "pipelineIdentifier": "Sleep/1.0", "inputValues": {"duration": 0}})
    assert vip_api.get("/executions/count").text == "1"


def test_latency(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_server.faults = FaultSpec(latency=0.3, match="count")
    t0 = time.monotonic()
    assert vip_api.get("/executions/count").status_code == 200
    assert time.monotonic() - t0 >= 0.3 and vip_server.stats.counts["latency"] == 1
    vip_api.get("/platform")  # not matched: no latency
    assert vip_server.stats.counts["latency"] == 1


def test_transfer_timeout_upload_lands_later_and_download_retry(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_server.faults = FaultSpec(transfer_timeout=1.0, times=1, transfer_land_delay=0.2)
    r = vip_api.put("/path/vip/Home/late.txt", data=b"late")
    assert r.status_code == 400 and r.json()["errorCode"] == 8000
    deadline = time.monotonic() + 5
    while not vip_api.get("/path/vip/Home/late.txt?action=exists").json()["exists"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (vip_server.home() / "late.txt").read_bytes() == b"late"
    vip_server.faults = FaultSpec(transfer_timeout=1.0, times=1)
    r = vip_api.get("/path/vip/Home/late.txt?action=content")
    assert r.status_code == 400 and r.json()["errorCode"] == 8000
    assert vip_api.get("/path/vip/Home/late.txt?action=content").content == b"late"


def test_capacity_fault(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_server.faults = FaultSpec(capacity=1.0, times=1)
    body = {"name": "c", "pipelineIdentifier": "Sleep/1.0", "inputValues": {"duration": 0}}
    r = vip_api.request("POST", "/executions", json=body)
    assert r.status_code == 400 and r.json()["errorCode"] == 2001
    assert vip_api.request("POST", "/executions", json=body).status_code == 200


def test_unknown_blip(vip_api: VipApi, vip_server: LocalVip) -> None:
    ex = vip_api.launch("Sleep/1.0", {"duration": 5})
    vip_server.faults = FaultSpec(unknown_blip=1.0, times=1)
    assert vip_api.get(f"/executions/{ex['identifier']}").json()["status"] == "Unknown"
    assert vip_api.get(f"/executions/{ex['identifier']}").json()["status"] == "Running"
    vip_api.put(f"/executions/{ex['identifier']}/kill")


def test_unknown_after_kill(vip_api: VipApi, vip_server: LocalVip) -> None:
    ex = vip_api.launch("Sleep/1.0", {"duration": 5})
    vip_server.faults = FaultSpec(unknown_after_kill=1.0, times=1)
    url = f"/executions/{ex['identifier']}"
    assert vip_api.get(url).json()["status"] == "Running"  # only killed executions blip
    vip_api.put(url + "/kill")
    assert vip_api.get(url).json()["status"] == "Unknown"
    assert vip_api.get(url).json()["status"] == "Killed"


def test_delete_delay_fault(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_server.faults = FaultSpec(delete_delay=0.3)
    vip_api.upload("/vip/Home/d.txt", b"d")
    assert vip_api.request("DELETE", "/path/vip/Home/d.txt").status_code == 204
    assert vip_api.get("/path/vip/Home/d.txt?action=exists").json() == {"exists": True}
    deadline = time.monotonic() + 5
    while vip_api.get("/path/vip/Home/d.txt?action=exists").json()["exists"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_legacy_dates(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_server.faults = FaultSpec(legacy_dates=True)
    info = vip_api.wait(vip_api.launch("Sleep/1.0", {"duration": 0}, resultsLocation="/vip/Home/o")["identifier"])
    (path,) = info["returnedFiles"]["slept"]
    assert re.fullmatch(r"/vip/Home/o/\d\d-\d\d-\d{4}_\d\d:\d\d:\d\d/slept_0.txt", path)
    assert vip_api.get("/path" + path + "?action=content").text == "slept 0.0 seconds\n"
