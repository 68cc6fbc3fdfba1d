"""examples/monitoring: promtool accepts the scrape config and the alert rules (and their unit
tests pass), and every metric the rules and the Grafana dashboard use is one the agent exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from webhelpers import require_tool

from agent.health import DropHealth, Health, ServerHealth
from agent.journal import Journal
from agent.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[1] / "examples" / "monitoring"
PROMTOOL = "/usr/bin/promtool"


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    require_tool(PROMTOOL, "prometheus")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_checks_rules_and_their_unit_tests() -> None:
    out = promtool("check", "rules", "vip-agent-alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout
    out = promtool("test", "rules", "vip-agent-alerts.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    # as installed: the shipped files unchanged, beside the token file they name
    for f in MONITORING.iterdir():
        shutil.copy(f, tmp_path / f.name)
    token = tmp_path / "vip-agent-token"
    token.write_text("same-token-on-every-agent\n")
    token.chmod(0o600)
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "is valid prometheus config file syntax" in out.stdout


def exported_names(tmp_path: Path) -> set[str]:
    journal = Journal.in_state_dir(tmp_path)
    health = Health(
        version="x", started=0.0, state=str(tmp_path), state_free=1,
        drops=[DropHealth("/d", "http://s", "/o", "native", 1, False, 0.0)],
        servers=[ServerHealth("http://s", True, "accepted", None, 0.0)],
    )  # fmt: skip
    text = Metrics(journal, lambda: health).render().decode()
    names = set()
    for m in re.finditer(r"^# TYPE (\w+) (\w+)$", text, re.M):
        name, kind = m.groups()
        names.add(name)
        if kind == "counter":
            names.add(name + "_total")
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def test_rules_and_dashboard_use_only_exported_metrics(tmp_path: Path) -> None:
    names = exported_names(tmp_path)
    assert {"vip_agent_datasets", "vip_agent_failures_total", "vip_agent_stage_duration_seconds_bucket"} <= names
    rules = (MONITORING / "vip-agent-alerts.yml").read_text()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 14 and dashboard["uid"] == "vip-agent-fleet"
    used = set(re.findall(r"\bvip_agent_\w+", rules + "\n".join(exprs)))
    assert used and used <= names, used - names
    for alert in ("VipAgentDatasetFailed", "VipAgentDown", "VipAgentDatasetStuck", "VipAgentDiskLow", "VipAgentKeyRefused"):
        assert f"alert: {alert}" in rules
