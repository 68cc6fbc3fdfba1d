"""Remote safety against a misbehaving VIP: status labels, long Unknown, kills, bad answers.

The executions really run on :class:`agent.localvip.LocalVip`; where the local server cannot
misbehave the way a real one might (a 200 carrying an error, nonsense labels, bad result
paths), :class:`hostilevip.HostileVip` sits in front of it and spoils chosen answers. Its
``before`` hook checks, at the moment each DELETE arrives, that no execution still runs on
the server: the invariant "inputs stay while an execution may run".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agenthelpers
import pytest
from agenthelpers import run_agent, start_runner, write_dataset
from hostilevip import HostileVip

from agent.journal import Journal
from agent.localvip import FaultSpec, LocalVip
from agent.runner import Runner, StepOutcome
from agent.vip.client import VipClient
from agent.vip.errors import ProtocolError

SLEEP = "Sleep/1.0"


class DeleteGuard:
    """Records every DELETE of a path that arrives while an execution runs on the server."""

    def __init__(self, server: LocalVip) -> None:
        self.server = server
        self.violations: list[str] = []
        self.deletes = 0

    def __call__(self, method: str, path: str) -> None:
        if method == "DELETE" and path.startswith("/rest/path/"):
            self.deletes += 1
            running = self.server.state.query(
                "SELECT id, status FROM executions WHERE status = 'Running'"
            )
            if running:
                self.violations.append(f"DELETE {path} while {running} run")


def start(
    tmp_path: Path, url: str, key: str, job: dict[str, Any], name: str = "subject", **runner: Any
) -> tuple[Journal, int, Runner]:
    ds = write_dataset(tmp_path / "drop" / name, {"x.txt": "x\n"}, job)
    options = {"poll_min": 0.05, "poll_max": 0.2, "retry_base": 0.05, **runner}
    s = start_runner(tmp_path, ds, url, key=key, client_options={"timeout": 5, "retries": 0},
                     output_root=tmp_path / "out", name=name, **options)
    return s.journal, s.dataset_id, s.runner


def drive(runner: Runner, dataset_id: int, *, steps: int = 400, until: Any = None) -> StepOutcome:
    """Step a dataset (waiting at most 0.2 s between steps) until final or ``until(outcome)``."""
    return agenthelpers.drive(runner, dataset_id, until=until, timeout=steps * 0.2)


@pytest.fixture
def hostile(vip_server: LocalVip) -> Iterator[HostileVip]:
    guard = DeleteGuard(vip_server)
    with HostileVip(upstream=vip_server.url, before=guard) as proxy:
        proxy.guard = guard  # type: ignore[attr-defined]
        yield proxy


# -- Unknown ----------------------------------------------------------------------------


def test_unknown_while_running_keeps_inputs_until_finished(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    vip_server.faults = FaultSpec(unknown_blip=1.0)  # every poll of the running execution
    journal, dataset_id, runner = start(
        tmp_path, hostile.url, vip_server.api_key, {"pipeline": SLEEP, "inputs": {"duration": 2}}
    )
    outcome = drive(runner, dataset_id)
    assert outcome.stage == "done", journal.get(dataset_id).error
    assert hostile.guard.violations == []  # type: ignore[attr-defined]
    assert hostile.guard.deletes >= 1  # type: ignore[attr-defined]
    assert not hostile.requests("PUT", r"/kill$")
    (e,) = journal.executions(dataset_id)
    assert e.status == "Finished"
    warnings = [ev.message for ev in journal.events(dataset_id) if "reads Unknown" in ev.message]
    assert len(warnings) == 1, warnings


def test_long_unknown_is_killed_and_cleaned_only_once_vip_confirms(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    """Through the CLI, as the Interface says: local server with unknown_blip=1.0, run --poll."""
    vip_server.faults = FaultSpec(unknown_blip=1.0)
    ds = write_dataset(
        tmp_path / "drop" / "long-1", {"x.txt": "x\n"},
        {"pipeline": SLEEP, "inputs": {"duration": 60}},
    )
    result = run_agent(
        "run", str(ds), "--server", hostile.url, "--state", str(tmp_path / "state"),
        "--output", str(tmp_path / "out"), "--poll", "0.2", "--unknown-limit", "1.5",
        api_key=vip_server.api_key, cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "killing it" in result.stderr and "Killed" in result.stderr
    assert "Traceback" not in result.stderr
    assert hostile.guard.violations == []  # type: ignore[attr-defined]
    kills = hostile.requests("PUT", r"/kill$")
    assert kills, hostile.seen
    first_kill = hostile.seen.index(("PUT", kills[0]))
    assert all(m != "DELETE" for m, _ in hostile.seen[:first_kill])
    ((status, deleted),) = vip_server.state.query("SELECT status, deleted FROM executions")
    assert status == "Killed" and deleted == 1
    journal = Journal.in_state_dir(tmp_path / "state")
    (row,) = journal.datasets()
    assert not (vip_server.home() / Path(row.remote_root or "/x").relative_to("/vip/Home")).exists()


def test_unknown_after_the_kill_keeps_waiting_for_confirmation(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    vip_server.faults = FaultSpec(unknown_blip=1.0, unknown_after_kill=1.0)
    # the execution list says Unknown too (a list saying Killed is a confirmation: see
    # test_production_agent's cancel test)
    hostile.add("GET", r"^/rest/executions$", "transform",
                transform=lambda body: [{**x, "status": "Unknown"} for x in body])
    journal, dataset_id, runner = start(
        tmp_path, hostile.url, vip_server.api_key,
        {"pipeline": SLEEP, "inputs": {"duration": 60}}, unknown_limit=0.3,
    )
    drive(runner, dataset_id, until=lambda _o: bool(hostile.requests("PUT", r"/kill$")))
    assert hostile.requests("PUT", r"/kill$")
    ((status,),) = vip_server.state.query("SELECT status FROM executions")
    assert status == "Killed"  # killed, but VIP keeps saying Unknown
    for _ in range(10):
        assert runner.step(dataset_id).stage == "monitor"
    assert not hostile.requests("DELETE") and not hostile.requests("PUT", r"/delete$")
    row = journal.get(dataset_id)
    assert "waiting for VIP to confirm" in (row.error or ""), row.error
    vip_server.faults = FaultSpec()  # VIP now reports the kill
    outcome = drive(runner, dataset_id)
    assert outcome.stage == "failed"
    assert "ended Killed" in (journal.get(dataset_id).error or "")
    assert hostile.requests("PUT", r"/delete$")  # the killed execution, once confirmed
    assert hostile.guard.violations == []  # type: ignore[attr-defined]


# -- labels VIP defines but the old code ignored, and words it does not define ------------


def _with_status(word: str) -> Any:
    def change(body: Any) -> Any:
        return {**body, "status": word}

    return change


def test_initialization_failed_ends_monitoring(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    hostile.add("GET", r"^/rest/executions/[^/]+$", "transform",
                transform=_with_status("InitializationFailed"))
    journal, dataset_id, runner = start(
        tmp_path, hostile.url, vip_server.api_key, {"pipeline": SLEEP, "inputs": {"duration": 0.1}}
    )
    outcome = drive(runner, dataset_id, steps=100)
    assert outcome.stage == "failed"
    assert "ended InitializationFailed" in (journal.get(dataset_id).error or "")


def test_a_status_word_vip_does_not_define_is_reported_once_and_treated_as_running(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    rule = hostile.add("GET", r"^/rest/executions/[^/]+$", "transform",
                       transform=_with_status("Gobbledygook"), times=8)
    journal, dataset_id, runner = start(
        tmp_path, hostile.url, vip_server.api_key, {"pipeline": SLEEP, "inputs": {"duration": 0.1}}
    )
    outcome = drive(runner, dataset_id)
    assert rule.hits == 8
    assert outcome.stage == "done", journal.get(dataset_id).error
    odd = [ev for ev in journal.events(dataset_id) if "not one VIP defines" in ev.message]
    assert len(odd) == 1 and odd[0].level == "warning"
    assert hostile.guard.violations == []  # type: ignore[attr-defined]


# -- 200 carrying an error, or the wrong shape ---------------------------------------------


def test_200_with_an_error_body_on_an_execution_is_a_typed_error(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    client = VipClient(hostile.url, vip_server.api_key, retries=0)
    client.makedirs("/vip/Home/out")
    created = client.create_execution("e1", SLEEP, {"duration": "0.1"}, "/vip/Home/out")
    rule = hostile.add("GET", r"^/rest/executions/[^/]+$", "error_body", code=8000)
    with pytest.raises(ProtocolError) as caught:
        client.execution(created["identifier"])
    assert '"errorCode": 8000' in (caught.value.detail or "")
    assert caught.value.http_status == 200
    hostile.add("GET", r"^/rest/executions/[^/]+$", "json", body=[1, 2, 3], times=1)
    rule.times = 0  # the wrong shape next
    with pytest.raises(ProtocolError, match="not an execution"):
        client.execution(created["identifier"])


def test_a_server_answering_errors_in_200s_is_reported_once_then_resumes(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    journal, dataset_id, runner = start(
        tmp_path, hostile.url, vip_server.api_key, {"pipeline": SLEEP, "inputs": {"duration": 0.1}}
    )
    drive(runner, dataset_id, until=lambda o: o.stage == "monitor")
    rule = hostile.add("GET", r"^/rest/executions/[^/]+$", "error_body", code=8000, times=6)
    errors = []
    for _ in range(6):
        runner.step(dataset_id)
        errors.append(journal.get(dataset_id).error or "")
    assert rule.hits == 6
    assert all("VIP unreachable since" in e and "next try at" in e for e in errors), errors
    outcome = drive(runner, dataset_id)
    assert outcome.stage == "done", journal.get(dataset_id).error
    messages = [ev.message for ev in journal.events(dataset_id)]
    assert sum("unreachable or failing" in m for m in messages) == 1, messages
    assert sum("answers again" in m for m in messages) == 1, messages
    assert not any(m.endswith(": None") for m in messages)


def test_200_with_an_error_body_on_the_pipeline_sends_and_launches_nothing(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip
) -> None:
    hostile.add("GET", r"^/rest/pipelines/", "error_body", code=8000)
    ds = write_dataset(
        tmp_path / "drop" / "p-1", {"x.txt": "x\n"}, {"pipeline": SLEEP, "inputs": {"duration": 1}}
    )
    result = run_agent(
        "run", str(ds), "--server", hostile.url, "--state", str(tmp_path / "state"),
        "--output", str(tmp_path / "out"), "--timeout", "0.5", "--give-up-after", "1",
        api_key=vip_server.api_key, cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 75, result.stderr
    assert "gave up" in result.stderr and "errorCode" in result.stderr
    assert "Traceback" not in result.stderr
    assert not hostile.requests("PUT") and not hostile.requests("POST")
    assert vip_server.state.query("SELECT id FROM executions") == []


# -- paths from the server --------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["relative/out.txt", "/vip/Home/../../etc/passwd", "/vip/Home/elsewhere/out.txt"]
)
def test_result_paths_that_are_relative_dotted_or_elsewhere_fail_the_dataset(
    tmp_path: Path, vip_server: LocalVip, hostile: HostileVip, bad: str
) -> None:
    def spoil(body: Any) -> Any:
        return [{**item, "path": bad} for item in body]

    hostile.add("GET", r"^/rest/executions/[^/]+/results$", "transform", transform=spoil)
    journal, dataset_id, runner = start(
        tmp_path, hostile.url, vip_server.api_key,
        {"pipeline": "FileStats/1.0", "inputs": {"input_file": "x.txt"}},
    )
    outcome = drive(runner, dataset_id)
    row = journal.get(dataset_id)
    assert outcome.stage == "failed"
    assert "refusing to use it" in (row.error or "") and repr(bad) in (row.error or "")
    assert not hostile.requests("DELETE")
    out = Path(row.output_dir or "")
    written = {p.name for p in out.rglob("*") if p.is_file()}
    assert written <= {"STATUS.json", "session_data.json", "stdout.txt", "stderr.txt"}, written
    # nothing was cleaned: the user decides (retry or cancel)
    remote = vip_server.home() / Path(row.remote_root or "/x").relative_to("/vip/Home")
    assert (remote / "INPUTS").is_dir()


# -- session_data.json after cleanup ----------------------------------------------------------


def test_session_data_after_cleanup_says_removed_and_vipsession_accepts_it(
    tmp_path: Path, vip_server: LocalVip, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vip_client import VipSession

    monkeypatch.chdir(tmp_path)
    journal, dataset_id, runner = start(
        tmp_path, vip_server.url, vip_server.api_key,
        {"pipeline": "FileStats/1.0", "inputs": {"input_file": "x.txt"}},
    )
    assert drive(runner, dataset_id).stage == "done"
    row = journal.get(dataset_id)
    (e,) = journal.executions(dataset_id)
    data = json.loads((Path(row.output_dir or "") / "session_data.json").read_text())
    assert data["workflows"][e.vip_id]["status"] == "Removed"
    assert data["removed_from_vip"]["paths"] == [row.remote_root]
    assert data["removed_from_vip"]["executions"] == [e.vip_id]
    session = VipSession.init(
        api_key=vip_server.api_key, vip_portal_url=vip_server.url, verbose=False,
        output_dir=row.output_dir,
    )
    assert session.session_name == row.session
    session.download_outputs()  # nothing to download, and no 8015 from a deleted execution
    assert session.workflows[e.vip_id]["status"] == "Removed"


def test_agent_yaml_unknown_limit_goes_with_each_dataset(tmp_path: Path) -> None:
    from agent.config import load_config
    from agent.watch.drop import DropFolder

    (tmp_path / "drop").mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(
        "drops:\n  - path: drop\n    output: out\n    unknown_limit: 90m\n", encoding="utf-8"
    )
    (drop,) = load_config(config).drops
    assert drop.unknown_limit == 5400
    folder = DropFolder(drop, Journal.in_state_dir(tmp_path / "state"), on_ready=lambda _i: None)
    assert folder.options()["unknown_limit"] == 5400


def test_strict_answers_keep_the_raw_answer_but_never_the_key(
    vip_server: LocalVip, hostile: HostileVip
) -> None:
    from agent.vip.errors import CapacityError, LaunchUncertain

    key = vip_server.api_key
    client = VipClient(hostile.url, key, retries=0)
    # a pipeline without parameters is not a pipeline description (it used to mean "no inputs")
    hostile.add("GET", r"^/rest/pipelines/", "json", body={"identifier": "Sleep/1.0"}, times=1)
    with pytest.raises(ProtocolError, match="not a pipeline description"):
        client.pipeline("Sleep/1.0")
    # a proxy echoing the request's key inside an error body: the detail keeps the answer, not the key
    hostile.add("GET", r"^/rest/platform", "error_body", code=8000, message=f"bad {key}", times=1)
    with pytest.raises(ProtocolError) as caught:
        client.platform()
    assert "<apikey>" in (caught.value.detail or "") and key not in str(caught.value.detail)
    # a launch answered 200 + 2001 was refused; 200 + 8000 may have created it
    hostile.add("POST", r"^/rest/executions$", "error_body", code=2001, times=1)
    with pytest.raises(CapacityError):
        client.create_execution("e2", SLEEP, {"duration": "0.1"}, "/vip/Home")
    hostile.add("POST", r"^/rest/executions$", "error_body", code=8000, times=1)
    with pytest.raises(LaunchUncertain):
        client.create_execution("e3", SLEEP, {"duration": "0.1"}, "/vip/Home")
    assert vip_server.state.query("SELECT id FROM executions") == []
