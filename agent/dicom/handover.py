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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass
class _Built:
    """What writing a dataset's objects gave."""

    #: the originals' identifying values (for the final scan)
    originals: list[Mapping[str, str]] = field(default_factory=list)
    dropped: int = 0
    per_series: dict[int, list[Path]] = field(default_factory=dict)
    #: hard links to spooled originals (``deidentify: none``): already on disk, no fsync needed
    linked: set[Path] = field(default_factory=set)
    #: prepared copies: the identity each was scanned for and what that scan found
    scanned: dict[Path, tuple[deid.Identity, str | None]] = field(default_factory=dict)
    #: file name -> sha256 known without reading the file again (for the audit log)
    sha256: dict[str, str] = field(default_factory=dict)


def _write_objects(series: Sequence[Series], route: Route, study: StudyRow, target: Path,
                   prepared: Callable[[str], Prepared | None] | None = None) -> _Built:  # fmt: skip
    """Write (de-identified) objects into ``target``. A copy de-identified ahead of time
    (``prepared``) is used when there is one; ``deidentify: none`` links the spooled originals."""
    built = _Built()
    deidentifier = deid.StudyDeidentifier(study.secret, study.pseudonym) if route.deidentify == "basic" else None
    for s_index, s in enumerate(series):
        for i, obj in enumerate(s.objects, 1):
            out = target / f"{s.number:03d}-{s_index:02d}-{i:04d}.dcm"
            if deidentifier is None:
                built.originals.append({})
                try:  # the spooled original is immutable and already on disk
                    os.link(obj.path, out)
                    built.linked.add(out)
                except OSError:  # another file system (or no hard links): a copy
                    shutil.copyfile(obj.path, out)
                built.per_series.setdefault(s_index, []).append(out)
                continue
            ready = prepared(obj.sop_uid) if prepared is not None else None
            if ready is not None:
                built.originals.append(ready.identity)
                if ready.secondary_capture and not route.allow_secondary_capture:
                    built.dropped += 1
                    continue
                _place(ready.path, out)
                built.scanned[out] = (ready.scanned_for, ready.hit)
                built.sha256[out.name] = ready.sha256
                built.per_series.setdefault(s_index, []).append(out)
                continue
            ds = pydicom.dcmread(obj.path, force=True)
            built.originals.append(deid.identity_values(ds))
            if deid.is_secondary_capture(ds) and not route.allow_secondary_capture:
                built.dropped += 1
                continue
            deidentifier.apply(ds)
            ds.save_as(out, enforce_file_format=True)
            built.per_series.setdefault(s_index, []).append(out)
    return built


def _leaks(built: _Built, files: list[Path]) -> list[str]:
    """Every outgoing file scanned for every identifying value of the study: a prepared copy
    whose own scan covered them all is not read again."""
    identity = deid.identity_of(built.originals)
    hits: list[str] = []
    again: list[Path] = []
    for f in files:
        done = built.scanned.get(f)
        if done is not None and done[0].covers(identity):
            if done[1] is not None:
                hits.append(f"{f.name}: {done[1].split(': ', 1)[-1]}")
        else:
            again.append(f)
    return hits + deid.scan(again, identity)


def _place(prepared: Path, out: Path) -> None:
    """A copy de-identified ahead of time into the dataset: a hard link when both are on one
    file system (no copying), a copy otherwise."""
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
        built = _write_objects(series, route, study, staging, prepared)
        dropped = built.dropped
        if not built.per_series:
            raise HandoverRefused(f"{name}: nothing left to hand over (every object was a secondary capture)")
        if route.convert == "nifti":
            _convert(series, built.per_series, staging)
        files = sorted(p for p in staging.iterdir() if p.is_file())
        summary = staging / SUMMARY
        summary.write_text(json.dumps(_summary(study, route, series, wave, name, dropped, files), indent=2),
                           encoding="utf-8")  # fmt: skip
        files.append(summary)
        if route.deidentify == "basic":
            hits = _leaks(built, files)
            if hits:
                raise HandoverRefused(
                    f"{name}: identifying values remain after de-identification; the dataset is "
                    f"refused and stays in the spool ({'; '.join(hits[:3])})",
                    detail="see the audit log in the state folder",
                )
        if marker:
            (staging / marker).write_text("", encoding="utf-8")
        # renamed into view only once every file is on disk (side by side: the file system
        # commits many fsyncs at once; links to spooled originals are on disk already)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(_fsync, [f for f in staging.iterdir() if f not in built.linked]))
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
           files=[{"name": f.name, "size": f.stat().st_size, "sha256": built.sha256.get(f.name) or _sha256(f)}
                  for f in sorted(final.iterdir()) if f.is_file()])  # fmt: skip
    objects = len(built.originals) - dropped
    log.info("%s: handed over to %s (%d object(s), %d dropped)", name, drop, objects, dropped)
    return Handed(name, final, objects, dropped, len(files))


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
