"""Spool retention (``dicom.keep``) and SIGHUP reload of the ``dicom:`` block.

Real senders (dcmtk storescu/echoscu), real spool folders, the real journal; retention runs
from the node's own loop (``keep: 1s`` looks every second) and the reload test drives a real
``vip-agent watch`` process with SIGHUP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from agenthelpers import run_agent, wait_for, watch_process
from dicomhelpers import (
    CSA_NON_IMAGE,
    PATIENT_FILES,
    by_study,
    datasets,
    dicom_files,
    echoscu,
    make_node,
    needs_dcmtk,
    nodes_fixture,
    run,
    spectroscopy,
    storescu,
    storescu_private,
)

from agent.dicom.config import parse_dicom
from agent.dicom.index import PURGED
from agent.dicom.node import DicomNode
from agent.dicom.retention import Retention
from agent.dicom.spool import study_key
from agent.errors import ConfigError
from agent.localvip import LocalVip

pytestmark = needs_dcmtk
__all__ = ["nodes_fixture"]
#: the three studies of pydicom's patient, by StudyDescription (2, 4 and 11 objects)
CAROTIDS, BRAIN, BRAIN_MRA = (files for files in by_study(PATIENT_FILES).values())


def _agent(cwd: Path, *args: str) -> str:
    done = run_agent(*args, api_key="unused", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _states(node: DicomNode) -> dict[str, str]:
    """StudyInstanceUID -> state."""
    return {s.study_uid: s.state for s in node.index.studies()}


def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _spooled(node: DicomNode, files: list[Path]) -> list[Path]:
    folder = node.spool.path_for(_uid(files), "x").parent
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def test_keep_parsed_with_forever_and_a_clear_error(tmp_path: Path) -> None:
    def keep(value: Any) -> float | None:
        config = parse_dicom({"keep": value}, source="a.yaml", base=tmp_path, drops=[])
        assert config is not None
        return config.keep

    assert keep("7d") == 7 * 86400 and keep("forever") is None and keep(90) == 90.0
    assert parse_dicom({}, source="a.yaml", base=tmp_path, drops=[]).keep == 7 * 86400  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="dicom.keep: must be a duration"):
        keep("a week")


def test_only_handed_over_studies_are_deleted_after_keep(tmp_path: Path, nodes: list[DicomNode],
                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Four studies of the same age: handed over (deleted after keep), pending, unrouted and
    refused (all kept: the only copy of what was not sent)."""
    routes = [
        {"match": {"StudyDescription": "^Carotids$"}, "drop": "drop", "deidentify": "none"},
        {"match": {"StudyDescription": "MRA"}, "drop": "drop", "require_series": ["never sent"]},
        {"match": {"SOPClassUID": CSA_NON_IMAGE}, "drop": "drop"},  # basic: the planted name refuses it
    ]
    caplog.set_level(logging.INFO, logger="vip_agent.dicom")
    node = make_node(tmp_path, routes, keep="1s")
    port = run(node, nodes)
    leaky = spectroscopy(tmp_path / "in", leak=True, name="Planted^Patricia", patient_id="PLT500600")
    assert storescu(port, [*CAROTIDS, *BRAIN, *BRAIN_MRA]).returncode == 0
    assert storescu_private(port, [leaky], tmp_path).returncode == 0
    carotids, brain, mra, spectro = _uid(CAROTIDS), _uid(BRAIN), _uid(BRAIN_MRA), _uid([leaky])
    wait_for(lambda: _states(node) == {carotids: "handed", brain: "unrouted", mra: "pending", spectro: "refused"},
             what="the four studies decided")  # fmt: skip
    # the handed-over study's originals go once keep (1 s) is over, from the node's own loop
    wait_for(lambda: not node.spool.path_for(carotids, "x").parent.exists(), what="the handed study deleted")
    (handed,) = datasets(tmp_path / "drop").values()
    assert len([f for f in handed if f.suffix == ".dcm"]) == 2  # the dataset is untouched
    # deidentify: none linked the originals into the dataset: deleting them frees nothing yet
    (line,) = wait_for(lambda: [r.getMessage() for r in caplog.records if "deleted (kept 1s)" in r.getMessage()],
                       what="the deletion logged")  # fmt: skip
    assert "0 B freed" in line and "still linked from datasets in drop folders" in line, line
    assert [len(_spooled(node, f)) for f in (BRAIN, BRAIN_MRA, [leaky])] == [4, 11, 1]
    assert node.retention.run(node.config) == []  # another look: the others, older than keep, stay
    assert _states(node)[carotids] == "handed"  # the study's row stays: later objects stay late
    objects = node.index._db().execute("SELECT state, path FROM dicom_objects WHERE study_uid = ?",
                                       (carotids,)).fetchall()  # fmt: skip
    assert [(r[0], r[1]) for r in objects] == [(PURGED, "")] * 2
    summary = node.index.spool_summary()
    assert (summary["purged_studies"], summary["purged_objects"], summary["objects"]) == (1, 2, 16)
    assert summary["handed_studies"] == 0
    # the command line says so, from the state folder
    shown = _agent(tmp_path, "dicom", "status", "--state", str(tmp_path / "state"), "--json")
    spool = json.loads(shown)["spool"]
    assert (spool["purged_studies"], spool["objects"]) == (1, 16)
    text = _agent(tmp_path, "dicom", "status", "--state", str(tmp_path / "state"))
    assert "deleted after hand-over: 1 study" in text, text


