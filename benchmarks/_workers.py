"""Client processes the benchmarks measure: ``python benchmarks/_workers.py MODE``.

The job comes as one JSON object on stdin (it holds the API key, which must not
be in argv or the environment); the result is one JSON line on stdout. Each
mode imports only the client it exercises, so peak RSS is that client's.

Modes: ``vipclient-upload``, ``vipclient-download`` (agent.vip.VipClient),
``official-upload``, ``official-download`` (vip_client.utils.vip),
``vipsession-cycle`` (vip_client.classes.VipSession, a whole session),
``agent-upload-stage`` (the runner's upload stage of one dataset), ``vipsession-upload``
(``VipSession.upload_inputs``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def vipclient_upload(job: dict[str, Any]) -> dict[str, Any]:
    from agent.vip.client import VipClient

    with VipClient(job["url"], job["key"]) as client:
        t0 = time.perf_counter()
        client.upload(Path(job["local"]), job["remote"])
        return {"seconds": time.perf_counter() - t0, "ok": True}


def vipclient_download(job: dict[str, Any]) -> dict[str, Any]:
    from agent.vip.client import VipClient

    with VipClient(job["url"], job["key"]) as client:
        t0 = time.perf_counter()
        count = client.download(job["remote"], Path(job["local"]), expected_size=job.get("size"))
        return {"seconds": time.perf_counter() - t0, "ok": True, "bytes": count}


def _official(job: dict[str, Any]) -> Any:
    from vip_client.utils import vip

    vip.set_vip_url(job["url"])
    if not vip.setApiKey(job["key"]):
        raise SystemExit("the official client rejected the key")
    return vip


def official_upload(job: dict[str, Any]) -> dict[str, Any]:
    vip = _official(job)
    t0 = time.perf_counter()
    ok = bool(vip.upload(job["local"], job["remote"]))
    return {"seconds": time.perf_counter() - t0, "ok": ok}


def official_download(job: dict[str, Any]) -> dict[str, Any]:
    vip = _official(job)
    t0 = time.perf_counter()
    ok = bool(vip.download(job["remote"], job["local"]))
    return {"seconds": time.perf_counter() - t0, "ok": ok}


def vipsession_cycle(job: dict[str, Any]) -> dict[str, Any]:
    """upload_inputs, launch_pipeline, monitor_workflows, download_outputs, finish."""
    from vip_client.classes.VipSession import VipSession

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    session = VipSession.init(
        api_key=job["key"], vip_portal_url=job["url"], verbose=False,
        session_name=job["session_name"], input_dir=job["input_dir"], output_dir=job["output_dir"],
    )
    mark = time.perf_counter()
    stages["init"] = mark - t0
    steps: list[tuple[str, Any]] = [
        ("upload_inputs", lambda: session.upload_inputs()),
        ("launch_pipeline", lambda: session.launch_pipeline(
            pipeline_id=job["pipeline"], input_settings=job["input_settings"])),
        ("monitor_workflows", lambda: session.monitor_workflows(refresh_time=job["refresh"])),
        ("download_outputs", lambda: session.download_outputs()),
        ("finish", lambda: session.finish(timeout=job.get("finish_timeout", 60))),
    ]
    for name, step in steps:
        step()
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now
    statuses = sorted({str(w.get("status")) for w in session.workflows.values()})
    return {"seconds": time.perf_counter() - t0, "ok": statuses == ["Removed"],
            "stages": stages, "statuses": statuses}


def agent_upload_stage(job: dict[str, Any]) -> dict[str, Any]:
    """vip-agent's upload stage of one dataset (validate first, untimed), as the runner does it."""
    from agent import dataset as dataset_mod
    from agent.journal import Journal
    from agent.runner import Runner, admit
    from agent.vip.client import VipClient

    folder = Path(job["dataset"])
    journal = Journal.in_state_dir(Path(job["state"]))
    _pace(job)
    with VipClient(job["url"], job["key"]) as client:
        dataset_id = admit(
            journal, folder, server=job["url"], output_root=Path(job["output"]),
            fingerprint=dataset_mod.scan(folder).fingerprint, name=folder.name,
            template=Path(job["template"]),
        )
        runner = Runner(journal, lambda _url: client, **({"transfer_threads": job["threads"]}
                                                          if job.get("threads") else {}))
        stage = runner.step(dataset_id).stage
        t0 = time.perf_counter()
        while stage == "upload":
            stage = runner.step(dataset_id).stage
        seconds = time.perf_counter() - t0
        files = len(journal.files(dataset_id))
    error = journal.get(dataset_id).error
    return {"seconds": seconds, "ok": stage == "launch", "files": files, "error": error}


def _pace(job: dict[str, Any]) -> None:
    """``max_rate``: the request ceiling the agent keeps with a real VIP (5/s), which it leaves
    off for a loopback server; the production profile's measures set it, so the agent is as
    polite here as it would be there. Transfer slots and backoffs are the agent's defaults."""
    if job.get("max_rate"):
        from agent.pacer import budget_for

        budget_for(job["url"]).configure(max_rate=float(job["max_rate"]))


def vipsession_upload(job: dict[str, Any]) -> dict[str, Any]:
    """The official client's ``VipSession.upload_inputs`` on the same folder."""
    from vip_client.classes.VipSession import VipSession

    session = VipSession.init(
        api_key=job["key"], vip_portal_url=job["url"], verbose=False,
        session_name=job["session_name"], input_dir=job["input_dir"], output_dir=job["output_dir"],
    )
    t0 = time.perf_counter()
    session.upload_inputs()
    return {"seconds": time.perf_counter() - t0, "ok": True}


MODES = {
    "agent-upload-stage": agent_upload_stage,
    "vipsession-upload": vipsession_upload,
    "vipclient-upload": vipclient_upload,
    "vipclient-download": vipclient_download,
    "official-upload": official_upload,
    "official-download": official_download,
    "vipsession-cycle": vipsession_cycle,
}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in MODES:
        print(f"usage: {sys.argv[0]} {{{','.join(MODES)}}} < job.json", file=sys.stderr)
        return 2
    job = json.loads(sys.stdin.read())
    result = MODES[sys.argv[1]](job)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
