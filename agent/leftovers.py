"""Outputs left on VIP: ``LEFT_ON_VIP.txt`` and what a dataset ``incomplete`` needs.

VIP serves a file through its API only up to ``maxSizeDirectTransfer`` bytes
(``GET /platform``; 15 MB by default). A larger output stays on VIP: the
dataset ends ``incomplete`` and ``<output>/<dataset>/LEFT_ON_VIP.txt`` says
which files, how big, and how to get them (VIP portal, or ``vip-agent retry``
once the limit allows; ``vip-agent cancel --discard`` deletes them).
"""

from __future__ import annotations

from pathlib import Path

from agent.fsutil import write_atomic
from agent.journal import Dataset, Journal, Output
from agent.progress import human_size

LEFT_FILE = "LEFT_ON_VIP.txt"


def left_on_vip(journal: Journal, dataset_id: int) -> list[Output]:
    """The outputs of a dataset that are not mirrored (they are still on VIP)."""
    return [o for o in journal.outputs(dataset_id) if not o.downloaded]


def summary(left: list[Output], limit: int | None) -> str:
    """One line for ``status``, ``STATUS.json`` and the journal."""
    what = f"{len(left)} output file(s)"
    if limit:
        what += f" above VIP's direct-transfer limit ({human_size(limit)})"
    return f"{what} left on VIP; see {LEFT_FILE} in the output folder"


def write_left_file(ds: Dataset, left: list[Output], limit: int | None) -> Path | None:
    """Write ``LEFT_ON_VIP.txt`` in the dataset's output folder; returns its path."""
    if not ds.output_dir:
        return None
    folder = Path(ds.output_dir)
    limit_text = (
        f"{human_size(limit)} ({limit:,} bytes, maxSizeDirectTransfer of {ds.server}/rest/platform)"
        if limit else "unknown"
    )
    lines = [
        f"vip-agent left {len(left)} output file(s) of the dataset {ds.name!r} on VIP.",
        "VIP's API only transfers files up to its direct-transfer limit; these are larger.",
        f"Limit: {limit_text}",
        "Every other output is in this folder, and the inputs were deleted from VIP.",
        "",
        "Left on VIP (VIP path, size, where it goes here):",
    ]
    for o in left:
        size = f"{human_size(o.size)} ({o.size:,} bytes)" if o.size is not None else "size unknown"
        lines += [f"  {o.remote}", f"      {size}", f"      -> {o.local}"]
    lines += [
        "",
        "How to get them:",
        f"  - from the VIP portal ({ds.server}): log in, open the file browser (Data),",
        "    go to the folder above and download the file; or",
        "  - once the limit allows it (the server's limit was raised, or ask the VIP team):",
        f"        vip-agent retry {ds.name}",
        "    fetches only these files, then deletes the dataset's data on VIP.",
        "If you do not need them, this deletes them from VIP:",
        f"        vip-agent cancel {ds.name} --discard",
        "",
    ]
    target = folder / LEFT_FILE
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(target, "\n".join(lines))
    return target


def remove_left_file(ds: Dataset) -> None:
    """Remove ``LEFT_ON_VIP.txt`` once nothing is left (fetched or discarded)."""
    if ds.output_dir:
        (Path(ds.output_dir) / LEFT_FILE).unlink(missing_ok=True)
