"""Helpers for the DICOM tests: pydicom's own test files, a synthesised spectroscopy object,
real senders (dcmtk ``storescu``/``echoscu``), and a DICOM node on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from agent.dicom.config import parse_dicom
from agent.dicom.node import DicomNode
from agent.journal import Journal

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: one patient (Doe^Peter, 98890234), 3 MR studies, 7 series, 17 instances
PATIENT = TEST_FILES / "dicomdirtests" / "98892003"
PATIENT_FILES = sorted(p for p in PATIENT.rglob("*") if p.is_file())
PATIENT_NAME, PATIENT_ID = b"Doe^Peter", b"98890234"
#: objects per study of PATIENT (by number of objects: each study is recognisable by its size)
STUDY_SIZES = [2, 4, 11]
CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"

#: skipped without dcmtk, except in CI (.ci/run installs it), where a missing sender must fail
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None and os.environ.get("CI") != "true",
                                 reason="dcmtk (storescu) not installed")  # fmt: skip


def pydicom_file(name: str) -> Path:
    return Path(str(get_testdata_file(name)))


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def by_study(files: Iterable[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for f in files:
        out.setdefault(study_of(f), []).append(f)
    return dict(sorted(out.items(), key=lambda kv: len(kv[1])))


def spectroscopy(folder: Path, *, leak: bool = False, name: str = "Spectro^Samuel",
                 patient_id: str = "SPX771234", birth: str = "19710203") -> Path:  # fmt: skip
    """A Siemens CSA Non-Image Storage (private SOP class) MR spectroscopy object.

    The CSA series header (0029,1020) is what dcm2niix and spectroscopy tools read; with
    ``leak`` the patient's name is planted in it, as a badly configured scanner might.
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CSA_NON_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CSA_NON_IMAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 5, 1
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_id, birth
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "ACC4455667", "20261201", "101500"
    ds.SeriesDescription = ds.ProtocolName = "svs_se_30 PRESS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SPECTROSCOPY", "NONE"]
    series_header = b"SV10\x04\x03\x02\x01" + b"MrPhoenixProtocol sSpecPara.lVectorSize = 1024\x00" * 4
    if leak:
        series_header += b"tPatientName = \"" + name.encode() + b"\"\x00"
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", b"SV10\x04\x03\x02\x01" + b"\x00" * 64)
    ds.add_new(0x00291020, "OB", series_header + b"\x00" * (len(series_header) % 2))
    ds.add_new(0x00110010, "LO", "ACME RESEARCH")
    ds.add_new(0x00111001, "LO", "operator notes: call the patient back")
    ds.add_new(0x7FE10010, "LO", "SIEMENS CSA NON-IMAGE")
    fid = b"".join(struct.pack("<ff", 1000.0 / (i + 1), -500.0 / (i + 1)) for i in range(1024))
    ds.add_new(0x7FE11010, "OB", fid)
    path = folder / f"spectro{'-leak' if leak else ''}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def storescu(port: int, files: Sequence[Path], *, aet: str = "SCANNER1", aec: str = "VIPAGENT",
             timeout: float = 60, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """dcmtk storescu: every file in ONE association, proposing only what the files need."""
    argv = ["storescu", "-R", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


#: a dcmtk storescu profile for the private spectroscopy SOP classes (storescu refuses
#: to send a SOP class it does not know unless a configuration file proposes it)
PRIVATE_PROFILE = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[Private]
PresentationContext1 = 1.3.12.2.1107.5.9.1\\Uncompressed
PresentationContext2 = 1.3.46.670589.11.0.0.12.1\\Uncompressed

[[Profiles]]
[Private]
PresentationContexts = Private
"""


def storescu_private(port: int, files: Sequence[Path], folder: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """storescu proposing the private SOP classes (a profile written in ``folder``)."""
    cfg = folder / "storescu-private.cfg"
    cfg.write_text(PRIVATE_PROFILE, encoding="utf-8")
    argv = ["storescu", "-xf", str(cfg), "Private", "-aet", kw.get("aet", "SCANNER1"), "-aec", "VIPAGENT",
            "127.0.0.1", str(port), *map(str, files)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def echoscu(port: int, *, aet: str = "SCANNER1", aec: str = "VIPAGENT") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def make_node(tmp_path: Path, routes: list[dict[str, Any]] | None = None, *, drops: Sequence[str] = ("drop",),
              **settings: Any) -> DicomNode:  # fmt: skip
    """A DicomNode on a free loopback port, routes into ``tmp_path/<drop>`` (not started)."""
    folders = []
    for name in drops:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        folders.append((tmp_path / name).resolve())
    raw: dict[str, Any] = {"listen": "127.0.0.1:0", "quiet": 1, "disk_low": 0, **settings}
    raw["routes"] = routes if routes is not None else [{"drop": str(folders[0])}]
    config = parse_dicom(raw, source="test.yaml", base=tmp_path, drops=folders)
    assert config is not None
    journal = Journal.in_state_dir(tmp_path / "state")
    return DicomNode(config, tmp_path / "state", journal.path, tick=0.1)


@pytest.fixture(name="nodes")
def nodes_fixture() -> Iterator[list[DicomNode]]:
    """Fixture ``nodes``: the DicomNodes a test started (see :func:`run`), stopped at its end.

    A test module imports ``nodes_fixture`` so that pytest finds the fixture there.
    """
    started: list[DicomNode] = []
    yield started
    for node in started:
        node.stop()


def run(node: DicomNode, nodes: list[DicomNode]) -> int:
    """Start ``node`` (stopped by the ``nodes`` fixture at the end); its port."""
    nodes.append(node)
    return node.start()


def datasets(drop: Path) -> dict[str, list[Path]]:
    """Dataset folders in ``drop`` (hidden staging folders are not datasets) -> their files."""
    return {d.name: sorted(f for f in d.iterdir() if f.is_file())
            for d in sorted(drop.iterdir()) if d.is_dir() and not d.name.startswith(".")}  # fmt: skip


def dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


ORTHANC = Path("/usr/sbin/Orthanc")


def orthanc_push(work: Path, files: Sequence[Path]) -> dict[str, Any]:
    """Orthanc (Debian) pushes ``files`` to a DicomNode over DICOM; what arrived.

    Run inside a private network namespace (see test_dicom_orthanc.py): Orthanc's HTTP
    server cannot be bound to loopback only, so nothing outside the namespace can reach it.
    Files are uploaded through Orthanc's REST API, then sent with ``/modalities/agent/store``
    (Orthanc's C-STORE SCU, one association for the whole list).
    """
    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    node = make_node(work, quiet=1)
    port = node.start()
    http = free()
    config = {
        "Name": "vip-agent-test", "StorageDirectory": str(work / "orthanc-db"),
        "IndexDirectory": str(work / "orthanc-db"), "HttpPort": http, "DicomServerEnabled": False,
        "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [], "DicomModalities": {"agent": ["VIPAGENT", "127.0.0.1", port]},
    }  # fmt: skip
    (work / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    log = (work / "orthanc.log").open("w")
    proc = subprocess.Popen([str(ORTHANC), str(work / "orthanc.json")], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + "/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("Orthanc did not start: " + (work / "orthanc.log").read_text()[-2000:])
            time.sleep(0.1)
        ids = [requests.post(base + "/instances", data=f.read_bytes(), timeout=30).json()["ID"] for f in files]
        sent = requests.post(base + "/modalities/agent/store", json={"Resources": ids, "Synchronous": True},
                             timeout=120)  # fmt: skip
        deadline = time.monotonic() + 30
        while {s.state for s in node.index.studies()} - {"handed"} and time.monotonic() < deadline:
            time.sleep(0.1)
        drops = datasets(work / "drop")
        return {
            "store_status": sent.status_code,
            "datasets": sorted(len(dicom_files(work / "drop" / name)) for name in drops),
            "counters": node.snapshot()["counters"],
            "sop_classes": sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)
                                   for fs in drops.values() for f in fs if f.suffix == ".dcm"}),
        }  # fmt: skip
    finally:
        node.stop()
        proc.terminate()
        proc.wait(20)
        log.close()


if __name__ == "__main__":  # python tests/dicomhelpers.py orthanc WORK FILE... (in a namespace)
    print(json.dumps(orthanc_push(Path(sys.argv[2]), [Path(a) for a in sys.argv[3:]])))