@pytest.mark.parametrize("late", ["new", "rerun", "ignore"])
def test_a_late_object_after_the_purge_follows_late(tmp_path: Path, nodes: list[DicomNode], late: str) -> None:
    node = make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}], keep="1s", late=late)
    port = run(node, nodes)
    first, rest = BRAIN[:3], BRAIN[3:]
    assert storescu(port, first).returncode == 0
    study = _uid(BRAIN)
    wait_for(lambda: _states(node).get(study) == "handed", what="the study handed over")
    wait_for(lambda: not node.spool.path_for(study, "x").parent.exists(), what="its originals deleted")
    assert storescu(port, [*rest, first[0]]).returncode == 0  # a late object, and a resend of a deleted one
    if late == "ignore":
        # kept (and counted), never handed over, and deleted keep after it arrived: had it made
        # the study pending, the study would not be deleted
        wait_for(lambda: node.index.spool_summary()["purged_objects"] == 4, what="the ignored object deleted")
        assert list(datasets(tmp_path / "drop")) == [next(iter(datasets(tmp_path / "drop")))]
    else:
        wait_for(lambda: len(datasets(tmp_path / "drop")) == 2, what="the late dataset")
        late_set = [name for name in datasets(tmp_path / "drop") if name.endswith("-late1")]
        assert len(late_set) == 1
        # new: the late object; rerun: everything the spool still holds (the originals are gone)
        assert len(dicom_files(tmp_path / "drop" / late_set[0])) == 1
        # and the late wave is deleted in its turn
        wait_for(lambda: node.index.spool_summary()["purged_objects"] == 4, what="the late object deleted")
    assert node.counters.snapshot()["duplicates"] == 1  # the deleted object's resend is still a duplicate
    row = node.index.study(study)
    assert row is not None and (row.state, row.objects, row.late) == ("handed", 4, 1)
    assert row.wave == (0 if late == "ignore" else 1)


def test_low_disk_space_deletes_handed_studies_first_never_others(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """Below twice disk_low, handed-over studies go before keep, oldest first; objects are still
    accepted (free space is above disk_low) and unrouted studies stay."""
    free = shutil.disk_usage(tmp_path).free
    routes = [{"match": {"StudyDescription": "^Carotids$"}, "drop": "drop", "deidentify": "none"}]
    node = make_node(tmp_path, routes, keep="7d", disk_low=int(free * 0.6))
    port = run(node, nodes)
    assert storescu(port, [*CAROTIDS, *BRAIN]).returncode == 0
    carotids, brain = _uid(CAROTIDS), _uid(BRAIN)
    wait_for(lambda: _states(node) == {carotids: "handed", brain: "unrouted"}, what="both decided")
    wait_for(lambda: node.index.spool_summary()["purged_objects"] == 2, what="the handed study deleted early")
    assert len(_spooled(node, BRAIN)) == 4


def test_a_refusal_for_disk_space_looks_for_room_at_once(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """An object refused below disk_low makes the node look for handed-over studies to delete
    at its next turn, not at its next periodic look (pushed an hour away here)."""
    node = make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}], keep="7d")
    port = run(node, nodes)
    assert storescu(port, CAROTIDS).returncode == 0
    study = _uid(CAROTIDS)
    wait_for(lambda: _states(node).get(study) == "handed", what="handed over")
    later = time.monotonic() + 3600
    node.retention._next = node.retention._pressure_next = later
    disk_low = shutil.disk_usage(tmp_path).free * 2  # below the watermark from now on
    node.spool.disk_low = disk_low
    node.config = dataclasses.replace(node.config, disk_low=disk_low)
    storescu(port, BRAIN[:1])  # refused: the sender keeps it
    assert node.counters.snapshot()["refusals"] >= 1
    wait_for(lambda: node.index.spool_summary()["purged_objects"] == 2, timeout=10,
             what="the handed study deleted after the refusal")  # fmt: skip


