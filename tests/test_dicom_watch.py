"""The issue's "done when": dcmtk storescu sends pydicom's 3-study patient to a real
``vip-agent watch`` process; the routed datasets are complete, run to ``done`` on the local
VIP server, and no file uploaded to the server holds the patient's name or ID.
Also: doctor, status, /metrics and a restart of the agent (SIGKILL) in the middle of a study.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import yaml
from agenthelpers import run_agent, wait_for, watch_process
from dicomhelpers import (
    PATIENT_FILES,
    PATIENT_ID,
    PATIENT_NAME,
    STUDY_SIZES,
    by_study,
    needs_dcmtk,
    storescu,
)
from webhelpers import CHROMEDRIVER, CHROMIUM, chromium

from agent.journal import Journal
from agent.localvip import LocalVip

pytestmark = needs_dcmtk
TEMPLATE = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "*.dcm"}}


def write_config(tmp_path: Path, server: LocalVip, **dicom: Any) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "job.yaml").write_text(yaml.safe_dump(TEMPLATE), encoding="utf-8")
    config = {
        "state": "state",
        "drops": [{"path": "drop", "output": "out", "server": server.url, "keep_remote": True,
                   "readiness": {"rule": "marker"}, "poll": {"min": 0.1, "max": 0.5}}],
        "dicom": {"ae_title": "VIPAGENT", "listen": "127.0.0.1:0", "quiet": "1s", "disk_low": 0,
                  "routes": [{"match": {"Modality": "MR"}, "drop": "drop", "per": "study"}], **dicom},
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@contextmanager
def watching(tmp_path: Path, server: LocalVip, config: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``vip-agent watch --config`` as a real process; yields it and its DICOM port."""
    port_file = tmp_path / "state" / "dicom-port"
    port_file.unlink(missing_ok=True)
    with watch_process(["--config", str(config)], api_key=server.api_key, cwd=tmp_path,
                       log=tmp_path / "agent.log", ready=port_file.exists, what="the DICOM port",
                       append=True, stop_timeout=20) as proc:  # fmt: skip
        yield proc, int(port_file.read_text())


def done_datasets(tmp_path: Path, n: int, timeout: float = 90) -> list[Any]:
    journal = Journal.in_state_dir(tmp_path / "state")

    def finished() -> list[Any]:
        rows = journal.datasets()
        return rows if len(rows) >= n and all(d.final for d in rows) else []

    rows = wait_for(finished, timeout, interval=0.2, what=f"{n} datasets finished")
    assert [d.stage for d in rows] == ["done"] * n, [(d.name, d.stage, d.error) for d in rows]
    return rows


def test_storescu_to_watch_to_done_without_identity_on_the_server(tmp_path: Path, vip_server: LocalVip) -> None:
    config = write_config(tmp_path, vip_server)
    with watching(tmp_path, vip_server, config) as (_proc, port):
        sent = storescu(port, PATIENT_FILES)
        assert sent.returncode == 0, sent.stderr
        rows = done_datasets(tmp_path, 3)
        status = run_agent("status", "--config", str(config), api_key=vip_server.api_key, cwd=tmp_path)
        assert status.returncode == 0 and "pending in the spool" not in status.stdout
        dstatus = run_agent("dicom", "status", "--config", str(config), api_key=vip_server.api_key, cwd=tmp_path)
        assert "listening" in dstatus.stdout and "objects 17" in dstatus.stdout, dstatus.stdout
        # the de-identification workers are up and have nothing left to do
        assert re.search(r"de-identification ahead: [12] worker\(s\), 0 object\(s\) waiting", dstatus.stdout), \
            dstatus.stdout
        doctor = run_agent("doctor", "--config", str(config), api_key=vip_server.api_key, cwd=tmp_path)
        assert re.search(r"OK .*DICOM node VIPAGENT listening", doctor.stdout), doctor.stdout
    journal = Journal.in_state_dir(tmp_path / "state")
    counts = sorted(len(journal.files(d.id)) for d in rows)
    assert counts == STUDY_SIZES  # each dataset complete: every instance uploaded, one job each
    for d in rows:
        assert d.name.startswith("dicom-") and "Doe" not in d.name
        summary = json.loads((Path(d.path) / "DICOM.json").read_text())
        assert summary["objects"] == len(journal.files(d.id))
    uploaded = [p for p in vip_server.root.rglob("*.dcm") if p.is_file()]
    assert len(uploaded) == 17  # keep_remote: true
    for p in uploaded:
        data = p.read_bytes()
        assert PATIENT_NAME not in data and PATIENT_ID not in data, p
        assert b"Doe" not in data and b"Peter" not in data, p


