"""``session_data.json``: the backup file of the official ``vip-client``'s VipSession.

Written in the dataset's output folder so that ``VipSession(output_dir=...)``
loads an agent-run session: it shows its executions and can download or finish
it. The keys are VipSession's ``_PROPERTIES``, plus ``removed_from_vip`` (what the agent's
cleanup deleted on the server; VipSession ignores it).

Once cleanup deleted an execution (or the folder holding its outputs), its status is
``Removed``, as ``VipSession.finish`` leaves it: VipSession then neither asks VIP about it
nor offers its outputs for download (they are no longer on the server), and a deleted
execution lists no outputs, since VipSession would ask VIP about them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomic
from agent.journal import Journal

SAVE_FILE = "session_data.json"


def session_record(journal: Journal, dataset_id: int) -> dict[str, Any]:
    ds = journal.get(dataset_id)
    job = ds.job or {}
    executions = journal.executions(dataset_id)
    outputs = journal.outputs(dataset_id)
    removed = dict((ds.options or {}).get("removed") or {})
    removed_paths = [str(p) for p in removed.get("paths") or []]
    removed_execs = {str(x) for x in removed.get("executions") or []}
    workflows: dict[str, Any] = {}
    for e in executions:
        if not e.vip_id:
            continue
        # what is on the server now: a deleted execution is "Removed" (VipSession's word,
        # and it then stops asking VIP about it) and lists no outputs (VipSession would ask
        # VIP about them: 8015); a deleted output file no longer exists
        deleted = e.vip_id in removed_execs
        outputs_gone = deleted or any(
            o.exec_key == e.key and _below(o.remote, removed_paths) for o in outputs
        ) or (ds.remote_root is not None and ds.remote_root in removed_paths)
        workflows[e.vip_id] = {
            "status": "Removed" if (e.cleaned or outputs_gone) else e.status or "Running",
            "start": time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(e.launched or ds.created)),
            "outputs": [] if deleted else [
                {
                    "path": o.remote, "isDirectory": False, "size": o.size,
                    "exists": not (e.cleaned or o.remote_deleted or outputs_gone),
                }
                for o in outputs
                if o.exec_key == e.key
            ],
        }
    first = executions[0].inputs if executions else {}
    path = Path(ds.path)
    return {
        "session_name": ds.session,
        "pipeline_id": job.get("pipeline"),
        "local_input_dir": str(path.parent if path.is_file() else path),
        "local_output_dir": ds.output_dir,
        "vip_input_dir": f"{ds.remote_root}/INPUTS" if ds.remote_root else None,
        "vip_output_dir": f"{ds.remote_root}/OUTPUTS" if ds.remote_root else None,
        "input_settings": first,
        "workflows": workflows,
        "removed_from_vip": {
            "paths": removed_paths,
            "executions": sorted(removed_execs),
            "time": (
                time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(removed["time"]))
                if removed.get("time") else None
            ),
        },
    }


def _below(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def write_session_data(journal: Journal, dataset_id: int) -> Path | None:
    """Write (atomically) the dataset's ``session_data.json``; returns its path."""
    record = session_record(journal, dataset_id)
    if not record["local_output_dir"] or not record["session_name"]:
        return None
    folder = Path(record["local_output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SAVE_FILE
    write_atomic(target, json.dumps(record, indent=4))
    return target
