"""The DICOM node's fast paths keep the promises of the slow ones: indexing after the answer
(batched, complete when the sender's association is released; the first copy wins across
concurrent resends), de-identification ahead of time in worker processes (no secrets in
their environment, idle priority, a leak spread across objects still caught, a dead worker
only slows the hand-over down), and ``deidentify: none`` linking the spooled originals.
Real dcmtk senders, real folders, the journal's SQLite file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from agenthelpers import wait_for
from dicomhelpers import (  # noqa: F401 (nodes_fixture: the fixture `nodes`)
    PATIENT_FILES,
    by_study,
    datasets,
    make_node,
    needs_dcmtk,
    nodes_fixture,
    run,
    spectroscopy,
    storescu,
    storescu_private,
)

from agent.dicom import prepare
from agent.dicom.config import parse_dicom
from agent.dicom.node import DicomNode
from agent.metrics import _dicom_metrics

pytestmark = needs_dcmtk
BIG = list(by_study(PATIENT_FILES).values())[-1]  # 11 objects


def test_index_is_complete_when_the_sender_is_released(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, quiet=30)
    port = run(node, nodes)
    assert storescu(port, BIG).returncode == 0
    # no waiting: the node indexes what an association brought before answering its release
    (study,) = node.index.studies()
    assert len(node.index.objects(study.study_uid)) == 11
    assert node.snapshot()["counters"]["objects"] == 11


def test_concurrent_resends_keep_the_first_copy(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}], quiet=1)
    port = run(node, nodes)
    argv = ["storescu", "-R", "-aet", "SCANNER1", "-aec", "VIPAGENT", "127.0.0.1", str(port), *map(str, BIG)]
    senders = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(60) for p in senders] == [0, 0]
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset").values()
    assert len([f for f in files if f.suffix == ".dcm"]) == 11
    snap = node.snapshot()["counters"]
    assert (snap["objects"], snap["duplicates"]) == (11, 11)
    assert len(list(node.spool.files())) == 11


def test_deidentify_none_links_the_spooled_originals(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}], quiet=1)
    port = run(node, nodes)
    assert storescu(port, BIG).returncode == 0
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset").values()
    spooled = {p.stat().st_ino for p in node.spool.files()}
    objects = [f for f in files if f.suffix == ".dcm"]
    assert len(objects) == 11 and {f.stat().st_ino for f in objects} == spooled  # no copy made
    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in BIG}
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in objects} == sent


def test_workers_in_status_and_metrics(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, quiet=1)
    port = run(node, nodes)
    assert storescu(port, BIG).returncode == 0
    wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset")

    def gauges() -> dict[str, float]:
        found = {m.name: m.samples[0].value for m in _dicom_metrics(node.index.path)
                 if m.name.startswith("vip_agent_dicom_deidentify")}  # fmt: skip
        return found if found.get("vip_agent_dicom_deidentify_workers") == len(node.preparer._workers) else {}

    assert node.preparer is not None
    found = wait_for(gauges, what="the workers in /metrics")
    assert found["vip_agent_dicom_deidentify_waiting"] == 0


def test_workers_get_no_secret_and_idle_priority(tmp_path: Path, nodes: list[DicomNode],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("VIP_API_KEY", "key-that-must-stay-home")
    monkeypatch.setenv("HTTPS_PROXY", "http://user:secret@proxy:3128")
    node = make_node(tmp_path)
    run(node, nodes)
    assert node.preparer is not None
    procs = wait_for(lambda: [w.proc for w in node.preparer._workers if w.proc is not None] or None,
                     what="the de-identification workers")  # fmt: skip
    for proc in procs:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"key-that-must-stay-home" not in environ and b"secret@proxy" not in environ
        wait_for(lambda p=proc: os.sched_getscheduler(p.pid) == os.SCHED_IDLE,  # type: ignore[attr-defined]
                 what="the worker at idle priority")  # fmt: skip


def test_a_dead_worker_only_slows_the_hand_over(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, quiet=1)
    port = run(node, nodes)
    assert node.preparer is not None
    procs = wait_for(lambda: [w.proc for w in node.preparer._workers if w.proc is not None] or None,
                     what="the de-identification workers")  # fmt: skip
    for proc in procs:
        proc.kill()
        proc.wait(10)
    assert storescu(port, BIG).returncode == 0
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset").values()
    objects = [f for f in files if f.suffix == ".dcm"]
    assert len(objects) == 11 and node.preparer.hits == 0  # de-identified at hand-over instead
    for f in objects:
        ds = pydicom.dcmread(f)
        assert "Doe" not in str(ds.PatientName) and ds.PatientIdentityRemoved == "YES"


def test_a_value_from_another_object_is_caught_in_a_prepared_copy(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """A worker scans its copy for the object's own identifying values; the hand-over scans
    again for the values of the whole study: another object's spelling of the name, planted
    in a kept Siemens block, refuses the dataset."""
    node = make_node(tmp_path, quiet=1)
    port = run(node, nodes)
    planted = spectroscopy(tmp_path / "a", leak=True, name="Bravo^Bernadette")
    other = spectroscopy(tmp_path / "b", name="Bravo^Bernadette")
    ds = pydicom.dcmread(planted)
    ds.PatientName = "Alpha^Annabel"  # this object's own name: not what is planted in it
    ds.StudyInstanceUID = pydicom.dcmread(other).StudyInstanceUID
    ds.save_as(planted, enforce_file_format=True)
    assert storescu_private(port, [planted, other], tmp_path).returncode == 0
    wait_for(lambda: [s.state for s in node.index.studies()] == ["refused"], what="the study refused")
    assert node.preparer is not None and node.preparer.hits == 2  # both came prepared, both scanned
    (study,) = node.index.studies()
    assert "identifying values remain" in (study.message or "")
    assert datasets(tmp_path / "drop") == {}


def test_a_stuck_worker_is_stopped_and_the_hand_over_goes_on(tmp_path: Path, nodes: list[DicomNode],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A worker that never answers (a stand-in process reading its requests and sleeping: a
    pathological object) is stopped after the request timeout; the hand-over de-identifies."""
    caplog.set_level(logging.WARNING, logger="vip_agent.dicom")
    stuck = "import sys, time\nfor line in sys.stdin:\n    time.sleep(3600)\n"
    monkeypatch.setattr(prepare._Worker, "command", (sys.executable, "-c", stuck))
    monkeypatch.setattr(prepare, "REQUEST_TIMEOUT", 0.5)
    node = make_node(tmp_path, quiet=1)
    port = run(node, nodes)
    assert storescu(port, BIG).returncode == 0
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset").values()
    assert node.preparer is not None and node.preparer.hits == 0
    assert len([f for f in files if f.suffix == ".dcm"]) == 11
    assert all(pydicom.dcmread(f).PatientIdentityRemoved == "YES" for f in files if f.suffix == ".dcm")
    assert "took more than 0.5 s on one object: stopped" in caplog.text


