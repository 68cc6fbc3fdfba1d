"""De-identification that fails closed, and the scan that proves it.

``deidentify: basic`` follows the PS3.15 Basic Application Level Confidentiality
Profile with dicognito (a maintained, pydicom-based implementation: names, IDs,
addresses and equipment replaced by pseudonyms, every date and time shifted by one
offset, every UID replaced by a new one; seeded with the study's secret, so every
object of a study, and a late object handed over days later, gets the same
pseudonyms and the same shift), plus what dicognito leaves:

- private elements are removed, except the Siemens blocks the pipelines need (CSA
  image/series headers: b-vectors, slice timing; CSA non-image: spectroscopy data;
  MR header: b-values) — the final scan is what protects those;
- free-text comments and a list of PS3.15 Table E.1-1 "remove" elements go;
- secondary captures (and anything flagged with burned-in annotation) are dropped
  unless the route allows them.

:func:`scan` then reads every outgoing file for the original identifying values
(patient name and its parts, patient ID, birth date, accession number). Any hit
refuses the whole dataset.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: SOP classes that are screenshots or scanned documents (burned-in text)
SECONDARY_CAPTURE = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4", "1.2.840.10008.5.1.4.1.1.104.1",
})  # fmt: skip
#: private blocks kept by ``basic`` (creator names as written by the scanner)
KEPT_PRIVATE_CREATORS = frozenset({"SIEMENS CSA HEADER", "SIEMENS CSA NON-IMAGE", "SIEMENS MR HEADER"})
#: PS3.15 Table E.1-1 elements removed outright (dicognito replaces the others)
REMOVED = (
    "PatientComments", "AdditionalPatientHistory", "ImageComments", "StudyComments",
    "RequestedProcedureComments", "InterpretationText", "PatientAge", "PatientSize",
    "PatientWeight", "EthnicGroup", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "MedicalAlerts", "Allergies",
    "PregnancyStatus", "SmokingStatus", "PatientState", "RequestAttributesSequence",
    "ContentSequence", "DeviceSerialNumber", "PerformedProcedureStepDescription",
    "AdmittingDiagnosesDescription", "DerivationDescription", "IssuerOfPatientID",
    "PatientBirthTime", "CountryOfResidence", "RegionOfResidence", "MilitaryRank",
    "ReasonForStudy", "RequestingPhysician", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "OperatorsName", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "FrameComments",
)  # fmt: skip
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
#: values shorter than this are matched as words, not as bytes
SHORT = 6
_WORD_EDGE = "0-9A-Za-z."
#: where a short value is looked for (numbers, dates and UIDs hold short digit runs by chance)
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})


class Leak(Exception):
    """An outgoing file still holds an identifying value."""


@dataclass(frozen=True)
class Identity:
    """The original identifying values of a study (never leave this process)."""

    exact: tuple[bytes, ...]  # whole values: searched in every byte of every file
    parts: tuple[bytes, ...]  # lower-cased name parts: searched outside pixel data
    #: values too short to search as bytes (they occur by chance in UIDs and pixels, e.g.
    #: accession number "134"): searched as whole words of every text value instead
    short: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.exact or self.parts or self.short)

    def covers(self, other: Identity) -> bool:
        """A scan for these values also looked for every value of ``other``."""
        return set(other.exact) <= set(self.exact) and set(other.parts) <= set(self.parts) \
            and set(other.short) <= set(self.short)


def identifying_copy(ds: Dataset) -> Dataset:
    """Only the identifying values of ``ds`` (kept to scan the outgoing files for them)."""
    out = Dataset()
    for key in IDENTIFYING:
        if key in ds:
            setattr(out, key, ds.get(key))
    return out


def identity_values(ds: Dataset) -> dict[str, str]:
    """The identifying values of ``ds`` as text (what :func:`identity_of` reads; JSON-ready
    for the de-identification worker's answer)."""
    return {key: str(ds.get(key)) for key in IDENTIFYING if ds.get(key) not in (None, "")}


def identity_of(datasets: Iterable[Dataset | Mapping[str, str]]) -> Identity:
    exact: set[bytes] = set()
    parts: set[bytes] = set()
    short: set[str] = set()
    for ds in datasets:
        for key in IDENTIFYING:
            value = str(ds.get(key) or "").strip()
            if len(value) < 2:  # a single character cannot be searched for meaningfully
                continue
            if len(value) < SHORT:
                short.add(value)
                continue
            exact.add(value.encode("utf-8", "replace"))
            if key == "PatientName":
                words = [w for w in re.split(r"[\^=\s,]+", value) if len(w) >= 4]
                parts.update(w.lower().encode("utf-8", "replace") for w in words)
                parts.add(value.replace("^", " ").strip().lower().encode("utf-8", "replace"))
            if key == "PatientBirthDate" and len(value) == 8 and value.isdigit():
                exact.add(f"{value[:4]}-{value[4:6]}-{value[6:]}".encode())
    return Identity(tuple(sorted(exact)), tuple(sorted(parts)), tuple(sorted(short)))


def is_secondary_capture(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) in SECONDARY_CAPTURE or str(ds.get("BurnedInAnnotation", "")).upper() == "YES"


def _strip_private(ds: Dataset) -> None:
    """Remove private elements except the kept Siemens blocks (recursively)."""
    kept_blocks: set[tuple[int, int]] = set()
    for elem in list(ds):
        tag = elem.tag
        if tag.is_private and tag.element >> 8 == 0 and 0x10 <= tag.element <= 0xFF:
            if str(elem.value).strip() in KEPT_PRIVATE_CREATORS:
                kept_blocks.add((tag.group, tag.element))
    for elem in list(ds):
        tag = elem.tag
        if elem.VR == "SQ":
            for item in elem.value:
                _strip_private(item)
        if not tag.is_private:
            continue
        block = (tag.group, tag.element >> 8) if tag.element >= 0x1000 else (tag.group, tag.element)
        if block not in kept_blocks:
            del ds[tag]


def _remove(ds: Dataset) -> None:
    def visit(dataset: Dataset, elem: DataElement) -> None:
        if elem.keyword in REMOVED and elem.tag in dataset:
            del dataset[elem.tag]

    for key in REMOVED:
        if key in ds:
            del ds[key]
    ds.walk(visit)


class StudyDeidentifier:
    """The basic profile for one study, seeded by the study's secret (consistent pseudonyms)."""

    def __init__(self, secret: str, pseudonym: str) -> None:
        self.pseudonym = pseudonym
        self._anonymizer = Anonymizer(seed=secret)

    def apply(self, ds: Dataset) -> None:
        _strip_private(ds)
        _remove(ds)
        self._anonymizer.anonymize(ds)
        ds.PatientName = f"VIP^{self.pseudonym}"
        ds.PatientID = self.pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "PS3.15 Basic Profile (dicognito), Siemens CSA kept"
        if "PatientBirthDate" in ds:
            ds.PatientBirthDate = ""


def _dicom_regions(data: bytes) -> tuple[bytes, bytes, list[str]]:
    """(the bytes before the pixel data, the whole file, its text values) of a DICOM file."""
    fp = io.BytesIO(data)
    texts: list[str] = []

    def collect(_ds: Dataset, elem: DataElement) -> None:
        if elem.VR not in TEXT_VRS or elem.value is None:
            return
        values = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
        texts.extend(str(v) for v in values)

    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        head = data[: fp.tell()]
        ds.walk(collect)
        return head, data, texts
    except Exception:  # unreadable: scan it all, as text too (fails closed)
        return data, data, [data.decode("latin-1")]


def _json_texts(data: bytes) -> list[str]:
    """The strings (keys and values) of a JSON file; the whole text if it is not JSON."""
    text = data.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        return [text]
    out: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                out.append(str(k))
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)
        elif isinstance(node, str):
            out.append(node)

    visit(doc)
    return out


