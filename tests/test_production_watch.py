"""``vip-agent watch`` against the local server's production behaviours: uploads held back
ahead of the running slot, and issue 16's Done-when run (about twenty datasets under the
production profile, with short staging and result delays and tiny pipelines)."""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthelpers import wait_for, write_dataset

from agent.config import load_config
from agent.daemon import WatchService
from agent.journal import UPLOAD_HELD, Journal
from agent.localvip import LocalVip

#: a pipeline of this test: copies its input file after sleeping (one job per file)
SLOW_COPY = {
    "name": "SlowCopy", "tool-version": "1.0", "schema-version": "0.5",
    "description": "Sleep DURATION seconds, then copy the input file (tests).",
    "command-line": '"$PYTHON" "$DESCRIPTOR_DIR/slowcopy.py" [INPUT_FILE] [DURATION] [OUT]',
    "inputs": [
        {"id": "input_file", "name": "Input", "type": "File", "value-key": "[INPUT_FILE]"},
        {"id": "duration", "name": "Seconds", "type": "Number", "value-key": "[DURATION]"},
    ],
    "output-files": [
        {"id": "copy", "name": "Copy", "path-template": "[INPUT_FILE]_copy.out",
         "path-template-stripped-extensions": [".txt"], "value-key": "[OUT]"},
    ],
}
SLOW_COPY_SCRIPT = (
    "import shutil, sys, time\n"
    "time.sleep(float(sys.argv[2]))\n"
    "shutil.copyfile(sys.argv[1], sys.argv[3])\n"
)


def pipelines_dir(tmp_path: Path) -> Path:
    """A folder with the SlowCopy/1.0 descriptor and its script (``LocalVip(pipelines_dir=)``)."""
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "SlowCopy.json").write_text(json.dumps(SLOW_COPY), encoding="utf-8")
    (folder / "slowcopy.py").write_text(SLOW_COPY_SCRIPT, encoding="utf-8")
    return folder


def _config(tmp_path: Path, drops: list[dict[str, Any]]) -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"drops": drops, "state": str(tmp_path / "state")}))
    return cfg


def _service(cfg: Path) -> WatchService:
    return WatchService(
        load_config(cfg), debounce=0.05, runner_options={"poll_min": 0.05, "poll_max": 0.3},
        scheduler_options={"poll_journal": 0.2}, grace=1.0,
    )  # fmt: skip


def test_uploads_run_ahead_of_the_slot_by_upload_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1, upload_ahead 2, six datasets dropped at once: at most the running dataset, one
    finishing and two uploaded ahead have folders on VIP; the rest wait here, queued with
    the reason; all end done."""
    key = secrets.token_urlsafe(16)
    monkeypatch.setenv("VIP_API_KEY", key)
    with LocalVip(tmp_path / "vip", api_keys=[key], max_running=1,
                  pipelines_dir=pipelines_dir(tmp_path)) as vip:  # fmt: skip
        drop = tmp_path / "drop"
        drop.mkdir()
        job = {"pipeline": "SlowCopy/1.0", "inputs": {"input_file": "note.txt", "duration": 1.5}}
        (drop / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
        cfg = _config(tmp_path, [{
            "path": str(drop), "server": vip.url, "output": str(tmp_path / "out"),
            "max_running": 1, "max_uploads": 4, "upload_ahead": 2,
            "readiness": {"settle_seconds": 0.2},
        }])  # fmt: skip
        assert load_config(cfg).upload_ahead(vip.url) == 2
        sessions = vip.home() / "vip-agent"
        peak = [0]
        queued_reasons: set[str] = set()
        stop = threading.Event()
        journal = Journal.in_state_dir(tmp_path / "state")

        def sample() -> None:
            while not stop.wait(0.02):
                if sessions.is_dir():
                    peak[0] = max(peak[0], sum(1 for _ in sessions.iterdir()))
                for d in journal.datasets():
                    if d.state == "queued" and (d.error or "").startswith(UPLOAD_HELD):
                        queued_reasons.add(d.error or "")

        service = _service(cfg)
        sampler = threading.Thread(target=sample)
        sampler.start()
        service.start()
        try:
            for i in range(6):
                write_dataset(drop / f"s{i}", {"note.txt": f"subject {i}\n"})
            wait_for(lambda: len(journal.datasets()) == 6 and all(d.final for d in journal.datasets()),
                     timeout=60, what="six datasets done")  # fmt: skip
        finally:
            stop.set()
            sampler.join()
            service.stop()
    rows = journal.datasets()
    assert all(d.stage == "done" for d in rows), [d.error for d in rows]
    # one running + one finishing (mirror/cleanup) + two uploaded ahead; six without the gate
    assert 1 <= peak[0] <= 4, peak[0]
    assert queued_reasons and all("upload_ahead: 2" in r for r in queued_reasons)
    assert not any((d.error or "").startswith(UPLOAD_HELD) for d in rows)