def test_a_reload_starts_and_stops_the_workers(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """Reloading the first ``deidentify: basic`` route in starts the workers; reloading the last
    one out stops them (their processes end). In between a study comes de-identified."""
    node = make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}], quiet=1)
    port = run(node, nodes)
    assert node.preparer is None
    unchanged = node.config
    drop = str((tmp_path / "drop").resolve())
    basic = parse_dicom({"listen": "127.0.0.1:0", "quiet": 1, "disk_low": 0, "routes": [{"drop": drop}]},
                        source="test.yaml", base=tmp_path, drops=[Path(drop)])  # fmt: skip
    assert basic is not None
    assert node.reconfigure(basic) == ["routes"]
    procs = wait_for(lambda: [w.proc for w in node.preparer._workers if w.proc is not None] or None
                     if node.preparer is not None else None, what="the workers started by the reload")  # fmt: skip
    assert storescu(port, BIG).returncode == 0
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset").values()
    objects = [f for f in files if f.suffix == ".dcm"]
    assert len(objects) == 11 and node.preparer is not None and node.preparer.hits > 0  # prepared by them
    assert all(pydicom.dcmread(f).PatientIdentityRemoved == "YES" for f in objects)
    assert node.reconfigure(unchanged) == ["routes"]
    wait_for(lambda: node.preparer is None, what="the workers stopped by the reload")
    for proc in procs:
        assert proc.wait(10) is not None
