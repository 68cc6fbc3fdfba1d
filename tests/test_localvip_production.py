"""LocalVip's production profile and its faults, each against the real server over HTTP
(docs/localvip.md), plus ``vip-agent local-server --profile/--groups`` as a subprocess."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from agenthelpers import wait_for

from agent.errors import ConfigError
from agent.localvip import FaultSpec, LocalVip
from agent.localvip.codes import ERRORS
from agent.localvip.faults import GASW_STATUSES, PROFILES

GENERIC_8000 = "An error has been encountered on the VIP API (Error code 8000)"


class Api:
    """requests bound to one LocalVip user."""

    def __init__(self, vip: LocalVip, user: int = 0) -> None:
        self.base = vip.url + "/rest"
        self.http = requests.Session()
        self.http.headers["apikey"] = vip.api_keys[user]

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.base + path, timeout=60, **kw)

    def put(self, path: str, **kw: Any) -> requests.Response:
        return self.http.put(self.base + path, timeout=60, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.http.post(self.base + path, timeout=60, **kw)

    def delete(self, path: str) -> requests.Response:
        return self.http.delete(self.base + path, timeout=60)


def _err(r: requests.Response, code: int, status: int = 400) -> str:
    assert r.status_code == status, r.text
    assert list(r.json()) == ["errorCode", "errorMessage"] and r.json()["errorCode"] == code, r.text
    return str(r.json()["errorMessage"])


@pytest.fixture
def prod(tmp_path: Path) -> Iterator[LocalVip]:
    """The production profile with fast waits; each test turns on what it measures."""
    faults = FaultSpec.for_profile(
        "production", staging_delay=0.0, platform_transfers=0, results_delay=0.0, launch_refusal=0.0,
        late_landing=0.0, job_statuses=0.0, unknown_after_kill=0.0, delete_delay=0.0, transfer_wait=1.0,
    )
    with LocalVip(tmp_path / "root", profile="production", faults=faults, api_keys=["key-one", "key-two"],
                  groups={"lab": ["user"]}) as vip:
        yield vip


def _launch(api: Api, pipeline: str, inputs: dict[str, Any], name: str = "t") -> requests.Response:
    return api.post("/executions", json={"name": name, "pipelineIdentifier": pipeline, "inputValues": inputs})


def _finished(api: Api, exec_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/executions/{exec_id}").json()
        return body if body["status"] in ("Finished", "ExecutionFailed", "Killed") else None

    result: dict[str, Any] = wait_for(done, timeout=60, what=f"{exec_id} ends")
    return result


# -- profiles --------------------------------------------------------------------------
def test_profiles_defaults_follow_the_sources() -> None:
    ideal = FaultSpec.for_profile("ideal")
    assert ideal == FaultSpec() and not ideal.active and ideal.redirect_port is None
    prod = FaultSpec.for_profile("production")
    assert prod.staging_delay == 2.0 and prod.platform_transfers == 20 and prod.transfer_wait == 45.0
    assert prod.results_delay > 0 and 0 < prod.launch_refusal < 1 and prod.launch_refusal_code == {8000, 2003}
    assert prod.redirect_port == 0 and prod.late_landing > 0 and prod.list_limit == 500
    assert prod.job_statuses > 0 and prod.delete_delay > 0
    # overridable, in Python and in the spec syntax
    assert FaultSpec.for_profile("production", staging_delay=0.2).staging_delay == 0.2
    parsed = FaultSpec.parse("staging_delay=0.2,transfer_wait=1", "production")
    assert parsed.staging_delay == 0.2 and parsed.transfer_wait == 1.0 and parsed.platform_transfers == 20
    assert set(PROFILES) == {"ideal", "production"}
    with pytest.raises(ConfigError):
        FaultSpec.for_profile("staging")


def test_each_production_fault_parses_alone() -> None:
    spec = FaultSpec.parse(
        "staging_delay=2,platform_transfers=20,results_delay=0.5,launch_refusal=0.25,redirect_port=8080,"
        "late_landing=0.1,list_limit=50,job_statuses=0.5,transfer_wait=3,late_landing_delay=2"
    )
    assert (spec.staging_delay, spec.platform_transfers, spec.results_delay, spec.launch_refusal) == (2, 20, 0.5, 0.25)
    assert (spec.redirect_port, spec.late_landing, spec.list_limit, spec.job_statuses) == (8080, 0.1, 50, 0.5)
    assert spec.launch_refusal_code == frozenset()
    one = FaultSpec.parse("launch_refusal_code=2003")
    assert one.launch_refusal == 1.0 and one.launch_refusal_code == {2003}
    assert FaultSpec.parse("launch_refusal=0.5,launch_refusal_code=8000|2003").launch_refusal_code == {8000, 2003}
    # the profile's rate stays when only the code is named
    assert FaultSpec.parse("launch_refusal_code=2004", "production").launch_refusal == 0.03
    for bad in ("launch_refusal_code=1234", "platform_transfers=-1", "staging_delay=x"):
        with pytest.raises(ConfigError):
            FaultSpec.parse(bad)
    assert len(GASW_STATUSES) == 21 and {"CANCELLED_REPLICA", "RESCHEDULE", "STALLED"} <= set(GASW_STATUSES)


# -- error codes ---------------------------------------------------------------------------
def test_error_table_matches_vip(prod: LocalVip) -> None:
    api = Api(prod)
    listed = {e["errorCode"]: e["errorMessage"] for e in api.get("/platform").json()["APIErrorCodesAndMessages"]}
    names = {code: name for code, name, _t in ERRORS}
    assert (names[8010], names[8012], names[8014], names[8017]) == (
        "WRONG_DATE_FORMAT", "COUNTRY_UNKNOWN", "WRONG_OIDC_LOGIN", "NOT_COMPATIBLE_WITH_BOUTIQUES")
    assert listed[8010] == "The date {} have a wrong format (needed : {})"
    assert listed[8012] == "Country unknown : {}"
    assert listed[8014] == "The login process encountered an error"
    assert listed[8017] == "The pipeline is not compatible with boutiques : {}"
    assert listed[8003] == "The error message for 'insufficient auth' cannot be known in advance"
    assert listed[2003] == "Engine is saturated!" and listed[2004] == "Error launching execution, contact admins!"
    # raised messages, formatted as VIP formats them
    assert _err(api.put("/executions/none/play"), 8000)  # unknown execution first
    ok = _launch(api, "Sleep/1.0", {"duration": 0})
    eid = ok.json()["identifier"]
    assert _err(api.put(f"/executions/{eid}/play"), 8001) == (
        "The playExecution method is not implemented in the VIP API (Error code 8001)")
    assert _err(api.get("/pipelines/NoSlash"), 8005) == "The NoSlash pipeline identifier is not valid (Error code 8005)"
    assert _err(api.get("/pipelines/Nope/1"), 8007) == "The Nope/1 pipeline does not exists or cannot be used (Error code 8007)"
    assert _err(api.get("/path/vip/Users?action=list"), 8013) == (
        "Unauthorized data access to : /vip/Users (Error code 8013)")
    assert _err(_launch(api, "FileStats/1.0", {}), 8018) == "Input field 'input_file' is missing (Error code 8018)"
    assert _err(_launch(api, "Sleep/1.0", {"duration": 0}, name="a.b"), 8019) == (
        "The execution name is not valid : Cause Authorized characters are 0-9A-Za-z-_  (Error code 8019)")
    _finished(api, eid)
    api.put(f"/executions/{eid}/delete", json={"deleteFiles": False})
    assert _err(api.get(f"/executions/{eid}"), 8015) == f"No execution available with this id : {eid} (Error code 8015)"


# -- transfers ---------------------------------------------------------------------------
def test_staging_delay_slows_each_transfer(prod: LocalVip) -> None:
    prod.faults.staging_delay = 0.3
    api = Api(prod)
    start = time.monotonic()
    assert api.put("/path/vip/Home/a.txt", data=b"hello").status_code == 201
    upload = time.monotonic() - start
    start = time.monotonic()
    r = api.get("/path/vip/Home/a.txt?action=content")
    download = time.monotonic() - start
    assert r.content == b"hello" and upload >= 0.3 and download >= 0.3
    assert prod.stats.counts["staged"] == 2
    # metadata requests and mkdir are not staged
    assert api.put("/path/vip/Home/dir").status_code == 201
    assert api.get("/path/vip/Home/a.txt?action=properties").json()["size"] == 5
    assert prod.stats.counts["staged"] == 2


def test_platform_transfer_cap_then_timeout_and_the_queued_upload_lands(prod: LocalVip) -> None:
    prod.faults.staging_delay = 1.0
    prod.faults.platform_transfers = 2
    prod.faults.transfer_wait = 0.3
    api = Api(prod)

    def put(i: int) -> requests.Response:
        return Api(prod).put(f"/path/vip/Home/f{i}.txt", data=b"x" * 10)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(put, range(5)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201, 201, 400, 400, 400]
    assert all(r.json() == {"errorCode": 8000, "errorMessage": GENERIC_8000} for r in answers if r.status_code == 400)
    assert prod.transfers.peak == 2 and prod.transfers.timeouts == 3
    assert prod.stats.counts["transfer wait timeout"] == 3
    # the storage operations VIP gave up on still run when slots free: every file lands
    wait_for(lambda: all((prod.home() / f"f{i}.txt").is_file() for i in range(5)), timeout=20,
             what="queued uploads land")
    assert prod.transfers.peak == 2
    # downloads share the cap
    prod.faults.transfer_wait = 0.3
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: Api(prod).get(f"/path/vip/Home/f{i}.txt?action=content"), range(4)))
    assert sorted(r.status_code for r in got) == [200, 200, 400, 400]
    assert api.get("/path/vip/Home/f0.txt?action=content").status_code == 200  # slots free again


def test_late_landing_after_a_delete_of_its_folder(prod: LocalVip) -> None:
    prod.faults.late_landing = 1.0
    prod.faults.transfer_wait = 0.1
    prod.faults.late_landing_delay = 0.6
    api = Api(prod)
    assert api.put("/path/vip/Home/session").status_code == 201
    r = api.put("/path/vip/Home/session/in.txt", data=b"late")
    assert r.status_code == 400 and r.json() == {"errorCode": 8000, "errorMessage": GENERIC_8000}
    assert not (prod.home() / "session" / "in.txt").exists()
    assert api.delete("/path/vip/Home/session").status_code == 204  # the client cleans up
    assert not (prod.home() / "session").exists()
    landed = wait_for(lambda: (prod.home() / "session" / "in.txt").is_file(), timeout=10, what="late landing")
    assert landed and (prod.home() / "session" / "in.txt").read_bytes() == b"late"
    assert api.get("/path/vip/Home/session?action=list").json()[0]["path"] == "/vip/Home/session/in.txt"


# -- executions ----------------------------------------------------------------------------
def test_results_delay_per_output(prod: LocalVip) -> None:
    api = Api(prod)
    for i in range(3):
        assert api.put(f"/path/vip/Home/in{i}.txt", data=b"data\n").status_code == 201
    r = _launch(api, "FileStats/1.0", {"input_file": [f"/vip/Home/in{i}.txt" for i in range(3)]})
    eid = r.json()["identifier"]
    assert _finished(api, eid)["status"] == "Finished"
    prod.faults.results_delay = 0.2
    start = time.monotonic()
    results = api.get(f"/executions/{eid}/results").json()
    assert len(results) == 3 and time.monotonic() - start >= 0.6
    assert prod.stats.counts["results delayed"] == 1
    prod.faults.results_delay = 0.0
    assert len(api.get(f"/executions/{eid}/results").json()) == 3
    assert prod.stats.counts["results delayed"] == 1  # no delay without results_delay


def test_one_running_execution_per_account(prod: LocalVip) -> None:
    api, other = Api(prod), Api(prod, 1)
    first = _launch(api, "Sleep/1.0", {"duration": 30}).json()["identifier"]
    assert _err(_launch(api, "Sleep/1.0", {"duration": 0}), 2001) == (
        "Max number of running executions reached.You already have 1 running executions. (Error code 2001)")
    assert _launch(other, "Sleep/1.0", {"duration": 0}).status_code == 200  # a cap per account
    assert api.put(f"/executions/{first}/kill").status_code == 204
    wait_for(lambda: _launch(api, "Sleep/1.0", {"duration": 0}).status_code == 200, timeout=10,
             what="a launch after the kill")


def test_launch_refusals_mixed_and_by_code(prod: LocalVip) -> None:
    api = Api(prod)
    prod.faults = FaultSpec.parse("launch_refusal=1,seed=3,transfer_wait=1")
    seen: dict[int, set[str]] = {}
    for _ in range(40):
        msg = _launch(api, "Sleep/1.0", {"duration": 0})
        body = msg.json()
        assert msg.status_code == 400
        seen.setdefault(body["errorCode"], set()).add(body["errorMessage"])
    assert seen == {
        8000: {"There are no ressources available for the moment ! (Error code 8000)",
               "Workflow is null, engine localvip-engine has been disabled (Error code 8000)"},
        2003: {"Engine is saturated! (Error code 2003)"},
        2004: {"Error launching execution, contact admins! (Error code 2004)"},
    }
    assert api.get("/executions/count").text == "0"  # nothing was created
    assert prod.stats_snapshot()["counts"]["launch refused"] == 40
    _err(_launch(api, "Nope/1", {}), 8007)  # validation comes first
    prod.faults = "launch_refusal=1,launch_refusal_code=2003"
    assert all(_err(_launch(api, "Sleep/1.0", {"duration": 0}), 2003) for _ in range(5))
    # the profile's own mix only says "try later": 8000 and 2003, never 2004
    prod.faults = "launch_refusal=1,seed=5"
    codes = {_launch(api, "Sleep/1.0", {"duration": 0}).json()["errorCode"] for _ in range(20)}
    assert codes == {8000, 2003}
    prod.faults = "launch_refusal=0.5,seed=1"  # a rate: some launches go through
    answers = [_launch(api, "Sleep/1.0", {"duration": 0}) for _ in range(12)]
    refused = [r for r in answers if r.status_code == 400 and r.json()["errorCode"] in (8000, 2003)]
    assert 0 < len(refused) < 12 and answers[[r.status_code for r in answers].index(200)].json()["status"]


def test_list_limit_is_configurable(prod: LocalVip) -> None:
    prod.faults.list_limit = 3
    api = Api(prod)
    assert api.get("/platform").json()["defaultLimitListExecutions"] == 3
    assert api.get("/executions?limit=3").status_code == 200
    r = api.get("/executions?limit=4")
    assert r.status_code == 400 and r.json() == {"errorCode": 8000, "errorMessage": GENERIC_8000}
    prod.faults.list_limit = None  # ideal: 500, as today
    assert api.get("/executions?limit=500").status_code == 200
    assert _err(api.get("/executions?limit=501"), 8000) == "The limit cannot exceed 500 (Error code 8000)"


def test_gasw_job_statuses(prod: LocalVip) -> None:
    api = Api(prod)
    for i in range(6):
        assert api.put(f"/path/vip/Home/j{i}.txt", data=b"x\n").status_code == 201
    eid = _launch(api, "FileStats/1.0", {"input_file": [f"/vip/Home/j{i}.txt" for i in range(6)]}).json()["identifier"]
    assert _finished(api, eid)["status"] == "Finished"
    plain = api.get(f"/executions/{eid}").json()["jobs"]
    assert {j["status"] for j in plain.values()} == {"COMPLETED"}
    prod.faults.job_statuses = 1.0
    replica = api.get(f"/executions/{eid}").json()
    assert replica["status"] == "Finished"  # a successful job reading CANCELLED_REPLICA
    assert {j["status"] for j in replica["jobs"].values()} == {"CANCELLED_REPLICA"}
    assert all(j["exitCode"] == 0 for j in replica["jobs"].values())
    prod.faults.job_statuses = 0.5
    half = [j["status"] for j in api.get(f"/executions/{eid}").json()["jobs"].values()]
    assert half == [j["status"] for j in api.get(f"/executions/{eid}").json()["jobs"].values()]  # stable
    assert set(half) <= {"COMPLETED", "CANCELLED_REPLICA"}
    # a running job may read STALLED, RESCHEDULE or REPLICATE
    prod.faults.job_statuses = 1.0
    running = _launch(api, "Sleep/1.0", {"duration": 30}).json()["identifier"]

    def running_status() -> str | None:
        jobs = api.get(f"/executions/{running}").json()["jobs"]
        status = jobs["0"]["status"]
        return str(status) if status not in ("QUEUED", "CREATED", "SUCCESSFULLY_SUBMITTED") else None

    assert wait_for(running_status, timeout=10, what="job starts") in {"STALLED", "RESCHEDULE", "REPLICATE"}
    api.put(f"/executions/{running}/kill")


# -- redirect ----------------------------------------------------------------------------
def test_http_listener_redirects_to_the_real_address(prod: LocalVip) -> None:
    url = prod.redirect_url
    assert url is not None and url != prod.url
    for method in ("GET", "PUT", "POST"):
        r = requests.request(method, url + "/rest/executions?limit=2", headers={"apikey": "key-one"},
                             data=b"body" if method != "GET" else None, allow_redirects=False, timeout=10)
        assert r.status_code == 301 and r.headers["Location"] == prod.url + "/rest/executions?limit=2"
    assert requests.get(url + "/rest/platform", timeout=10).json()["platformName"] == "VIP"  # followed


def test_ideal_profile_has_no_redirect_listener(tmp_path: Path) -> None:
    with LocalVip(tmp_path / "r") as vip:
        assert vip.redirect_url is None and vip.profile == "ideal"
    with LocalVip(tmp_path / "r2", faults="redirect_port=0") as vip:
        assert vip.redirect_url is not None
        assert requests.get(vip.redirect_url + "/rest/platform", allow_redirects=False, timeout=10).status_code == 301


# -- groups ------------------------------------------------------------------------------
def test_group_folder_membership(prod: LocalVip) -> None:
    member, outsider = Api(prod), Api(prod, 1)
    tops = {e["path"] for e in member.get("/path/vip?action=list").json()}
    assert tops == {"/vip/Home", "/vip/Trash", "/vip/lab (group)"}
    assert {e["path"] for e in outsider.get("/path/vip?action=list").json()} == {"/vip/Home", "/vip/Trash"}
    group = "/path/vip/lab%20(group)"
    assert member.put(group + "/data").status_code == 201
    assert member.put(group + "/data/in.txt", data=b"shared\n").status_code == 201
    assert (prod.group_dir("lab") / "data" / "in.txt").read_bytes() == b"shared\n"
    assert member.get(group + "/data?action=list").json()[0]["path"] == "/vip/lab (group)/data/in.txt"
    assert member.get(group + "/data/in.txt?action=content").content == b"shared\n"
    assert _err(outsider.get(group + "/data/in.txt?action=content"), 8013) == (
        "Unauthorized data access to : /vip/lab (group)/data/in.txt (Error code 8013)")
    _err(outsider.put(group + "/x.txt", data=b"x"), 8013)
    _err(member.delete(group), 8013)  # the group's top is not the member's to delete
    _err(member.get("/path/vip/other%20(group)?action=list"), 8013)
    # a group input in a launch: the member's job reads it, the outsider's launch is refused
    r = _launch(member, "FileStats/1.0", {"input_file": "/vip/lab (group)/data/in.txt"})
    assert _finished(member, r.json()["identifier"])["status"] == "Finished"
    refused = _launch(outsider, "FileStats/1.0", {"input_file": "/vip/lab (group)/data/in.txt"})
    assert refused.status_code == 400 and refused.json()["errorCode"] == 8000


def test_groups_need_known_users(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no user 'nobody'"):
        LocalVip(tmp_path / "r", groups={"lab": ["nobody"]})


# -- the CLI -------------------------------------------------------------------------------
def test_cli_profile_groups_and_faults(tmp_path: Path) -> None:
    env = {**os.environ, "VIP_API_KEY": "cli-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "local-server", "--root", str(tmp_path / "root"), "--profile", "production",
         "--groups", "lab:user", "--groups", "imaging team:user@localvip",
         "--faults", "staging_delay=0.2,launch_refusal=0,list_limit=7", "--stats", str(tmp_path / "stats.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        redirect = proc.stderr.readline()
        assert "redirects (301) to " + url in redirect
        redirect_url = redirect.split()[1]
        h = {"apikey": "cli-key"}
        r = requests.get(redirect_url + "/rest/platform", allow_redirects=False, timeout=10)
        assert r.status_code == 301 and r.headers["Location"] == url + "/rest/platform"
        assert requests.get(url + "/rest/platform", timeout=10).json()["defaultLimitListExecutions"] == 7
        tops = {e["path"] for e in requests.get(url + "/rest/path/vip?action=list", headers=h, timeout=10).json()}
        assert tops == {"/vip/Home", "/vip/Trash", "/vip/lab (group)", "/vip/imaging team (group)"}
        start = time.monotonic()
        assert requests.put(url + "/rest/path/vip/lab%20(group)/a.txt", data=b"a", headers=h, timeout=10).status_code == 201
        assert time.monotonic() - start >= 0.2  # staging_delay overrides the profile's 2 s
        assert time.monotonic() - start < 2.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["profile"] == "production" and stats["counts"]["upload"] == 1
    assert stats["transfers"] == {"peak": 1, "timeouts": 0}
    assert stats["total"] >= 3 and stats["peak_requests_per_second"] >= 1


@pytest.mark.parametrize("args, needle", [
    (["--groups", "nocolon"], "bad --groups value"),
    (["--groups", "lab:ghost"], "no user 'ghost'"),
    (["--profile", "staging"], "invalid choice"),
    (["--faults", "launch_refusal_code=1234"], "not an engine refusal"),
])
def test_cli_rejects_bad_values(tmp_path: Path, args: list[str], needle: str) -> None:
    env = {**os.environ, "VIP_API_KEY": "cli-key"}
    done = subprocess.run(
        [sys.executable, "-m", "agent", "local-server", "--root", str(tmp_path / "root"), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode != 0 and needle in done.stderr and "Traceback" not in done.stderr
