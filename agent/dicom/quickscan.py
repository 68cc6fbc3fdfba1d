"""Reading a received dataset's few header values without pydicom.

Before it answers, the receiver needs three UIDs (where the object goes in the spool); after
it, the index needs a dozen routing values (:data:`agent.dicom.spool.HEADER_KEYS`). pydicom
decodes them in 0.15-0.3 ms per object; this walk over the encoded elements takes a tenth of
that, and the receiving rate is made of such fractions of a millisecond (docs/dicom.md,
"Speed"). It follows little-endian encodings (explicit and implicit VR), skips sequences of
defined and undefined length, and reads only plain text values in ASCII, Latin-1 or UTF-8;
anything else -- big endian, deflate, another character set, an element it cannot follow --
gives None, and the caller decodes with pydicom as before. Tests hold it to pydicom's
answers on every file pydicom ships.
"""

from __future__ import annotations

import struct
from typing import Any

_STUDY_UID, _SERIES_UID, _SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
_CHARSET = 0x00080005
#: explicit VRs with a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
#: the other VRs of PS3.5 (2-byte length)
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))  # fmt: skip
_EXPLICIT, _IMPLICIT_HEAD, _U32 = struct.Struct("<HH2sH"), struct.Struct("<HHI"), struct.Struct("<I")
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UID_CHARS = frozenset(b"0123456789.")
_IMPLICIT, _DEFLATED, _BIG_ENDIAN = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"
#: the routing values (keyword: tag, kind); kinds: "cs" code strings and "int" integer strings
#: (a single value's spaces stripped both sides), "text" (trailing padding stripped), "uid"
FIELDS: dict[str, tuple[int, str]] = {
    "ImageType": (0x00080008, "cs"),
    "SOPClassUID": (0x00080016, "uid"),
    "Modality": (0x00080060, "cs"),
    "StudyDescription": (0x00081030, "text"),
    "SeriesDescription": (0x0008103E, "text"),
    "ProtocolName": (0x00181030, "text"),
    "SeriesNumber": (0x00200011, "int"),
    "InstanceNumber": (0x00200013, "int"),
    "ImagesInAcquisition": (0x00201002, "int"),
    "NumberOfStudyRelatedInstances": (0x00201208, "int"),
    "NumberOfSeriesRelatedInstances": (0x00201209, "int"),
}
_WANTED = frozenset({_STUDY_UID, _SERIES_UID, _SOP_UID, _CHARSET, *(tag for tag, _ in FIELDS.values())})
_LAST = max(_WANTED)
#: the character sets whose text this module decodes itself (default repertoire, Latin-1, UTF-8)
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO 2022 IR 6": "ascii", "ISO_IR 100": "latin-1",
           "ISO_IR 192": "utf-8"}  # fmt: skip


class _Unusual(Exception):
    """Something the walk does not follow: pydicom decodes the object instead."""


