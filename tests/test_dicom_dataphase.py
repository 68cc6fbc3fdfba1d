"""The receiver's own data phase (agent/dicom/dataphase.py) against pynetdicom's: real dcmtk
senders, the spooled files compared byte for byte between the two, fragmented PDUs,
C-ECHO, and a stop while an association is open."""

from __future__ import annotations

import struct
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from agenthelpers import wait_for
from dicomhelpers import (  # noqa: F401 (nodes_fixture: the fixture `nodes`)
    PATIENT_FILES,
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
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from agent.dicom import dataphase, quickscan
from agent.dicom.node import DicomNode
from agent.dicom.spool import HEADER_TAGS, header

pytestmark = needs_dcmtk


def spooled(node: DicomNode) -> dict[str, bytes]:
    """SOPInstanceUID -> the spooled file's bytes."""
    return {p.stem: p.read_bytes() for p in node.spool.files()}


def start(tmp: Path, nodes: list[DicomNode], fast: bool) -> tuple[DicomNode, int]:
    node = make_node(tmp, quiet=60)
    node.receiver.fast = fast
    return node, run(node, nodes)


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_pynetdicoms(ts: str) -> None:
    sop_class, sop = "1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1"  # odd length: padded
    ref = encode_file_meta(create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop),
                                            transfer_syntax=UID(ts)))  # fmt: skip
    assert dataphase.file_meta(sop_class, sop, ts) == b"\x00" * 128 + b"DICM" + ref