def test_a_purge_a_stop_interrupted_is_finished_at_the_next_start(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """Objects marked purged, the agent stopped before their files went: the next start's
    re-index leaves them alone (no object counted twice) and the first look deletes them."""
    node = make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}], keep="forever")
    port = run(node, nodes)
    assert storescu(port, CAROTIDS).returncode == 0
    study = _uid(CAROTIDS)
    wait_for(lambda: _states(node).get(study) == "handed", what="handed over")
    marked = node.index.purge(study, {o.sop_uid for o in node.index.held(study)})  # marked, then "killed"
    assert len(marked) == 2 and len(_spooled(node, CAROTIDS)) == 2
    node.stop()
    nodes.remove(node)
    again = make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}], keep="forever")
    run(again, nodes)  # keep: forever deletes nothing new, but finishes what was begun
    wait_for(lambda: not again.spool.path_for(study, "x").parent.exists(), what="the purge finished")
    assert again.index.purged_leftovers() == [] and again.index.held(study) == []
    row = again.index.study(study)
    assert row is not None and (row.state, row.objects, row.duplicates, row.wave) == ("handed", 2, 0, 0)
    again_port = again.receiver.port
    assert again_port is not None and storescu(again_port, CAROTIDS[:1]).returncode == 0  # a resend: still a duplicate
    wait_for(lambda: again.counters.snapshot()["duplicates"] == 1, what="the resend counted")
    assert _states(again)[study] == "handed" and len(datasets(tmp_path / "drop")) == 1