def _skip_sequence(data: memoryview, pos: int, explicit: bool) -> int:
    """The position after an undefined-length sequence starting at ``pos`` (its first item)."""
    end = len(data)
    while pos + 8 <= end:
        group, element, length = _IMPLICIT_HEAD.unpack_from(data, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unusual
        if length == _UNDEFINED:
            pos = _walk(data, pos, explicit, None, None)
        else:
            pos += length
    raise _Unusual


def _walk(data: memoryview, pos: int, explicit: bool, found: dict[int, bytes] | None, last: int | None) -> int:
    """Walk elements from ``pos``, keeping the wanted values in ``found``; stop after ``last``
    (top level) or at an item delimiter (inside an undefined-length item)."""
    end = len(data)
    while pos + 8 <= end:
        if explicit:
            group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
        else:
            group, element, length = _IMPLICIT_HEAD.unpack_from(data, pos)
            vr = b""
        tag = group << 16 | element
        if last is not None and tag > last:
            return pos
        if tag == _ITEM_END:
            return pos + 8
        if not explicit:
            pos += 8
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                raise _Unusual
            length = _U32.unpack_from(data, pos + 8)[0]
            pos += 12
        elif vr in _SHORT_VRS:
            pos += 8
        else:
            raise _Unusual
        if length == _UNDEFINED:
            # a sequence (an undefined-length UN holds implicit VR, PS3.5 6.2.2)
            pos = _skip_sequence(data, pos, explicit and vr != b"UN")
            continue
        if pos + length > end:
            raise _Unusual
        if found is not None and tag in _WANTED:
            found[tag] = bytes(data[pos : pos + length])
        pos += length
    if last is None:
        raise _Unusual  # an item without its delimiter
    return pos


def _elements(dataset: bytes | memoryview, transfer_syntax: str, last: int) -> dict[int, bytes] | None:
    if transfer_syntax in (_DEFLATED, _BIG_ENDIAN):
        return None
    found: dict[int, bytes] = {}
    try:
        _walk(memoryview(dataset), 0, transfer_syntax != _IMPLICIT, found, last)
    except (_Unusual, struct.error, IndexError):
        return None
    return found


def _uid(raw: bytes | None) -> str | None:
    value = (raw or b"").rstrip(b"\x00 ")
    if not value or len(value) > 64 or not _UID_CHARS.issuperset(value):
        return None
    return value.decode("ascii")


class Scanned:
    """One walk over a dataset's header: its UIDs before the answer, the rest after."""

    def __init__(self, dataset: bytes | memoryview, transfer_syntax: str) -> None:
        self._found = _elements(dataset, transfer_syntax, _LAST)

    def uids(self) -> tuple[str, str, str] | None:
        """(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID), or None (decode with pydicom)."""
        return None if self._found is None else _uids(self._found)

    def header(self) -> dict[str, Any] | None:
        """What :func:`agent.dicom.spool.header` gives for the decoded dataset, or None."""
        return None if self._found is None else _header(self._found)


def scan_uids(dataset: bytes | memoryview, transfer_syntax: str) -> tuple[str, str, str] | None:
    """(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of an encoded dataset, or None
    (decode it with pydicom then)."""
    found = _elements(dataset, transfer_syntax, _SERIES_UID)
    return None if found is None else _uids(found)


def _uids(found: dict[int, bytes]) -> tuple[str, str, str] | None:
    uids = (_uid(found.get(_STUDY_UID)), _uid(found.get(_SERIES_UID)), _uid(found.get(_SOP_UID)))
    if uids[0] is None or uids[1] is None or uids[2] is None:
        return None
    return uids[0], uids[1], uids[2]


def quick_header(dataset: bytes | memoryview, transfer_syntax: str) -> dict[str, Any] | None:
    """What :func:`agent.dicom.spool.header` gives for the decoded dataset, or None."""
    found = _elements(dataset, transfer_syntax, _LAST)
    return None if found is None else _header(found)


def _header(found: dict[int, bytes]) -> dict[str, Any] | None:
    charset = found.get(_CHARSET, b"").decode("ascii", "replace").strip(" \x00")
    codec = _CODECS.get(charset)
    if codec is None:
        return None
    out: dict[str, Any] = {}
    for key, (tag, kind) in FIELDS.items():
        raw = found.get(tag)
        if raw is None:
            continue
        if kind == "uid":
            value = raw.rstrip(b"\x00 ").decode("ascii", "replace")
            if value:
                out[key] = value
            continue
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            return None
        # as pydicom: the value's trailing padding goes, the parts of a multi-value stay as sent
        parts = text.rstrip(" \x00").split("\\")
        if len(parts) > 1:
            out[key] = parts
            continue
        parts[0] = parts[0].strip(" ") if kind in ("cs", "int") else parts[0]
        if not parts[0]:
            continue
        elif kind == "int":
            try:
                out[key] = int(parts[0])
            except ValueError:
                continue
        else:
            out[key] = parts[0]
    return out