def _has_part(lowered: bytes, part: bytes) -> bool:
    """A name part as a word (``spectro`` is not in ``SPECTROSCOPY``; ``doe`` is in ``doe^john``)."""
    return re.search(b"(?<![a-z])" + re.escape(part) + b"(?![a-z])", lowered) is not None


def _has_word(texts: list[str], word: str) -> bool:
    pattern = re.compile(f"(?<![{_WORD_EDGE}]){re.escape(word)}(?![{_WORD_EDGE}])", re.IGNORECASE)
    return any(pattern.search(t) for t in texts)


def _nifti_regions(data: bytes) -> tuple[bytes, bytes]:
    vox_offset = 352
    if len(data) >= 352:
        try:
            vox_offset = int(memoryview(data)[108:112].cast("f")[0])
        except (TypeError, ValueError):
            vox_offset = 352
    return data[: max(352, vox_offset)], data


def scan(files: Iterable[Path], identity: Identity) -> list[str]:
    """Files (``name: what``) that still hold an identifying value; [] means clean."""
    hits: list[str] = []
    for path in files:
        hit = scan_data(path.name, path.read_bytes(), identity)
        if hit is not None:
            hits.append(hit)
    return hits


def scan_data(name: str, data: bytes, identity: Identity) -> str | None:
    """``name: what`` if the content of the file ``name`` holds an identifying value."""
    shown = name
    if name.endswith(".gz"):
        data = gzip.decompress(data)
        name = name[:-3]
    if name.endswith(".dcm"):
        head, whole, texts = _dicom_regions(data)
    elif name.endswith(".nii"):
        head, whole = _nifti_regions(data)
        texts = [head.decode("latin-1")]
    else:  # JSON, bval/bvec, text: every byte counts
        head, whole, texts = data, data, _json_texts(data)
    lowered = head.lower()
    found: list[bytes | str] = [v for v in identity.exact if v in whole]
    found += [p for p in identity.parts if _has_part(lowered, p)]
    found += [w for w in identity.short if _has_word(texts, w)]
    if found:
        return f"{shown}: {len(found)} identifying value(s)"
    return None


def audit_line(**fields: object) -> str:
    return json.dumps(fields, sort_keys=True) + "\n"
