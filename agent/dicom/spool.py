"""The spool: every received object, written durably before the sender hears "success".

Layout: ``<spool>/objects/<study key>/<SOPInstanceUID>.dcm`` (the study key is a hash
of the StudyInstanceUID, never an identifying value) and ``<spool>/spare/`` for
temporary files. An object is written to a temporary file, fsynced, renamed into
place and its folder fsynced: a crash leaves either the whole object or a temporary file
that the next start removes, never a half-written object under its final name.

The temporary files are created ahead of time (a few empty files made by a background
thread): creating a file waits for the file system's journal, measured 0.2-0.5 ms per
object here while fsyncs run, and that wait need not sit between an object's last byte
and its answer. (``<spool>/tmp/`` is where older versions wrote; it is emptied at start.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from agent.fsutil import fsync_dir

_SAFE_UID = re.compile(r"^[0-9.]{1,64}$")
#: the header values routing and completeness need (kept in the index; no patient identity)
HEADER_KEYS = (
    "SOPClassUID", "Modality", "SeriesNumber", "InstanceNumber", "SeriesDescription",
    "ProtocolName", "StudyDescription", "ImageType", "NumberOfSeriesRelatedInstances",
    "NumberOfStudyRelatedInstances", "ImagesInAcquisition",
)  # fmt: skip
#: the tags the receiver decodes: these keys and the three UIDs (the rest, from the image
#: module and private blocks to the pixel data, stays undecoded bytes until the hand-over)
HEADER_TAGS = tuple(sorted(int(Tag(k)) for k in (*HEADER_KEYS, "StudyInstanceUID", "SeriesInstanceUID",
                                                  "SOPInstanceUID")))  # fmt: skip
#: empty temporary files kept ready
SPARES = 4


class SpoolFull(OSError):
    """Less free space than the watermark: the object is refused, nothing is written."""


def study_key(study_uid: str) -> str:
    return hashlib.sha256(study_uid.encode()).hexdigest()[:20]


def header(ds: Dataset) -> dict[str, Any]:
    """The routing/completeness values of one object, JSON-ready."""
    out: dict[str, Any] = {}
    for key in HEADER_KEYS:
        value = ds.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, MultiValue):
            out[key] = [str(v) for v in value]
        elif key in ("SeriesNumber", "InstanceNumber", "NumberOfSeriesRelatedInstances",
                     "NumberOfStudyRelatedInstances", "ImagesInAcquisition"):  # fmt: skip
            try:
                out[key] = int(value)
            except (TypeError, ValueError):
                continue
        else:
            out[key] = str(value)
    return out


class Spool:
    """Durable object storage on one file system, with a free-space watermark."""

    def __init__(self, root: Path, disk_low: int) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.spare = self.root / "spare"
        self.disk_low = disk_low
        for folder in (self.objects, self.tmp, self.spare):
            folder.mkdir(parents=True, exist_ok=True)
        self._spares: deque[tuple[int, Path]] = deque()
        self._want = threading.Event()
        self._lock = threading.Lock()
        self._filler: threading.Thread | None = None
        self._closed = False

    def clean_tmp(self) -> int:
        """Remove what a crash left half-written (never acknowledged to a sender) and the
        spares; called at start, before anything is received."""
        self.close()
        self._closed = False
        n = 0
        for leftover in [*self.tmp.iterdir(), *self.spare.iterdir()]:
            with contextlib.suppress(OSError):
                written = leftover.stat().st_size > 0
                leftover.unlink()
                n += written
        return n

    def close(self) -> None:
        """Stop making spares and remove the unused ones."""
        with self._lock:
            self._closed = True
            filler, self._filler = self._filler, None
        self._want.set()
        if filler is not None:
            filler.join(5)
        with self._lock:
            while self._spares:
                fd, path = self._spares.popleft()
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()

    def _create(self) -> tuple[int, Path]:
        path = self.spare / f"{uuid.uuid4().hex}.part"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path

    def _take(self) -> tuple[int, Path]:
        """A new empty temporary file: a spare when one is ready."""
        with self._lock:
            spare = self._spares.popleft() if self._spares else None
            if self._filler is None and not self._closed:
                self._filler = threading.Thread(target=self._fill, name="vip-agent-dicom-spares", daemon=True)
                self._filler.start()
        self._want.set()
        return spare if spare is not None else self._create()

    def _fill(self) -> None:
        while True:
            self._want.wait()
            self._want.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if len(self._spares) >= SPARES:
                        break
                try:
                    made = self._create()
                except OSError:  # a full or read-only disk: write() creates its own and says why
                    break
                with self._lock:
                    if self._closed:
                        os.close(made[0])
                        with contextlib.suppress(OSError):
                            made[1].unlink()
                        return
                    self._spares.append(made)

    def free(self) -> int:
        return shutil.disk_usage(self.root).free

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        name = sop_uid if _SAFE_UID.match(sop_uid) else hashlib.sha256(sop_uid.encode()).hexdigest()
        return self.objects / study_key(study_uid) / f"{name}.dcm"

    def write(self, study_uid: str, sop_uid: str, data: bytes | memoryview) -> Path:
        """Write one object durably; :class:`SpoolFull` below the watermark."""
        if self.free() - len(data) < self.disk_low:
            raise SpoolFull(f"free space in {self.root} is below the watermark")
        final = self.path_for(study_uid, sop_uid)
        new_folder = not final.parent.is_dir()
        if new_folder:
            final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = self._take()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if new_folder:
            fsync_dir(self.objects)
        return final

    def files(self) -> Iterator[Path]:
        for folder in sorted(self.objects.iterdir()):
            if folder.is_dir():
                yield from sorted(folder.glob("*.dcm"))

    def usage(self) -> int:
        """Bytes held in the spool."""
        return sum(p.stat().st_size for p in self.files())