def _workers_of(pid: int) -> list[int]:
    """Children of ``pid`` running the de-identification worker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"agent.dicom.prepworker" in cmdline:
            found.append(int(entry.name))
    return found


def test_agent_killed_in_the_middle_of_a_study(tmp_path: Path, vip_server: LocalVip) -> None:
    config = write_config(tmp_path, vip_server, quiet="2s")
    big = list(by_study(PATIENT_FILES).values())[-1]
    with watching(tmp_path, vip_server, config) as (proc, port):
        assert storescu(port, big[:4]).returncode == 0
        workers = wait_for(lambda: _workers_of(proc.pid), what="the de-identification workers")
        proc.send_signal(signal.SIGKILL)  # the agent dies with the study half received
        proc.wait(10)
    # its de-identification workers see their pipe close and end: no orphan left behind
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), what="the workers gone")
    pending = run_agent("status", "--config", str(config), api_key=vip_server.api_key, cwd=tmp_path)
    assert "DICOM study" in pending.stdout and "4 object(s)" in pending.stdout, pending.stdout
    with watching(tmp_path, vip_server, config) as (_proc, port):
        assert storescu(port, big[4:]).returncode == 0
        (row,) = done_datasets(tmp_path, 1)
    assert len(Journal.in_state_dir(tmp_path / "state").files(row.id)) == 11


def test_metrics_and_page_show_the_node(tmp_path: Path, vip_server: LocalVip) -> None:
    config = write_config(tmp_path, vip_server, routes=[])
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "http": "127.0.0.1:0"}), encoding="utf-8")
    with watching(tmp_path, vip_server, config) as (_proc, port):
        assert storescu(port, PATIENT_FILES[:2]).returncode == 0
        url = wait_for(lambda: (tmp_path / "state" / "http-url").exists() and
                       (tmp_path / "state" / "http-url").read_text().strip(), what="the page's URL")  # fmt: skip

        def scraped() -> str:
            text = requests.get(url + "/metrics", timeout=10).text
            return text if 'vip_agent_dicom_studies_pending{state="unrouted"} 2.0' in text else ""

        text = wait_for(scraped, 30, interval=0.2, what="the two unrouted studies in /metrics")
        health = requests.get(url + "/api/health", timeout=10).json()
        card = page_card(tmp_path, url, "DICOM studies pending")
    assert "vip_agent_dicom_objects_total 2.0" in text and "vip_agent_dicom_associations_total 1.0" in text
    assert "vip_agent_dicom_refusals_total 0.0" in text
    pending = health["dicom"]["pending"]  # the two files belong to two studies
    assert [(p["state"], p["objects"]) for p in pending] == [("unrouted", 1)] * 2
    assert "Doe" not in json.dumps(health)
    assert health["dicom"]["node"]["counters"]["objects"] == 2
    if card is not None:  # the status page in a real headless Chromium (where installed)
        assert card.lower().startswith("dicom studies pending\n2\nvipagent on 127.0.0.1:"), card
        assert "2 objects" in card and "unrouted (1)" in card and "Doe" not in card


def page_card(tmp_path: Path, url: str, title: str) -> str | None:
    """The text of the status page's health card ``title`` (None without Chromium)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return None
    driver = chromium(tmp_path / "profile")
    try:
        driver.get(url)
        script = ("return [...document.querySelectorAll('#health .card')].map((c) => c.innerText)"
                  f".find((t) => t.toLowerCase().startsWith({json.dumps(title.lower())})) || ''")  # fmt: skip
        return str(wait_for(lambda: driver.execute_script(script), 20, what=f"the {title!r} card"))
    finally:
        driver.quit()
