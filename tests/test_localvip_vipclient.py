"""The official vip-client (0.1.10) drives a whole VipSession against LocalVip."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import requests

from agent.localvip import LocalVip

vip_session = pytest.importorskip("vip_client.classes.VipSession")


def test_vipsession_full_cycle(vip_server: LocalVip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # VipSession writes ./vip_outputs relative to the cwd: keep it in tmp
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "alpha.txt").write_text("one\ntwo\n")
    (data / "beta.txt").write_text("a b c\n")
    VipSession = vip_session.VipSession
    session = VipSession.init(
        api_key=vip_server.api_key, vip_portal_url=vip_server.url, verbose=False,
        session_name="lv-session", input_dir=data, output_dir=tmp_path / "out",
    )
    session.upload_inputs()
    assert (vip_server.home() / "API" / "lv-session" / "INPUTS" / "alpha.txt").read_text() == "one\ntwo\n"
    session.launch_pipeline(
        pipeline_id="FileStats/1.0",
        input_settings={"input_file": [data / "alpha.txt", data / "beta.txt"], "count_words": "true"},
    )
    wids = list(session.workflows)
    assert len(wids) == 1
    session.monitor_workflows(refresh_time=0.2)
    assert session.workflows[wids[0]]["status"] == "Finished"
    session.download_outputs()
    # the client extracts each tarball into a folder named after it
    reports = sorted((tmp_path / "out").rglob("report.json"))
    assert [r.parent.name for r in reports] == ["alpha_stats.tgz", "beta_stats.tgz"]
    alpha = json.loads(reports[0].read_text())
    assert alpha["lines"] == 2 and alpha["size"] == 8 and alpha["words"] == 2
    session.finish(timeout=10)
    r = requests.get(
        f"{vip_server.url}/rest/path/vip/Home/API/lv-session?action=exists",
        headers={"apikey": vip_server.api_key}, timeout=10,
    )
    assert r.json() == {"exists": False}
    assert not (vip_server.home() / "API" / "lv-session").exists()
    assert session.workflows[wids[0]]["status"] == "Removed"
    assert not any(tarfile.is_tarfile(p) for p in (tmp_path / "out").rglob("*.tgz") if p.is_file())
