"""The DICOM node against real senders (dcmtk storescu/echoscu): associations, spool,
duplicates, allow-list, watermark, completeness, late objects, restart.

Quiet time is 1 s; every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pydicom
import pytest
from agenthelpers import wait_for
from dicomhelpers import (  # noqa: F401 (nodes_fixture: the fixture `nodes`)
    PATIENT_FILES,
    STUDY_SIZES,
    by_study,
    datasets,
    dicom_files,
    echoscu,
    make_node,
    needs_dcmtk,
    nodes_fixture,
    pydicom_file,
    run,
    spectroscopy,
    storescu,
    storescu_private,
)

from agent.dicom.node import DicomNode
from agent.dicom.status import read_status

pytestmark = needs_dcmtk


def counts(drop: Path, n: int, timeout: float = 30) -> list[int]:
    """Objects per dataset once ``n`` datasets are in ``drop`` (sorted)."""
    found = wait_for(lambda: len(datasets(drop)) >= n and datasets(drop), timeout, what=f"{n} datasets")
    return sorted(len(dicom_files(drop / name)) for name in found)


def test_one_association_three_studies(tmp_path: Path, nodes: list[DicomNode]) -> None:
    port = run(make_node(tmp_path), nodes)
    done = storescu(port, PATIENT_FILES)
    assert done.returncode == 0, done.stderr
    assert counts(tmp_path / "drop", 3) == STUDY_SIZES
    for name in datasets(tmp_path / "drop"):
        summary = json.loads((tmp_path / "drop" / name / "DICOM.json").read_text())
        assert summary["objects"] == len(dicom_files(tmp_path / "drop" / name))
        assert summary["study"] in name and "Doe" not in name
    snap = nodes[0].snapshot()
    assert snap["counters"]["objects"] == 17 and snap["counters"]["associations"] == 1
    assert read_status(tmp_path / "state")["counters"]["objects"] == 17


def test_one_study_across_two_associations(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, quiet=2)
    port = run(node, nodes)
    big = list(by_study(PATIENT_FILES).values())[-1]
    assert storescu(port, big[:6]).returncode == 0
    assert storescu(port, big[6:]).returncode == 0
    assert counts(tmp_path / "drop", 1) == [11]
    assert node.snapshot()["counters"]["associations"] == 2


def test_open_association_holds_a_quiet_study(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """A study whose association is still open is not complete, however quiet it is."""
    node = make_node(tmp_path, quiet=0.2)
    port = run(node, nodes)
    small = list(by_study(PATIENT_FILES).values())[0]
    # storescu's --repeat makes one association last long enough to look while it is open
    sender = threading.Thread(target=storescu, args=(port, small), kwargs={"extra": ["--repeat", "200"]})
    sender.start()
    wait_for(lambda: node.receiver.open_associations() == 1 and node.counters.snapshot()["duplicates"] > 20,
             what="an open association resending")  # fmt: skip
    assert datasets(tmp_path / "drop") == {}
    assert "receiving" in (next(iter(node._why.values()), "") or "")
    sender.join(60)
    assert counts(tmp_path / "drop", 1) == [2]


def test_two_senders_interleaving(tmp_path: Path, nodes: list[DicomNode]) -> None:
    port = run(make_node(tmp_path, quiet=1.5), nodes)
    results = {}

    def send(aet: str, files: list[Path]) -> None:
        results[aet] = storescu(port, files, aet=aet)

    threads = [threading.Thread(target=send, args=(aet, PATIENT_FILES[i::2]))
               for i, aet in enumerate(("SCANNER1", "PACS2"))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.returncode == 0 for r in results.values()), results
    assert counts(tmp_path / "drop", 3) == STUDY_SIZES


@pytest.mark.parametrize("policy", ["new", "rerun", "ignore"])
def test_late_object(tmp_path: Path, nodes: list[DicomNode], policy: str) -> None:
    node = make_node(tmp_path, late=policy)
    port = run(node, nodes)
    study = list(by_study(PATIENT_FILES).values())[1]
    assert storescu(port, study[:3]).returncode == 0
    assert counts(tmp_path / "drop", 1) == [3]
    assert storescu(port, study[3:]).returncode == 0
    if policy == "ignore":
        wait_for(lambda: node.counters.snapshot()["late"] == 1, what="the late object counted")
        (row,) = node.index.studies()
        assert row.late == 1 and row.state == "handed"
        wait_for(lambda: node.check() == [] and len(datasets(tmp_path / "drop")) == 1)
        return
    assert counts(tmp_path / "drop", 2) == sorted([3, 1 if policy == "new" else 4])
    assert any("-late1" in name for name in datasets(tmp_path / "drop"))


def test_restart_in_the_middle_of_a_study(tmp_path: Path, nodes: list[DicomNode]) -> None:
    first = make_node(tmp_path, quiet=1)
    port = first.start()
    big = list(by_study(PATIENT_FILES).values())[-1]
    assert storescu(port, big[:5]).returncode == 0
    first.stop()  # the agent stops with the study half received
    # what a crash leaves: a half-written temporary, and an object spooled but not indexed
    (tmp_path / "state" / "dicom" / "spool" / "tmp" / "x.part").write_bytes(b"half")
    assert datasets(tmp_path / "drop") == {}
    second = make_node(tmp_path, quiet=1)
    port = run(second, nodes)
    assert not (tmp_path / "state" / "dicom" / "spool" / "tmp" / "x.part").exists()
    assert [s.objects for s in second.index.studies()] == [5]
    assert storescu(port, big[5:]).returncode == 0
    assert counts(tmp_path / "drop", 1) == [11]


def test_unindexed_spool_file_is_indexed_at_start(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path)
    f = PATIENT_FILES[0]
    ds = pydicom.dcmread(f)
    target = node.spool.path_for(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    target.parent.mkdir(parents=True)
    target.write_bytes(f.read_bytes())
    run(node, nodes)
    assert counts(tmp_path / "drop", 1) == [1]


def test_duplicate_resend(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, quiet=2)
    port = run(node, nodes)
    study = list(by_study(PATIENT_FILES).values())[1]
    assert storescu(port, study).returncode == 0
    assert storescu(port, study).returncode == 0  # a scanner resending after a restart
    assert counts(tmp_path / "drop", 1) == [4]
    snap = node.snapshot()["counters"]
    assert (snap["objects"], snap["duplicates"]) == (4, 4)
    assert node.index.studies()[0].duplicates == 4


def test_allow_list_rejects_a_caller(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, allow=[{"ae": "SCANNER1", "host": "127.0.0.1"}])
    port = run(node, nodes)
    refused = storescu(port, PATIENT_FILES[:1], aet="INTRUDER")
    assert refused.returncode != 0 and "reject" in (refused.stdout + refused.stderr).lower()
    assert echoscu(port, aet="INTRUDER").returncode != 0
    assert echoscu(port, aet="SCANNER1").returncode == 0
    wrong_called = echoscu(port, aet="SCANNER1", aec="SOMEONE")
    assert wrong_called.returncode != 0
    snap = node.snapshot()["counters"]
    assert snap["objects"] == 0 and snap["rejected"] >= 2 and snap["echoes"] == 1
    assert list(node.spool.files()) == []


def test_allow_list_by_address(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """An entry naming only a host admits any title from it, and nobody from elsewhere."""
    far = make_node(tmp_path / "far", allow=[{"host": "10.0.0.5"}])
    port = run(far, nodes)
    assert echoscu(port, aet="SCANNER1").returncode != 0  # 127.0.0.1 is not 10.0.0.5
    near = make_node(tmp_path / "near", allow=[{"host": "127.0.0.1"}])
    port = run(near, nodes)
    assert echoscu(port, aet="ANYTITLE").returncode == 0
    assert (far.snapshot()["counters"]["rejected"], near.snapshot()["counters"]["echoes"]) == (1, 1)


def test_disk_watermark_refuses_out_of_resources(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, disk_low="1000TB")
    port = run(node, nodes)
    study = list(by_study(PATIENT_FILES).values())[0]
    refused = storescu(port, study, extra=["-v"])
    text = (refused.stdout + refused.stderr).lower()
    assert "out of resources" in text or "outofresources" in text or "a700" in text, text
    assert list(node.spool.files()) == [] and list(node.spool.tmp.iterdir()) == []
    assert node.snapshot()["counters"]["refusals"] >= 1  # storescu stops at the first refusal
    node.spool.disk_low = 0  # space freed: the sender, which kept the objects, sends again
    assert storescu(port, study).returncode == 0
    assert counts(tmp_path / "drop", 1) == [2]


def test_private_sop_class_and_transfer_syntaxes(tmp_path: Path, nodes: list[DicomNode]) -> None:
    routes = [{"match": {"SOPClassUID": "1.3.12.2.1107.5.9.1"}, "drop": "mrs"},
              {"drop": "drop"}]  # fmt: skip
    node = make_node(tmp_path, routes, drops=("drop", "mrs"))
    port = run(node, nodes)
    spectro = spectroscopy(tmp_path / "in")
    assert storescu_private(port, [spectro], tmp_path).returncode == 0
    (name,) = wait_for(lambda: datasets(tmp_path / "mrs"), what="the spectroscopy dataset")
    (out,) = dicom_files(tmp_path / "mrs" / name)
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.3.12.2.1107.5.9.1"
    assert len(ds[0x7FE1, 0x1010].value) == 8192  # the spectroscopy data (CSA non-image) is kept
    assert (0x0011, 0x1001) not in ds  # other private elements are removed
    # storescu proposes uncompressed syntaxes unless told which compressed one to offer
    variants = {"MR_small.dcm": [], "MR_small_bigendian.dcm": [], "MR_small_implicit.dcm": [],
                "MR_small_RLE.dcm": ["-xr"], "MR_small_jp2klossless.dcm": ["-xv"], "CT_small.dcm": []}  # fmt: skip
    for v, options in variants.items():  # one association each, in the file's own transfer syntax
        done = storescu(port, [pydicom_file(v)], extra=options)
        assert done.returncode == 0 and "error" not in done.stderr.lower(), (v, done.stderr)
    snap = node.snapshot()["counters"]
    assert snap["objects"] + snap["duplicates"] == 1 + len(variants) and snap["refusals"] == 0


@pytest.mark.parametrize(("policy", "state", "wave"), [("new", "pending", 1), ("ignore", "handed", 0)])
def test_object_arriving_during_the_hand_over_is_late(tmp_path: Path, policy: str, state: str, wave: int) -> None:
    """The hand-over read the study's objects; one indexed after that is not lost: it is late."""
    node = make_node(tmp_path)
    index = node.index
    for sop in ("1.1", "1.2", "1.3"):
        index.add(sop, "9.9", "9.9.1", f"/spool/{sop}.dcm", 10, {}, policy)
    taken = {o.sop_uid for o in index.objects("9.9")[:2]}  # "1.3" arrived while the dataset was built
    assert index.finish("9.9", taken, policy, "1 dataset(s)") == 1
    (study,) = index.studies()
    assert (study.state, study.wave, study.late) == (state, wave, 1)
    if policy == "new":
        assert [o.sop_uid for o in index.objects("9.9", 1)] == ["1.3"]
    else:
        assert [o.sop_uid for o in index.objects("9.9")] == ["1.1", "1.2"]
    node.index.close()
