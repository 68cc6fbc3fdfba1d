"""Hand-over: spooled objects -> one dataset folder in a route's drop folder.

The folder is built under a hidden name inside the drop folder (same file system,
and the watcher ignores hidden names), de-identified and/or converted, scanned,
then renamed to its pseudonymous name in one step: the watcher only ever sees a
complete dataset. Nothing identifying is in a dataset's name or its DICOM.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from agent.dicom import convert, deid
from agent.dicom.config import Route
from agent.dicom.index import StudyRow
from agent.dicom.prepare import Prepared
from agent.dicom.routing import Series
from agent.errors import AgentError
from agent.fsutil import fsync_dir

log = logging.getLogger("vip_agent.dicom")
SUMMARY = "DICOM.json"


class HandoverRefused(AgentError):
    """The dataset could not be handed over safely (leak, conversion, I/O)."""


@dataclass(frozen=True)
class Handed:
    name: str
    path: Path
    objects: int
    dropped: int
    files: int


def dataset_name(study: StudyRow, route: Route, series: Series | None, wave: int) -> str:
    """Pseudonymous: the study's random pseudonym, the route, the series number, the wave."""
    name = f"dicom-{study.pseudonym}-r{route.index}"
    if series is not None:
        name += f"-s{series.number}"
    if wave:
        name += f"-late{wave}"
    return name


def _free_name(drop: Path, name: str) -> str:
    if not (drop / name).exists():
        return name
    n = 2
    while (drop / f"{name}-{n}").exists():
        n += 1
    return f"{name}-{n}"


def _write_objects(series: Sequence[Series], route: Route, study: StudyRow, target: Path,
                   prepared: Callable[[str], Prepared | None] | None = None,
                   ) -> tuple[list[pydicom.Dataset], int, dict[int, list[Path]]]:  # fmt: skip
    """Write (de-identified) objects; the originals' identifying values, objects dropped, files
    per series. A copy de-identified ahead of time (``prepared``) is used when there is one."""
    originals: list[pydicom.Dataset] = []
    dropped = 0
    per_series: dict[int, list[Path]] = {}
    deidentifier = deid.StudyDeidentifier(study.secret, study.pseudonym) if route.deidentify == "basic" else None
    for s_index, s in enumerate(series):
        for i, obj in enumerate(s.objects, 1):
            out = target / f"{s.number:03d}-{s_index:02d}-{i:04d}.dcm"
            ready = prepared(obj.sop_uid) if prepared is not None and deidentifier is not None else None
            if ready is not None:
                originals.append(ready.identity)
                if ready.secondary_capture and not route.allow_secondary_capture:
                    dropped += 1
                    continue
                _place(ready.path, out)
                per_series.setdefault(s_index, []).append(out)
                continue
            ds = pydicom.dcmread(obj.path, force=True)
            originals.append(deid.identifying_copy(ds))
            if deidentifier is not None:
                if deid.is_secondary_capture(ds) and not route.allow_secondary_capture:
                    dropped += 1
                    continue
                deidentifier.apply(ds)
                ds.save_as(out, enforce_file_format=True)
            else:
                shutil.copyfile(obj.path, out)
            per_series.setdefault(s_index, []).append(out)
    return originals, dropped, per_series


def _place(prepared: Path, out: Path) -> None:
    """A copy de-identified ahead of time into the dataset: a hard link when both are on one
    file system (no copying; the preparer fsynced it already), a copy otherwise."""
    try:
        os.link(prepared, out)
    except OSError:
        shutil.copyfile(prepared, out)


def _convert(series: Sequence[Series], per_series: dict[int, list[Path]], target: Path) -> None:
    for s_index, files in per_series.items():
        folder = target / f".series-{s_index:02d}"
        folder.mkdir()
        for f in files:
            f.replace(folder / f.name)
        convert.convert_series(folder, target, f"series{series[s_index].number:03d}-{s_index:02d}")
        shutil.rmtree(folder)


def _summary(study: StudyRow, route: Route, series: Sequence[Series], wave: int, name: str,
             dropped: int, files: list[Path]) -> dict[str, object]:  # fmt: skip
    return {
        "study": study.pseudonym,
        "dataset": name,
        "route": route.label,
        "per": route.per,
        "deidentify": route.deidentify,
        "convert": route.convert,
        "wave": wave,
        "objects": sum(s.count for s in series) - dropped,
        "dropped_secondary_captures": dropped,
        "files": len(files),
        "series": [
            {"number": s.number, "modality": s.info.get("Modality"), "objects": s.count,
             "description": s.info.get("SeriesDescription"), "sop_class": s.info.get("SOPClassUID")}
            for s in series
        ],
    }  # fmt: skip


def hand_over(study: StudyRow, route: Route, series: Sequence[Series], wave: int, *,
              marker: str | None, audit: Path,
              prepared: Callable[[str], Prepared | None] | None = None) -> Handed:  # fmt: skip
    """Build, check and move one dataset into ``route.drop``; :class:`HandoverRefused` if unsafe."""
    drop = route.drop
    name = _free_name(drop, dataset_name(study, route, series[0] if route.per == "series" else None, wave))
    staging = drop / f".{name}.vip-dicom"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        originals, dropped, per_series = _write_objects(series, route, study, staging, prepared)
        if not per_series:
            raise HandoverRefused(f"{name}: nothing left to hand over (every object was a secondary capture)")
        if route.convert == "nifti":
            _convert(series, per_series, staging)
        files = sorted(p for p in staging.iterdir() if p.is_file())
        summary = staging / SUMMARY
        summary.write_text(json.dumps(_summary(study, route, series, wave, name, dropped, files), indent=2),
                           encoding="utf-8")  # fmt: skip
        files.append(summary)
        if route.deidentify == "basic":
            identity = deid.identity_of(originals)
            hits = deid.scan(files, identity)
            if hits:
                raise HandoverRefused(
                    f"{name}: identifying values remain after de-identification; the dataset is "
                    f"refused and stays in the spool ({'; '.join(hits[:3])})",
                    detail="see the audit log in the state folder",
                )
        if marker:
            (staging / marker).write_text("", encoding="utf-8")
        for f in staging.iterdir():  # renamed into view only once every file is on disk
            _fsync(f)
        fsync_dir(staging)
        final = drop / name
        staging.rename(final)
        fsync_dir(drop)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        _audit(audit, event="refused", dataset=name, study=study.pseudonym, route=route.label,
               reason=str(err))  # fmt: skip
        if isinstance(err, AgentError):
            raise HandoverRefused(err.message, err.detail) from None
        if isinstance(err, (OSError, ValueError)):
            raise HandoverRefused(f"{name}: could not build the dataset: {err}") from None
        raise
    _audit(audit, event="handed", dataset=name, study=study.pseudonym, route=route.label, drop=str(drop),
           deidentify=route.deidentify, convert=route.convert, dropped=dropped,
           files=[{"name": f.name, "size": f.stat().st_size, "sha256": _sha256(f)}
                  for f in sorted(final.iterdir()) if f.is_file()])  # fmt: skip
    log.info("%s: handed over to %s (%d object(s), %d dropped)", name, drop, len(originals) - dropped, dropped)
    return Handed(name, final, len(originals) - dropped, dropped, len(files))


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _audit(path: Path, **fields: object) -> None:
    """One JSON line per hand-over or refusal: what left the site (no identifying value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(deid.audit_line(at=time.time(), **fields))