def test_kept_while_carried_or_when_the_routes_would_hand_it_over_differently(
        tmp_path: Path, nodes: list[DicomNode]) -> None:  # fmt: skip
    node = make_node(tmp_path, [{"drop": "drop", "deidentify": "none", "name": "all"}], keep="forever")
    port = run(node, nodes)
    assert storescu(port, CAROTIDS).returncode == 0
    study = _uid(CAROTIDS)
    wait_for(lambda: _states(node).get(study) == "handed", what="handed over")
    keep = parse_dicom({"keep": "7d", "routes": [{"drop": "drop", "name": "all"}]}, source="a.yaml",
                       base=tmp_path, drops=[(tmp_path / "drop").resolve()])  # fmt: skip
    renamed = parse_dicom({"keep": "7d", "routes": [{"drop": "drop", "name": "renamed"}]}, source="a.yaml",
                          base=tmp_path, drops=[(tmp_path / "drop").resolve()])  # fmt: skip
    assert keep is not None and renamed is not None
    later = time.time() + 8 * 86400  # eight days on: past keep
    carried = Retention(node.index, node.spool, carried=lambda: {study}, clock=lambda: later)
    assert carried.run(keep) == [] and len(_spooled(node, CAROTIDS)) == 2  # an association is sending it
    other = Retention(node.index, node.spool, clock=lambda: later)
    assert other.run(renamed) == [] and len(_spooled(node, CAROTIDS)) == 2
    (why,) = other.kept.values()
    assert "not handed over by renamed" in why
    (purged,) = Retention(node.index, node.spool, clock=lambda: later).run(keep)
    # deidentify: none: the dataset in the drop folder links the originals, nothing is freed yet
    assert (purged.objects, purged.why, purged.bytes) == (2, "kept 7d", 0)
    assert _spooled(node, CAROTIDS) == [] and not node.spool.path_for(study, "x").parent.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sighup_applies_routes_live_and_restarts_on_a_new_port(tmp_path: Path, vip_server: LocalVip) -> None:
    """A real ``vip-agent watch``: a route added by SIGHUP takes a study no route took (without a
    restart: the port stays); a new listen port restarts the node there (C-ECHO answers)."""
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump({"pipeline": "FileStats/1.0", "inputs": {"input_file": "*.dcm"}}),
                                   encoding="utf-8")  # fmt: skip
    first = _free_port()
    config: dict[str, Any] = {
        "state": "state",
        "drops": [{"path": "drop", "output": "out", "server": vip_server.url, "keep_remote": True,
                   "readiness": {"rule": "marker"}, "poll": {"min": 0.1, "max": 0.5}}],
        "dicom": {"listen": f"127.0.0.1:{first}", "quiet": "1s", "disk_low": 0, "keep": "forever",
                  "routes": [{"match": {"Modality": "CT"}, "drop": "drop", "deidentify": "none"}]},
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = tmp_path / "agent.log"
    port_file = tmp_path / "state" / "dicom-port"
    with watch_process(["--config", str(path)], api_key=vip_server.api_key, cwd=tmp_path, log=log,
                       ready=port_file.exists, what="the DICOM port", stop_timeout=20) as proc:  # fmt: skip
        assert storescu(first, CAROTIDS).returncode == 0

        def status() -> dict[str, Any]:
            return dict(json.loads(_agent(tmp_path, "dicom", "status", "--state", str(tmp_path / "state"), "--json")))

        wait_for(lambda: [p["state"] for p in status()["pending"]] == ["unrouted"], timeout=30, what="unrouted")
        config["dicom"]["routes"].append({"match": {"Modality": "MR"}, "drop": "drop", "deidentify": "none"})
        config["dicom"]["quiet"] = "2s"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: datasets(drop), timeout=30, what="the study handed over by the new route")
        assert len(dicom_files(drop / next(iter(datasets(drop))))) == 2
        assert "applied the reloaded quiet, routes (associations kept open)" in log.read_text()
        assert int(port_file.read_text()) == first and echoscu(first).returncode == 0  # not restarted

        config["dicom"]["allow"] = [{"ae": "SCANNER1"}]  # the allow-list applies to the next association
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: echoscu(first, aet="INTRUDER").returncode != 0, timeout=30, what="INTRUDER rejected")
        assert echoscu(first).returncode == 0 and int(port_file.read_text()) == first

        folder = tmp_path / "state" / "dicom" / "spool" / "objects" / study_key(_uid(CAROTIDS))
        assert len(list(folder.glob("*.dcm"))) == 2  # keep: forever
        config["dicom"]["keep"] = "1s"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        # the log line follows the deletion: wait for it, not for the folder
        wait_for(lambda: "deleted (kept 1s): 2 object(s)" in log.read_text(), timeout=30, what="the deletion logged")
        assert not folder.exists()

        second = _free_port()
        config["dicom"]["listen"] = f"127.0.0.1:{second}"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: echoscu(second).returncode == 0, timeout=30, what="C-ECHO on the new port")
        assert echoscu(first).returncode != 0
        assert int(port_file.read_text()) == second
        assert "DICOM node: listen changed: restarting" in log.read_text()

        config["dicom"]["ae_title"] = "NEWTITLE"  # same port: the node restarts on it
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: echoscu(second, aec="NEWTITLE").returncode == 0, timeout=30, what="the new AE title")
        assert echoscu(second).returncode != 0  # VIPAGENT is no longer the called AE title

        config["dicom"]["listen"] = "127.0.0.1:nonsense"  # invalid: the running node stays as it is
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the current configuration" in log.read_text(), what="the bad reload refused")
        assert echoscu(second, aec="NEWTITLE").returncode == 0

        block = {**config.pop("dicom"), "listen": f"127.0.0.1:{second}"}  # removed: the node stops; added: starts
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: echoscu(second, aec="NEWTITLE").returncode != 0, timeout=30, what="the node stopped")
        assert "the dicom: block was removed: stopping" in log.read_text()
        config["dicom"] = block
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: echoscu(second, aec="NEWTITLE").returncode == 0, timeout=30, what="the node started again")
        assert proc.poll() is None
