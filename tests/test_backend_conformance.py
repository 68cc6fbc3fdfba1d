"""One conformance suite for every backend of :mod:`agent.backend.port`.

Each test runs on the in-memory backend and on the VIP backend over HTTP to the local
server (``agent.localvip``), ideal and with its production profile. A new backend is added
to ``PLATFORMS`` and must pass as is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import wait_for

from agent.backend import Backend, RunState, open_backend
from agent.backend.memory import MemoryBackend
from agent.localvip import FaultSpec, LocalVip
from agent.vip.errors import ApiError, CapacityError, NotFoundError

PLATFORMS = ["memory", "vip", "vip-production"]
#: the local server as slow and strict as VIP 4.6 (async deletes, GASW job statuses such as
#: CANCELLED_REPLICA, Unknown after a kill...), minus what would make a launch fail at random
PRODUCTION = {"launch_refusal": 0.0, "late_landing": 0.0, "staging_delay": 0.2, "job_statuses": 1.0}
ROOT = "/vip/Home/conformance"
PIPELINE = "Sleep/1.0"


@dataclass
class Platform:
    """A backend and the few controls the suite needs that the port does not give."""

    backend: Backend
    #: poll ``predicate`` until truthy (the memory backend moves its clock instead of waiting)
    until: Callable[[Callable[[], Any], str], Any]
    #: make the next launch be refused for capacity (2001), or with the code given
    refuse_next_launch: Callable[..., None]


@pytest.fixture(params=PLATFORMS)
def platform(request: pytest.FixtureRequest) -> Iterator[Platform]:
    if request.param == "memory":
        mem = MemoryBackend(default_duration=5.0)

        def until(predicate: Callable[[], Any], what: str) -> Any:
            for _ in range(600):
                value = predicate()
                if value:
                    return value
                mem.clock.advance(1.0)
            raise AssertionError(f"{what} not met within 600 clock seconds")

        def refuse(code: int = 2001) -> None:
            mem.faults.refuse_launches = 1
            mem.faults.refuse_code = code

        yield Platform(mem, until, refuse)
        return
    if request.param == "vip-production":
        root = request.getfixturevalue("tmp_path") / "production-vip"
        server = LocalVip(root, profile="production",
                          faults=FaultSpec.for_profile("production", **PRODUCTION))
        server.start()
        request.addfinalizer(server.stop)
    else:
        server = request.getfixturevalue("vip_server")
    vip = open_backend(server.url, server.api_key, retries=0)

    def poll(predicate: Callable[[], Any], what: str) -> Any:
        return wait_for(predicate, timeout=30, what=what)

    def refuse_vip(code: int = 2001) -> None:
        if code == 2001:
            server.faults.capacity = 1.0
        else:  # the engine refuses (localvip's launch_refusal)
            server.faults.launch_refusal = 1.0
            server.faults.launch_refusal_code = frozenset({code})
        server.faults.times = server.faults.injected + 1

    try:
        yield Platform(vip, poll, refuse_vip)
    finally:
        vip.close()


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_files_round_trip(platform: Platform, tmp_path: Path) -> None:
    store = platform.backend.storage
    folder = f"{ROOT}/s1/INPUTS/sub"
    data = bytes(range(256)) * 1000
    store.makedirs(folder)
    store.makedirs(folder)  # an existing folder is fine
    sent: list[int] = []
    store.put(_file(tmp_path, "a.bin", data), f"{folder}/a.bin", progress=sent.append)
    store.put(_file(tmp_path, "b.txt", b"hello"), f"{folder}/b.txt", verify=False)
    assert sum(sent) == len(data)
    assert store.sizes(folder) == {"a.bin": len(data), "b.txt": 5}
    assert store.exists(f"{folder}/a.bin") and store.exists(folder)
    got: list[int] = []
    target = tmp_path / "out" / "a.bin"
    assert store.get(f"{folder}/a.bin", target, expected_size=len(data), progress=got.append) == len(data)
    assert target.read_bytes() == data and sum(got) == len(data)
    assert not target.with_name("a.bin.part").exists()
    store.delete(f"{ROOT}/s1")
    platform.until(lambda: not store.exists(f"{ROOT}/s1"), "delete")
    assert not store.exists(f"{folder}/a.bin")
    assert store.sizes(folder) == {}


def test_missing_paths(platform: Platform, tmp_path: Path) -> None:
    store = platform.backend.storage
    assert store.sizes(f"{ROOT}/none") == {}
    assert not store.exists(f"{ROOT}/none/x")
    with pytest.raises(NotFoundError):
        store.delete(f"{ROOT}/none")
    store.delete(f"{ROOT}/none", missing_ok=True)
    with pytest.raises(NotFoundError):
        store.get(f"{ROOT}/none/x", tmp_path / "x")


def test_pipelines(platform: Platform) -> None:
    engine = platform.backend.engine
    assert PIPELINE in {p.get("identifier") for p in engine.pipelines()}
    described = engine.pipeline(PIPELINE)
    assert {p["name"] for p in described["parameters"]} >= {"duration"}
    with pytest.raises(NotFoundError):
        engine.pipeline("NoSuchPipeline/0.0")


def test_execution_lifecycle(platform: Platform) -> None:
    backend = platform.backend
    engine = backend.engine
    layout = backend.session(ROOT + "/", "s2")
    assert (layout.inputs, layout.outputs) == (f"{ROOT}/s2/INPUTS", f"{ROOT}/s2/OUTPUTS")
    assert backend.layout(layout.root + "/") == layout
    assert layout.results_location("a-r1", several=True) == f"{layout.outputs}/a-r1"
    backend.storage.makedirs(layout.outputs)
    started = engine.launch("conf-run", PIPELINE, {"duration": "0.3"}, layout.outputs)
    assert started.id and started.status.state is RunState.RUNNING
    found = engine.find("conf-run")
    assert found is not None and found.id == started.id
    assert engine.find("conf-never-launched") is None
    ended = platform.until(
        lambda: (s := engine.status(started.id)) is not None and s.status.ended and s, "end"
    )
    assert ended.status.state is RunState.FINISHED and ended.status.label == "Finished"
    assert engine.job_problems(ended.jobs) == []
    results = [r for r in engine.results(started.id) if r.exists and not r.is_dir]
    assert results and all(r.path.startswith(layout.outputs + "/") for r in results)
    assert all(r.size for r in results)
    assert isinstance(engine.log(started.id, "stdout", "1"), str)
    engine.delete_execution(started.id)
    engine.delete_execution(started.id)  # already deleted: fine
    assert engine.status(started.id) is None  # gone for certain: the runner records it lost


def test_kill(platform: Platform) -> None:
    engine = platform.backend.engine
    platform.backend.storage.makedirs(f"{ROOT}/s3/OUTPUTS")
    started = engine.launch("conf-kill", PIPELINE, {"duration": "60"}, f"{ROOT}/s3/OUTPUTS")
    engine.kill(started.id)
    ended = platform.until(
        lambda: (s := engine.status(started.id)) is not None and s.status.ended and s, "kill"
    )
    assert ended.status.state is RunState.KILLED
    engine.delete_execution(started.id)
    with pytest.raises(NotFoundError):
        engine.kill(started.id)


def test_unknown_execution_is_lost(platform: Platform) -> None:
    assert platform.backend.engine.status("no-such-execution") is None


def test_launch_refused_for_capacity(platform: Platform) -> None:
    engine = platform.backend.engine
    platform.backend.storage.makedirs(f"{ROOT}/s4/OUTPUTS")
    platform.refuse_next_launch()
    with pytest.raises(CapacityError):
        engine.launch("conf-refused", PIPELINE, {"duration": "0.1"}, f"{ROOT}/s4/OUTPUTS")
    assert engine.find("conf-refused") is None


@pytest.mark.parametrize("code", [2003, 2004])
def test_launch_refused_by_the_engine(platform: Platform, code: int) -> None:
    """2003 (engine saturated) is "try later" (CapacityError, its code kept for the engine
    backoff); 2004 (launch error) is a refusal for good (ApiError); nothing is created."""
    engine = platform.backend.engine
    platform.backend.storage.makedirs(f"{ROOT}/s5/OUTPUTS")
    platform.refuse_next_launch(code)
    expected = CapacityError if code == 2003 else ApiError
    with pytest.raises(expected) as caught:
        engine.launch("conf-engine", PIPELINE, {"duration": "0.1"}, f"{ROOT}/s5/OUTPUTS")
    assert caught.value.code == code
    assert engine.find("conf-engine") is None


def test_status_words(platform: Platform) -> None:
    classify = platform.backend.engine.classify
    assert classify("Finished").state is RunState.FINISHED
    assert classify("Killed").state is RunState.KILLED
    assert classify("ExecutionFailed").state is RunState.FAILED
    assert classify("Running").state is RunState.RUNNING and not classify("Running").ended
    assert classify("Unknown").state is RunState.UNKNOWN and not classify("Unknown").ended
    assert classify("Lost").state is RunState.LOST and classify("Lost").ended
    strange = classify("Paused?")
    assert strange.state is RunState.RUNNING and not strange.recognised


def test_platform_facts(platform: Platform) -> None:
    backend = platform.backend
    backend.check_key()
    limit = backend.max_transfer_size()
    assert limit is None or limit > 0
    assert backend.server
