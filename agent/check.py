"""``vip-agent check``: do a finished dataset's mirrored outputs still match the journal?

The journal records every output the agent mirrored: where it landed, its size on VIP,
and whether it was extracted (an archive replaced by a folder of the same name). This
module compares that record with the disk, reading only (nothing is created, moved,
fixed or deleted), and lists each difference as a :class:`Problem`:

* ``missing``: the output folder, a mirrored file or an extracted folder is not there;
* ``changed``: a file's size differs from the recorded one, or a path holds a file where
  a folder was recorded (or the reverse).

Outputs that the journal says were never mirrored are not problems of the disk: those an
``incomplete`` dataset left on VIP are counted (``left_on_vip``), and a ``done``
dataset with an unmirrored output is reported as ``missing`` (it should have none).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.journal import Dataset, Journal

#: the stages whose outputs are mirrored and can be checked
CHECKED_STAGES = ("done", "incomplete")


@dataclass(frozen=True)
class Problem:
    kind: str  # "missing" or "changed"
    path: str
    message: str  # what differs, in words

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "message": self.message}


@dataclass
class DatasetCheck:
    """What one dataset's check found."""

    id: int
    name: str
    state: str
    output_dir: str | None
    files: int = 0  # mirrored outputs compared
    left_on_vip: int = 0
    problems: list[Problem] = field(default_factory=list)
    skipped: str | None = None  # why it was not checked (not finished)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "state": self.state, "output_dir": self.output_dir,
            "checked_files": self.files, "left_on_vip": self.left_on_vip, "skipped": self.skipped,
            "ok": self.ok, "problems": [p.to_json() for p in self.problems],
        }  # fmt: skip


def _kind(path: Path) -> str | None:
    """``file``, ``folder``, ``other`` or None when nothing is there (links are not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return "other"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "other"


def _size(n: int) -> str:
    return f"{n:,} bytes"


def check_dataset(journal: Journal, ds: Dataset) -> DatasetCheck:
    """Compare ``ds``'s recorded outputs with the disk (reads only)."""
    result = DatasetCheck(ds.id, ds.name, ds.state, ds.output_dir)
    if ds.stage not in CHECKED_STAGES:
        result.skipped = f"{ds.state}: only done and incomplete datasets have mirrored outputs to check"
        return result
    outputs = journal.outputs(ds.id)
    if not ds.output_dir:
        if outputs:
            result.problems.append(Problem("missing", "", "the journal names no output folder"))
        return result
    folder = Path(ds.output_dir)
    if _kind(folder) != "folder":
        where = "is not a folder" if folder.exists() else "is missing"
        count = sum(1 for o in outputs if o.downloaded)
        result.problems.append(Problem(
            "missing", str(folder),
            f"the output folder {folder} {where} ({count} mirrored output(s) recorded in it)",
        ))  # fmt: skip
        return result
    for o in outputs:
        if not o.downloaded:
            if ds.stage == "incomplete":
                result.left_on_vip += 1
            else:
                result.problems.append(Problem(
                    "missing", o.local, f"{o.local}: recorded as an output of {o.remote} but never mirrored",
                ))  # fmt: skip
            continue
        result.files += 1
        if o.extracted == 1 and o.extracted_to:
            target = Path(o.extracted_to)
            kind = _kind(target)
            if kind is None:
                result.problems.append(Problem(
                    "missing", str(target), f"{target}: the folder extracted from {Path(o.local).name} is missing",
                ))  # fmt: skip
            elif kind != "folder":
                result.problems.append(Problem(
                    "changed", str(target),
                    f"{target}: a {kind} where the folder extracted from the archive was",
                ))  # fmt: skip
            continue
        local = Path(o.local)
        kind = _kind(local)
        if kind is None:
            result.problems.append(Problem("missing", str(local), f"{local}: missing"))
        elif kind != "file":
            result.problems.append(Problem("changed", str(local), f"{local}: a {kind} where a file was mirrored"))
        elif o.size is not None:
            size = local.stat().st_size
            if size != o.size:
                result.problems.append(Problem(
                    "changed", str(local),
                    f"{local}: {_size(size)}, the mirrored file had {_size(o.size)}",
                ))  # fmt: skip
    return result


def check(journal: Journal, datasets: list[Dataset]) -> list[DatasetCheck]:
    """:func:`check_dataset` for each of ``datasets``."""
    return [check_dataset(journal, ds) for ds in datasets]


def finished(journal: Journal) -> list[Dataset]:
    """Every dataset whose outputs are mirrored (done or incomplete), oldest first."""
    marks = ", ".join("?" for _ in CHECKED_STAGES)
    return journal.datasets(where=f"stage IN ({marks})", params=CHECKED_STAGES)