def test_same_files_as_pynetdicom_fragmented_or_not(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """Every object spooled by the data phase is byte for byte what pynetdicom's handler
    wrote, whether the sender fits each object in one PDU or cuts it in 4 KiB fragments."""
    files = [*PATIENT_FILES[:6], pydicom_file("CT_small.dcm"), pydicom_file("MR_small_bigendian.dcm")]
    spectro = spectroscopy(tmp_path / "spectro")
    out: dict[str, dict[str, bytes]] = {}
    for name, fast, extra in (("pynetdicom", False, []), ("ours", True, []),
                              ("ours-4k", True, ["--max-send-pdu", "4096"])):  # fmt: skip
        node, port = start(tmp_path / name, nodes, fast)
        done = storescu(port, files, extra=extra)
        assert done.returncode == 0, done.stderr
        assert storescu_private(port, [spectro], tmp_path / name).returncode == 0
        out[name] = spooled(node)
        assert len(out[name]) == len(files) + 1
        assert node.snapshot()["counters"]["objects"] == len(files) + 1
    assert out["ours"] == out["pynetdicom"]
    assert out["ours-4k"] == out["pynetdicom"]
    for sop, data in out["ours"].items():  # and they are DICOM files pydicom reads whole
        ds = pydicom.dcmread(BytesIO(data))
        assert str(ds.SOPInstanceUID) == sop == str(ds.file_meta.MediaStorageSOPInstanceUID)


def test_headers_are_indexed_and_echo_answers(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node, port = start(tmp_path, nodes, True)
    assert echoscu(port).returncode == 0
    assert node.snapshot()["counters"]["echoes"] == 1
    assert storescu(port, PATIENT_FILES[:3]).returncode == 0
    study = str(pydicom.dcmread(PATIENT_FILES[0]).StudyInstanceUID)
    rows = node.index.objects(study)
    assert rows, "the study is indexed"
    first = pydicom.dcmread(PATIENT_FILES[0])
    row = next(r for r in rows if r.sop_uid == str(first.SOPInstanceUID))
    assert row.info["Modality"] == first.Modality
    assert row.info["SOPClassUID"] == str(first.SOPClassUID)
    assert row.info["CallingAE"] == "SCANNER1"


def test_stop_with_an_association_open_returns_and_ends_it(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node, port = start(tmp_path, nodes, True)
    # storescu's --repeat keeps one association busy; stop() must not wait for it
    argv = ["storescu", "-aet", "SCANNER1", "-aec", "VIPAGENT", "--repeat", "100000", "127.0.0.1", str(port),
            str(PATIENT_FILES[0])]  # fmt: skip
    sender = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: node.receiver.open_associations() == 1, 15, what="the association")
        began = time.monotonic()
        stopper = threading.Thread(target=node.stop)
        stopper.start()
        stopper.join(15)
        assert not stopper.is_alive(), "stop() hangs on an open association"
        assert time.monotonic() - began < 10  # the open association ends within STOP_POLL
        assert sender.wait(15) != 0  # the sender saw its association end early
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    nodes.remove(node)


def test_spare_temporary_files_are_made_ahead_and_never_left(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node, port = start(tmp_path, nodes, True)
    assert storescu(port, PATIENT_FILES[:4]).returncode == 0
    wait_for(lambda: len(list(node.spool.spare.iterdir())) >= 1, 10, what="spares made ahead")
    assert all(p.stat().st_size == 0 for p in node.spool.spare.iterdir())  # spares are empty
    node.stop()
    nodes.remove(node)
    assert list(node.spool.spare.iterdir()) == []
    # what a crash leaves (a half-written temporary file, empty spares) goes at the next start
    (node.spool.spare / "x.part").write_bytes(b"half an object")
    (node.spool.spare / "y.part").write_bytes(b"")
    again = make_node(tmp_path, quiet=60)
    nodes.append(again)
    assert again.spool.clean_tmp() == 1
    assert list(again.spool.spare.iterdir()) == []
    assert len(list(again.spool.files())) == 4


def test_pynetdicom_sender_small_pdus_release_and_abort(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """Another sender's framing: pynetdicom cuts commands and datasets into its own P-DATA
    PDUs (4 KiB here); C-ECHO, C-STORE, A-RELEASE, then an association aborted by the sender."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    node, port = start(tmp_path, nodes, True)
    ae = AE(ae_title="SCANNER1")
    for context in (Verification, MRImageStorage, CTImageStorage):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="VIPAGENT", max_pdu=4096)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    files = [PATIENT_FILES[0], pydicom_file("CT_small.dcm")]
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    assoc.release()
    assert assoc.is_released
    stored = {str(pydicom.dcmread(p).SOPInstanceUID) for p in node.spool.files()}
    assert stored == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    aborted = ae.associate("127.0.0.1", port, ae_title="VIPAGENT")
    assert aborted.is_established
    aborted.abort()
    wait_for(lambda: node.receiver.open_associations() == 0, 10, what="the aborted association closed")
    assert node.snapshot()["counters"]["objects"] == 2


def test_quick_scan_agrees_with_pydicom_on_every_test_file() -> None:
    """The UIDs the spool needs before answering and the routing values the index keeps, read
    without pydicom: on every file pydicom ships (sequences of defined and undefined length,
    private blocks, character sets, odd encodings) the scan gives pydicom's values or None
    (then pydicom decodes), never different ones."""
    scanned = declined = 0
    # the files installed with pydicom (get_testdata_files would also try to download more)
    for name in sorted(Path(pydicom.data.__file__).with_name("test_files").rglob("*.dcm")):
        raw = name.read_bytes()
        try:
            ds = pydicom.dcmread(name)
            expected = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # files without the three UIDs or a file meta, or unreadable ones
            continue
        if raw[128:132] != b"DICM":
            continue
        # the dataset as stored is what a sender puts in P-DATA
        meta_length = struct.unpack_from("<I", raw, 140)[0]
        dataset = raw[144 + meta_length :]
        got = quickscan.scan_uids(dataset, ts)
        info = quickscan.quick_header(dataset, ts)
        walk = quickscan.Scanned(dataset, ts)  # the receiver's one walk for both
        assert (walk.uids(), walk.header()) == (got, info)
        if got is None or info is None:
            declined += 1
        else:
            assert got == expected, name
            assert info == header(dataphase.read_header(dataset, ts, HEADER_TAGS)), name
            scanned += 1
    assert scanned > 40 and declined <= 12, (scanned, declined)
    # a sequence of undefined length and a truncated dataset
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    seq = pydicom.Dataset()
    seq.CodeValue = "1.2.3"
    ds.ProcedureCodeSequence = [seq, seq]
    for ts in (UID("1.2.840.10008.1.2.1"), UID("1.2.840.10008.1.2")):
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = ts.is_implicit_VR, True
        pydicom.filewriter.write_dataset(fp, ds)
        data = fp.getvalue()
        assert quickscan.scan_uids(data, str(ts)) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert quickscan.scan_uids(data[:200], str(ts)) is None
    assert quickscan.scan_uids(b"garbage!" * 10, "1.2.840.10008.1.2.1") is None
    assert quickscan.scan_uids(data, "1.2.840.10008.1.2.2") is None  # big endian: pydicom's job
