"""De-identification, the leak scan, routing, stronger completeness rules, conversion and
`vip-agent dicom explain|status`, with dcmtk storescu as the sender and real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from agenthelpers import agent_env, wait_for
from dicomhelpers import (  # noqa: F401 (nodes_fixture: the fixture `nodes`)
    PATIENT,
    PATIENT_FILES,
    PATIENT_ID,
    PATIENT_NAME,
    by_study,
    datasets,
    dicom_files,
    make_node,
    needs_dcmtk,
    nodes_fixture,
    pydicom_file,
    run,
    spectroscopy,
    storescu,
    storescu_private,
)
from pydicom.uid import generate_uid

from agent.config import parse_config
from agent.dicom.node import DicomNode
from agent.errors import ConfigError

pytestmark = needs_dcmtk


def test_basic_profile_consistent_per_study(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, late="new")
    port = run(node, nodes)
    big = list(by_study(PATIENT_FILES).values())[-1]
    assert storescu(port, big[:-1]).returncode == 0
    (first,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the first dataset")
    assert storescu(port, big[-1:]).returncode == 0  # late: a new dataset, same pseudonyms
    wait_for(lambda: len(datasets(tmp_path / "drop")) == 2, what="the late dataset")
    original = pydicom.dcmread(big[0])
    seen = {"PatientID": set(), "StudyInstanceUID": set(), "StudyDate": set(), "PatientName": set()}
    sops = set()
    for name, files in datasets(tmp_path / "drop").items():
        assert "Doe" not in name and "98890234" not in name
        for f in files:
            data = f.read_bytes()
            assert PATIENT_NAME not in data and PATIENT_ID not in data, f
            if f.suffix != ".dcm":
                continue
            ds = pydicom.dcmread(f)
            assert ds.PatientIdentityRemoved == "YES"
            sops.add(ds.SOPInstanceUID)
            for key in seen:
                seen[key].add(str(ds.get(key)))
    assert all(len(v) == 1 for v in seen.values()), seen  # one pseudonym, one shift, one study UID
    assert seen["StudyInstanceUID"] != {original.StudyInstanceUID}
    assert seen["StudyDate"] != {original.StudyDate}
    assert len(sops) == 11 and not sops & {pydicom.dcmread(f).SOPInstanceUID for f in big}
    (study,) = node.index.studies()
    assert study.pseudonym in first and len(study.secret) == 32  # the key stays in the state folder
    audit = (tmp_path / "state" / "dicom" / "audit.log").read_text()
    lines = [json.loads(line) for line in audit.splitlines()]
    assert [a["event"] for a in lines] == ["handed", "handed"]
    assert all(len(f["sha256"]) == 64 for a in lines for f in a["files"])
    assert "Doe" not in audit and "98890234" not in audit


def test_phi_leak_in_a_private_tag_refuses_the_dataset(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path)
    port = run(node, nodes)
    clean = spectroscopy(tmp_path / "in")
    leaky = spectroscopy(tmp_path / "in", leak=True, name="Planted^Patricia", patient_id="PLT500600")
    assert storescu_private(port, [clean], tmp_path).returncode == 0
    assert storescu_private(port, [leaky], tmp_path).returncode == 0
    wait_for(lambda: {s.state for s in node.index.studies()} == {"handed", "refused"}, what="both decided")
    (handed,) = datasets(tmp_path / "drop").values()
    assert b"Samuel" not in handed[0].read_bytes()
    refused = next(s for s in node.index.studies() if s.state == "refused")
    assert "identifying values remain" in (refused.message or "")
    assert [p.name for p in (tmp_path / "drop").iterdir() if p.name.startswith(".")] == []
    audit = (tmp_path / "state" / "dicom" / "audit.log").read_text()
    assert '"event": "refused"' in audit and "Patricia" not in audit
    assert len(list(node.spool.files())) == 2  # the refused study stays in the spool


def _secondary_capture(folder: Path, like: Path) -> Path:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ref = pydicom.dcmread(like, stop_before_pixels=True)
    ds.StudyInstanceUID, ds.PatientName, ds.PatientID = ref.StudyInstanceUID, ref.PatientName, ref.PatientID
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = generate_uid(), 99, "OT"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "sc.dcm", enforce_file_format=True)
    return folder / "sc.dcm"


@pytest.mark.parametrize("allowed", [False, True])
def test_secondary_capture_dropped_unless_allowed(tmp_path: Path, nodes: list[DicomNode], allowed: bool) -> None:
    node = make_node(tmp_path, [{"drop": "drop", "allow_secondary_capture": allowed}])
    port = run(node, nodes)
    small = list(by_study(PATIENT_FILES).values())[0]
    sc = _secondary_capture(tmp_path / "in", small[0])
    assert storescu(port, [*small, sc]).returncode == 0
    (name,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset")
    summary = json.loads((tmp_path / "drop" / name / "DICOM.json").read_text())
    assert summary["dropped_secondary_captures"] == (0 if allowed else 1)
    assert len(dicom_files(tmp_path / "drop" / name)) == (3 if allowed else 2)


def test_deidentify_none_sends_the_originals(tmp_path: Path, nodes: list[DicomNode]) -> None:
    port = run(make_node(tmp_path, [{"drop": "drop", "deidentify": "none"}]), nodes)
    small = list(by_study(PATIENT_FILES).values())[0]
    assert storescu(port, small).returncode == 0
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset").values()
    assert any(PATIENT_NAME in f.read_bytes() for f in files)
    assert "Doe" not in next(iter(datasets(tmp_path / "drop")))  # the name stays pseudonymous


def test_routes_per_series_and_unrouted(tmp_path: Path, nodes: list[DicomNode]) -> None:
    routes = [
        {"match": {"Modality": "MR", "SeriesDescription": "(?i)localizer|pilot"}, "drop": "scouts", "per": "series"},
        {"match": {"SeriesDescription": "(?i)angio", "CallingAE": "SCANNER1"}, "drop": "angio"},
    ]  # fmt: skip
    node = make_node(tmp_path, routes, drops=("scouts", "angio"))
    port = run(node, nodes)
    assert storescu(port, PATIENT_FILES).returncode == 0
    wait_for(lambda: len(datasets(tmp_path / "scouts")) == 6 and len(datasets(tmp_path / "angio")) == 1,
             what="6 series datasets and 1 study dataset")  # fmt: skip
    assert sorted(len(f) - 1 for f in datasets(tmp_path / "scouts").values()) == [1, 1, 1, 1, 3, 3]
    assert [len(f) - 1 for f in datasets(tmp_path / "angio").values()] == [7]
    assert {s.state for s in node.index.studies()} == {"handed"}


def test_unrouted_study_is_kept_and_reported(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, [{"match": {"CallingAE": "SCANNER1"}, "drop": "drop"}])
    port = run(node, nodes)
    small = list(by_study(PATIENT_FILES).values())[0]
    assert storescu(port, small, aet="UNKNOWNAE").returncode == 0
    wait_for(lambda: [s.state for s in node.index.studies()] == ["unrouted"], what="unrouted")
    assert datasets(tmp_path / "drop") == {} and len(list(node.spool.files())) == 2
    out = subprocess.run([sys.executable, "-m", "agent", "dicom", "status", "--state", str(tmp_path / "state")],
                         capture_output=True, text=True, env=agent_env("unused"), timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "unrouted" in out.stdout and "2 object(s)" in out.stdout and "no route takes" in out.stdout
    assert "Doe" not in out.stdout
    # the administrator adds a route and restarts the agent: the kept study is looked at again
    nodes.remove(node)
    node.stop()
    run(make_node(tmp_path, [{"match": {"CallingAE": ["SCANNER1", "UNKNOWNAE"]}, "drop": "drop"}]), nodes)
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the study handed over").values()
    assert len(dicom_files(files[0].parent)) == 2


def test_required_series_and_announced_counts_hold_the_study(tmp_path: Path, nodes: list[DicomNode]) -> None:
    routes = [{"drop": "drop", "require_series": ["(?i)angio"]}]
    node = make_node(tmp_path, routes, quiet=0.5, max_wait=600)
    port = run(node, nodes)
    big = list(by_study(PATIENT_FILES).values())[-1]
    scouts = [f for f in big if "MR700" not in str(f)]
    assert storescu(port, scouts).returncode == 0
    wait_for(lambda: "no series matching" in " ".join(node._why.values()), what="waiting for the angio")
    assert datasets(tmp_path / "drop") == {}
    # an announced count: the series says 3 instances, 2 arrive
    (tmp_path / "in").mkdir()
    announced = []
    for f in [f for f in big if "MR700" in str(f)][:2]:
        ds = pydicom.dcmread(f)
        ds.NumberOfSeriesRelatedInstances = 3
        ds.save_as(tmp_path / "in" / f.name)
        announced.append(tmp_path / "in" / f.name)
    assert storescu(port, announced).returncode == 0
    wait_for(lambda: "2 of 3 objects announced" in " ".join(node._why.values()), what="waiting for the count")
    assert datasets(tmp_path / "drop") == {}
    third = pydicom.dcmread([f for f in big if "MR700" in str(f)][2])
    third.NumberOfSeriesRelatedInstances = 3
    third.save_as(tmp_path / "in" / "third.dcm")
    assert storescu(port, [tmp_path / "in" / "third.dcm"]).returncode == 0
    (files,) = wait_for(lambda: datasets(tmp_path / "drop"), what="the dataset").values()
    assert len(dicom_files(files[0].parent)) == len(scouts) + 3


def test_convert_nifti(tmp_path: Path, nodes: list[DicomNode]) -> None:
    node = make_node(tmp_path, [{"drop": "drop", "convert": "nifti"}])
    port = run(node, nodes)
    angio = [f for f in PATIENT_FILES if "MR700" in str(f)]
    assert storescu(port, angio).returncode == 0
    # the dataset is renamed into view before the study is marked handed: wait for the mark
    wait_for(lambda: node.index.studies()[0].state in ("handed", "refused"), what="decided")
    (study,) = node.index.studies()
    assert study.state == "handed", study.message
    (files,) = datasets(tmp_path / "drop").values()
    names = [f.name for f in files]
    assert "DICOM.json" in names and any(n.endswith(".nii.gz") for n in names)
    assert all(n.endswith((".nii.gz", ".json", ".bval", ".bvec")) for n in names), names
    for f in files:
        if f.suffix == ".json":
            text = f.read_text()
            assert "Doe" not in text and "98890234" not in text


def write_agent_yaml(tmp_path: Path, dicom: dict) -> Path:
    (tmp_path / "drop").mkdir(exist_ok=True)
    cfg = {"drops": [{"path": "drop", "output": "out", "server": "http://127.0.0.1:9"}],
           "state": "state", "dicom": dicom}  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_explain_names_the_rule_of_each_series(tmp_path: Path) -> None:
    cfg = write_agent_yaml(tmp_path, {"listen": 0, "routes": [
        {"match": {"SeriesDescription": "(?i)angio"}, "drop": "drop", "per": "series"},
        {"match": {"Modality": "CT"}, "drop": "drop"},
    ]})  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "agent", "dicom", "explain", str(PATIENT), "--config", str(cfg)],
                         capture_output=True, text=True, env=agent_env("unused"), timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("study ") == 3 and "-> routes[0]" in out.stdout
    assert "no route: kept in the spool" in out.stdout and "Modality 'MR' is not CT" in out.stdout


@pytest.mark.parametrize(("dicom", "problem"), [
    ({"listen": "0.0.0.0:11112"}, "dicom.allow: is required when listen is not loopback"),
    ({"routes": [{"drop": "elsewhere"}]}, "is not a drop folder of this agent.yaml"),
    ({"routes": [{"drop": "drop", "deidentify": "no"}]}, "must be one of basic, none"),
    ({"late": "sometimes"}, "dicom.late: must be one of new, rerun, ignore"),
    ({"routes": [{"drop": "drop", "match": {"Modallity": "MR"}}]}, "did you mean 'Modality'"),
])  # fmt: skip
def test_config_errors(tmp_path: Path, dicom: dict, problem: str) -> None:
    (tmp_path / "drop").mkdir()
    data = {"drops": [{"path": "drop", "output": "out"}], "dicom": dicom}
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="agent.yaml", base=tmp_path)
    assert problem in str(err.value)


def test_config_defaults(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    data = {"drops": [{"path": "drop", "output": "out"}],
            "dicom": {"listen": "0.0.0.0:104", "allow": [{"ae": "SCANNER1", "host": "10.0.0.5"}],
                      "quiet": "90s", "disk_low": "5GB", "routes": [{"drop": "drop"}]}}  # fmt: skip
    config = parse_config(data, source="agent.yaml", base=tmp_path).dicom
    assert config is not None
    assert (config.host, config.port, config.quiet, config.disk_low) == ("0.0.0.0", 104, 90.0, 5_000_000_000)
    assert config.routes[0].deidentify == "basic" and config.routes[0].convert == "none"
    assert "1.3.12.2.1107.5.9.1" in config.private_sop_classes


def test_prepared_ahead_equals_de_identified_at_hand_over(tmp_path: Path, nodes: list[DicomNode]) -> None:
    """The copies de-identified while the study arrives are byte for byte the ones the hand-over
    would make itself (same study secret), and the cache is emptied once handed over."""
    big = list(by_study(PATIENT_FILES).values())[-1]
    outputs: dict[bool, dict[str, bytes]] = {}
    seed: tuple[str, str, str] | None = None
    for ahead in (True, False):
        base = tmp_path / ("ahead" if ahead else "at-hand-over")
        node = make_node(base, quiet=1)
        if not ahead:
            node.preparer = None
        port = run(node, nodes)
        if seed is not None:  # the first run's study secret: same pseudonyms, date shift, UIDs
            with node.index._write() as db:
                db.execute("INSERT INTO dicom_studies (study_uid, pseudonym, secret, first, last)"
                           " VALUES (?, ?, ?, 0, 0)", seed)  # fmt: skip
        assert storescu(port, big).returncode == 0
        (files,) = wait_for(lambda b=base: datasets(b / "drop"), what="the dataset").values()
        outputs[ahead] = {f.name: f.read_bytes() for f in files if f.suffix == ".dcm"}
        (study,) = node.index.studies()
        seed = (study.study_uid, study.pseudonym, study.secret)
        if node.preparer is not None:
            assert node.preparer.hits == 11  # every object came from the cache
            # emptied right after the hand-over, which the dataset's atomic move comes first in
            wait_for(lambda n=node: not list(n.preparer.root.rglob("*.dcm")),
                     what="the prepared copies removed after the hand-over")  # fmt: skip
    assert len(outputs[True]) == 11 and outputs[True] == outputs[False]
