"""LocalVip: /rest/executions and /rest/pipelines (docs/vip-rest.md: executions, pipelines)."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
import requests
from conftest import VipApi

from agent.localvip import LocalVip

KEYS = ["identifier", "name", "pipelineIdentifier", "timeout", "status", "inputValues", "returnedFiles",
        "studyIdentifier", "errorCode", "startDate", "endDate", "resultsLocation", "jobs"]


def _err(r: requests.Response, status: int, code: int) -> str:
    assert r.status_code == status, r.text
    assert list(r.json()) == ["errorCode", "errorMessage"] and r.json()["errorCode"] == code
    return str(r.json()["errorMessage"])


def _tar_member(api: VipApi, vip_path: str, member: str) -> bytes:
    data = api.get("/path" + vip_path + "?action=content").content
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        f = tar.extractfile(member)
        assert f is not None
        return f.read()


# -- pipelines ------------------------------------------------------------------------
def test_pipeline_list_and_detail(vip_api: VipApi) -> None:
    items = vip_api.get("/pipelines").json()
    ids = {p["identifier"] for p in items}
    assert {"FileStats/1.0", "TextTransform/1.0", "Sleep/1.0", "ConcatFiles/1.0"} <= ids
    assert all(p["parameters"] == [] and p["canExecute"] is True for p in items)
    detail = vip_api.get("/pipelines/TextTransform/1.0").json()
    assert detail["identifier"] == "TextTransform/1.0" and detail["version"] == "1.0"
    types = {p["name"]: p["type"] for p in detail["parameters"]}
    assert types == {"input_file": "File", "mode": "String", "repeat": "Int64", "scale": "Double",
                     "number_lines": "Boolean"}
    assert all(p["isReturnedValue"] is False for p in detail["parameters"])
    defaults = {p["name"]: p["defaultValue"] for p in detail["parameters"]}
    assert defaults["repeat"] == 1 and defaults["scale"] is None and defaults["number_lines"] == "false"
    assert "results-directory" not in types
    assert vip_api.get("/pipelines/ConcatFiles/1.0").json()["parameters"][0]["type"] == "List"
    # other spellings of the id
    assert vip_api.get("/pipelines/TextTransform%2F1.0").json()["identifier"] == "TextTransform/1.0"
    assert vip_api.get("/pipelines?pipelineId=TextTransform/1.0").json()["name"] == "TextTransform"
    assert vip_api.get("/pipelines/TextTransform/1.0/").status_code == 200
    boutiques = vip_api.get("/pipelines/Sleep/1.0?format=boutiques").json()
    assert boutiques["command-line"].startswith('"$PYTHON"') and boutiques["tool-version"] == "1.0"
    _err(vip_api.get("/pipelines/NoSlash"), 400, 8005)
    _err(vip_api.get("/pipelines/Nope/9.9"), 400, 8007)
    _err(vip_api.get("/pipelines/Sleep/1.0/boutiquesdescriptor"), 404, 8000)


def test_pipeline_id_is_decoded_twice(tmp_path: Path) -> None:
    extra = tmp_path / "pipes"
    extra.mkdir()
    desc = {"name": "My Tool+X", "tool-version": "2.0", "command-line": "echo [A] > a.txt",
            "inputs": [{"id": "a", "type": "String", "value-key": "[A]"}],
            "output-files": [{"id": "o", "path-template": "a.txt"}]}
    (extra / "mine.json").write_text(json.dumps(desc))
    with LocalVip(tmp_path / "r", pipelines_dir=extra) as server:
        api = VipApi(server)
        # '+' must be double-encoded (%252B); a single %2B decodes to '+' then to ' '
        assert api.get("/pipelines/My%20Tool%252BX/2.0").json()["name"] == "My Tool+X"
        _err(api.get("/pipelines/My%20Tool%2BX/2.0"), 400, 8007)
        ex = api.launch("My Tool+X/2.0", {"a": "hi there"})
        info = api.wait(ex["identifier"])
        assert info["status"] == "Finished"
        (path,) = info["returnedFiles"]["o"]
        assert api.get("/path" + path + "?action=content").content == b"hi there\n"


def test_legacy_defaults_fault(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_server.faults.legacy_defaults = True
    params = {p["name"]: p["defaultValue"] for p in vip_api.get("/pipelines/TextTransform/1.0").json()["parameters"]}
    assert params["scale"] == "$input.getDefaultValue()" and params["repeat"] == "1"


# -- executions ---------------------------------------------------------------------------
def test_launch_validation_order_and_codes(vip_api: VipApi, vip_server: LocalVip) -> None:
    def post(body: object) -> requests.Response:
        return vip_api.request("POST", "/executions", json=body)

    ok = {"name": "n", "pipelineIdentifier": "FileStats/1.0", "inputValues": {"input_file": "/vip/Home/a"}}
    assert "Input field 'name'" in _err(post({k: v for k, v in ok.items() if k != "name"}), 400, 8009)
    assert _err(post({**ok, "inputValues": None}), 400, 8009).endswith("(Error code 8009)")
    # characters are checked before the name and the pipeline
    _err(post({**ok, "name": "bad.name", "pipelineIdentifier": "x", "inputValues": {"input_file": "a;b"}}),
         400, 8009)
    _err(post({**ok, "inputValues": {"input_file": ""}}), 400, 8009)
    _err(post({**ok, "inputValues": {"input_file": ["/vip/Home/a", "é"]}}), 400, 8009)
    _err(post({**ok, "name": "bad.name", "pipelineIdentifier": "x"}), 400, 8019)
    _err(post({**ok, "pipelineIdentifier": "NoSlash"}), 400, 8005)
    _err(post({**ok, "pipelineIdentifier": "Nope/1"}), 400, 8007)
    _err(post({**ok, "inputValues": {}}), 400, 8018)
    _err(post({**ok, "inputValues": {"input_file": "/vip/Users/x/a"}}), 400, 8000)
    _err(post({**ok, "resultsLocation": "/vip/Trash/out"}), 400, 8000)
    assert vip_api.get("/executions/count").text == "0"  # nothing was created


def test_launch_runs_cartesian_jobs_and_writes_outputs(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_api.put("/path/vip/Home/in")
    vip_api.upload("/vip/Home/in/a.txt", b"3\nx\n")
    vip_api.upload("/vip/Home/in/b.txt", b"10\n")
    ex = vip_api.launch("TextTransform/1.0", {
        "input_file": ["/vip/Home/in/a.txt", "/vip/Home/in/b.txt"], "mode": ["upper", "reverse"],
        "scale": 2, "number_lines": True}, resultsLocation="/vip/Home/out")
    assert list(ex) == KEYS
    assert ex["status"] == "Running" and re.fullmatch(r"workflow-[A-Za-z0-9]{6}", ex["identifier"])
    assert ex["startDate"] > 1e12 and abs(ex["startDate"] / 1000 - time.time()) < 60
    assert ex["timeout"] == 0 and ex["endDate"] is None and ex["resultsLocation"] is None
    assert ex["studyIdentifier"] is None and ex["errorCode"] is None
    assert len(ex["jobs"]) == 4 and all(isinstance(k, str) for k in ex["jobs"])
    assert ex["inputValues"]["results-directory"] == "/vip/Home/out"
    info = vip_api.wait(ex["identifier"])
    assert info["status"] == "Finished"
    # 2 files x 2 modes = 4 jobs; both modes name their output after the file, so
    # the second job per file cannot land its output (no overwrite) and fails
    jobs = sorted((j["status"], j["exitMessage"]) for j in info["jobs"].values())
    assert [s for s, _ in jobs] == ["COMPLETED", "COMPLETED", "ERROR", "ERROR"]
    assert all("already exists" in m for s, m in jobs if s == "ERROR")
    paths = sorted(info["returnedFiles"]["transformed"])
    assert len(paths) == 2 and len({p.rsplit("/", 1)[0] for p in paths}) == 1
    stamp = paths[0].split("/")[4]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d{6}", stamp)
    text = _tar_member(vip_api, f"/vip/Home/out/{stamp}/a_transformed.tgz", "transformed.txt")
    assert text in (b"1: 6.0\n2: X\n", b"1: 0.6\n2: x\n")  # upper or reverse, same name
    results = vip_api.get(f"/executions/{ex['identifier']}/results").json()
    assert sorted(r["path"] for r in results) == paths and all(r["exists"] for r in results)
    listing = vip_api.get("/executions").json()
    assert listing[0]["identifier"] == ex["identifier"]
    assert listing[0]["jobs"] == {} and listing[0]["returnedFiles"] == {} and listing[0]["inputValues"] == {}
    assert vip_api.get("/executions/count").headers["Content-Type"].startswith("text/plain")
    assert vip_api.get("/executions/count").text == "1"
    out = vip_api.get(f"/executions/{ex['identifier']}/stdout")
    assert out.status_code == 200 and out.text == "jobId is required when multiple tasks exist"
    assert "TextTransform: 2 lines" in vip_api.get(f"/executions/{ex['identifier']}/jobs/0/stdout").text
    assert vip_api.get(f"/executions/{ex['identifier']}/jobs/9/stdout").text == "no log found for job 9"


def test_finished_when_one_job_fails_and_failed_when_all_do(vip_api: VipApi) -> None:
    vip_api.upload("/vip/Home/ok.txt", b"fine\n")
    vip_api.upload("/vip/Home/bad.txt", b"FAIL\nx\n")
    ex = vip_api.launch("TextTransform/1.0", {"input_file": ["/vip/Home/ok.txt", "/vip/Home/bad.txt"]})
    info = vip_api.wait(ex["identifier"])
    assert info["status"] == "Finished"
    assert sorted(j["status"] for j in info["jobs"].values()) == ["COMPLETED", "ERROR"]
    assert "first line is FAIL" in vip_api.get(f"/executions/{ex['identifier']}/jobs/1/stderr").text
    ex = vip_api.launch("TextTransform/1.0", {"input_file": "/vip/Home/bad.txt"})
    info = vip_api.wait(ex["identifier"])
    assert info["status"] == "ExecutionFailed" and info["returnedFiles"] is None
    assert info["jobs"]["0"]["exitCode"] == 3
    err = vip_api.get(f"/executions/{ex['identifier']}/stderr")
    assert err.status_code == 200 and "failing on purpose" in err.text
    ex = vip_api.launch("FileStats/1.0", {"input_file": "/vip/Home/missing.txt"})
    info = vip_api.wait(ex["identifier"])
    assert info["status"] == "ExecutionFailed" and "does not exist" in info["jobs"]["0"]["exitMessage"]


def test_capacity_kill_delete_and_statuses(vip_api: VipApi, vip_server: LocalVip) -> None:
    ex = vip_api.launch("Sleep/1.0", {"duration": 30})
    assert ex["returnedFiles"] is None
    r = vip_api.request("POST", "/executions", json={
        "name": "second", "pipelineIdentifier": "Sleep/1.0", "inputValues": {"duration": 0}})
    assert _err(r, 400, 2001) == (
        "Max number of running executions reached.You already have 1 running executions. (Error code 2001)")
    eid = ex["identifier"]
    _err(vip_api.put(f"/executions/{eid}/delete", json={"deleteFiles": True}), 400, 8000)  # still running
    _err(vip_api.put(f"/executions/{eid}/play"), 400, 8001)
    assert vip_api.request("DELETE", f"/executions/{eid}").json()["status"] == "Running"  # acts as GET
    t0 = time.monotonic()
    assert vip_api.put(f"/executions/{eid}/kill").status_code == 204
    info = vip_api.get(f"/executions/{eid}").json()
    assert info["status"] == "Killed" and info["returnedFiles"] == {}
    deadline = time.monotonic() + 10
    while vip_api.get(f"/executions/{eid}").json()["jobs"]["0"]["status"] != "KILL":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert time.monotonic() - t0 < 10
    assert vip_api.put(f"/executions/{eid}/delete", json={"deleteFiles": False}).status_code == 204
    _err(vip_api.get(f"/executions/{eid}"), 400, 8015)
    assert vip_api.get("/executions").json() == [] and vip_api.get("/executions/count").text == "0"
    _err(vip_api.get("/executions/workflow-nope00"), 400, 8000)
    # the slot is free again
    assert vip_api.launch("Sleep/1.0", {"duration": 0})["status"] == "Running"


def test_delete_with_files_removes_outputs(vip_api: VipApi, vip_server: LocalVip) -> None:
    vip_api.upload("/vip/Home/in.txt", b"data\n")
    ex = vip_api.launch("FileStats/1.0", {"input_file": "/vip/Home/in.txt", "label": "demo run"})
    info = vip_api.wait(ex["identifier"])
    (path,) = info["returnedFiles"]["report"]
    assert path.endswith("/in_stats.tgz")
    report = json.loads(_tar_member(vip_api, path, "report.json"))
    assert report["label"] == "demo run" and report["size"] == 5
    assert vip_api.put(f"/executions/{ex['identifier']}/delete", json={"deleteFiles": True}).status_code == 204
    assert vip_api.get("/path" + path + "?action=exists").json() == {"exists": False}


def test_rename_list_limit_and_stdout_single_job(vip_api: VipApi) -> None:
    ex = vip_api.launch("Sleep/1.0", {"duration": 0}, name="first")
    info = vip_api.wait(ex["identifier"])
    assert info["status"] == "Finished" and info["returnedFiles"]["slept"][0].endswith("/slept_0.txt")
    assert "Sleep: done" in vip_api.get(f"/executions/{ex['identifier']}/stdout").text
    renamed = vip_api.put(f"/executions/{ex['identifier']}", json={**info, "name": "renamed"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed"
    _err(vip_api.put(f"/executions/{ex['identifier']}", json={**info, "name": "a.b"}), 400, 8019)
    ex2 = vip_api.launch("Sleep/1.0", {"duration": 0}, name="second")
    vip_api.wait(ex2["identifier"])
    assert [e["identifier"] for e in vip_api.get("/executions").json()] == [ex2["identifier"], ex["identifier"]]
    assert len(vip_api.get("/executions?limit=1").json()) == 1
    _err(vip_api.get("/executions?limit=501"), 400, 8000)
    _err(vip_api.get("/executions?offset=1"), 400, 8000)


def test_list_input_and_dot_and_subdirectory_outputs(tmp_path: Path) -> None:
    extra = tmp_path / "pipes"
    extra.mkdir()
    desc = {"name": "Pair", "tool-version": "1", "command-line": "echo [A]-[B] > [A]_[B].txt",
            "custom": {"vip:dot": ["a", "b"]},
            "inputs": [{"id": "a", "type": "String", "value-key": "[A]"},
                       {"id": "b", "type": "String", "value-key": "[B]"}],
            "output-files": [{"id": "o", "path-template": "[A]_[B].txt"}]}
    (extra / "pair.json").write_text(json.dumps(desc))
    with LocalVip(tmp_path / "r", pipelines_dir=extra, max_running=5) as server:
        api = VipApi(server)
        ex = api.launch("Pair/1", {"a": ["x", "y"], "b": ["1", "2"]})
        info = api.wait(ex["identifier"])
        assert len(info["jobs"]) == 2  # zipped, not crossed
        assert sorted(p.rsplit("/", 1)[1] for p in info["returnedFiles"]["o"]) == ["x_1.txt", "y_2.txt"]
        api.upload("/vip/Home/p1.txt", b"one\n")
        api.upload("/vip/Home/p2.txt", b"two\n")
        ex = api.launch("ConcatFiles/1.0", {"files": ["/vip/Home/p1.txt", "/vip/Home/p2.txt"]})
        info = api.wait(ex["identifier"])
        assert len(info["jobs"]) == 1 and info["status"] == "Finished"
        (path,) = info["returnedFiles"]["archive"]
        assert path.endswith("/concat/concat.tgz")  # template subdirectory kept
        assert _tar_member(api, path, "concatenated.txt") == b"one\ntwo\n"


def test_job_environment_is_minimal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    extra = tmp_path / "pipes"
    extra.mkdir()
    desc = {"name": "Env", "tool-version": "1", "command-line": "env > env.txt; pwd >> env.txt",
            "inputs": [], "output-files": [{"id": "o", "path-template": "env.txt"}]}
    (extra / "env.json").write_text(json.dumps(desc))
    with LocalVip(tmp_path / "r", pipelines_dir=extra, api_keys=["sekret-key-123"]) as server:
        api = VipApi(server)
        info = api.wait(api.launch("Env/1", {})["identifier"])
        text = api.get("/path" + info["returnedFiles"]["o"][0] + "?action=content").text
        names = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line}
        assert "do-not-leak" not in text and "sekret-key-123" not in text
        assert {"PATH", "HOME", "LANG", "PYTHON"} <= names and "SECRET_TOKEN" not in names
        assert str(tmp_path / "r" / ".localvip" / "work") in text  # private work dir, not user storage


def test_executions_survive_restart_and_running_jobs_fail(tmp_path: Path) -> None:
    root = tmp_path / "r"
    with LocalVip(root, api_keys=["k"]) as server:
        api = VipApi(server)
        done = api.launch("Sleep/1.0", {"duration": 0})["identifier"]
        api.wait(done)
        running = api.launch("Sleep/1.0", {"duration": 30})["identifier"]
    with LocalVip(root, api_keys=["k"]) as server:
        api = VipApi(server)
        assert api.get(f"/executions/{done}").json()["status"] == "Finished"
        info = api.get(f"/executions/{running}").json()
        assert info["status"] == "ExecutionFailed"
        assert "server stopped" in info["jobs"]["0"]["exitMessage"]
        assert api.get("/executions/count").text == "2"
