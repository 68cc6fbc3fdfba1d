"""Datasets already mirrored by an earlier journal: recorded as done, never run again.

A journal lost (deleted, emptied, replaced by a fresh one) forgets what ran; the output
folders do not. Each one holds ``STATUS.json`` (path, fingerprint, state of the dataset it
mirrors), so a dataset of the drop folder whose outputs say ``done`` for exactly its content is
adopted as done instead of being sent to VIP again.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from agent.journal import Journal

log = logging.getLogger("vip_agent.watch")

STATUS_FILE = "STATUS.json"


def _token(text: str) -> str:
    """The start of the output folder name the runner gives a dataset (``safe_token``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")[:80] or "dataset"


def mirrored(output_root: Path, path: Path, name: str, fingerprint: str | None) -> dict[str, Any] | None:
    """The ``STATUS.json`` of a finished mirror of exactly this dataset content, or None.

    Only the output folders named after the dataset are read (``NAME``, ``NAME-...``), so a
    new dataset costs a few small reads, not a walk of every output.
    """
    if not fingerprint or not output_root.is_dir():
        return None
    found: dict[str, Any] | None = None
    for folder in sorted(output_root.glob(f"{_token(name)}*")):
        try:
            record = json.loads((folder / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(record, dict) and record.get("state") == "done"
            and record.get("path") == str(path) and record.get("fingerprint") == fingerprint
        ):  # fmt: skip
            record.setdefault("output_dir", str(folder))
            found = record
    return found


def adopt_mirrored(
    journal: Journal, *, path: Path, name: str, fingerprint: str | None, output_root: Path,
    server: str, drop_dir: Path, template: str | None, options: dict[str, Any],
) -> int | None:  # fmt: skip
    """Record the dataset as ``done`` when its outputs are already mirrored; its id, else None."""
    record = mirrored(output_root, path, name, fingerprint)
    if record is None:
        return None
    output_dir = str(record.get("output_dir"))
    dataset_id = journal.add_dataset(
        name=str(record.get("name") or name), path=str(path), server=server,
        output_root=str(output_root), fingerprint=fingerprint, drop_dir=str(drop_dir),
        template=template, options=options, stage="done",
    )  # fmt: skip
    journal.update(dataset_id, output_dir=output_dir)
    message = (
        f"already done: its outputs are mirrored in {output_dir} (STATUS.json says done for this "
        "content); recorded as done, not run again"
    )
    journal.event(dataset_id, message)
    log.info("%s: %s", name, message)
    return dataset_id
