"""Render ``benchmarks/results/*.json`` as the Markdown tables of the README.

    .venv/bin/python benchmarks/report.py            # print the tables
    .venv/bin/python benchmarks/report.py --update   # rewrite them in benchmarks/README.md

The README's tables sit between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def f(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value == value else "–"


def machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    load = m.get("loadavg_1_5_15")
    return (f"*{m['date']}, {m['cpus']} cores ({m['cpu_model'] or 'unknown CPU'}), {m['mem_gib']} GiB, "
            f"Linux {m['kernel']}, Python {m['versions'].get('python')}"
            + (f", load average at start {load[0]:.2f}" if load else "") + ".*")


def transfer(data: dict[str, Any]) -> list[str]:
    size = data["size_bytes"] / (1 << 20)
    out = [f"### Transfer of one {size:,.0f} MiB file ({data['repeat']} rounds, medians)", "",
           machine_line(data), "",
           "| client | direction | MB/s | MB/s incl. fsync | seconds | peak RSS (MiB) | CPU s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for client, per in data["summary"].items():
        for direction, s in per.items():
            failed = f" ({s['ok']}/{s['runs']} ok)" if s["ok"] != s["runs"] else ""
            out.append(
                f"| {client}{failed} | {direction} | {f(s['median_mb_per_s'], '.0f')} | "
                f"{f(s['median_mb_per_s_incl_fsync'], '.0f')} | {f(s['median_seconds'], '.2f')} | "
                f"{f(s['peak_rss_mib'], '.1f')} | {f(s['median_cpu_s'], '.2f')} |"
            )
    out += ["", "| ratio (vip-agent / other) | direction | speed | speed incl. fsync | peak RSS |",
            "|---|---|---:|---:|---:|"]
    for name, per in data["ratios"].items():
        for direction, r in per.items():
            out.append(f"| {name} | {direction} | ×{f(r['speed'], '.2f')} | "
                       f"×{f(r['speed_incl_fsync'], '.2f')} | ×{f(r['peak_rss'], '.3f')} |")
    return out


def run_memory(data: dict[str, Any]) -> list[str]:
    size = data["input_bytes"] / (1 << 20)
    out = [f"### Whole cycle on a {size:,.0f} MiB input (FileStats/1.0)", "", machine_line(data), "",
           "| client | cycles ok | peak RSS (MiB) | peak RSS (MB) | wall s (each cycle) |",
           "|---|---:|---:|---:|---|"]
    for client, s in data["summary"].items():
        out.append(f"| {client} | {s['ok']}/{s['runs']} | {f(s['peak_rss_mib'], '.1f')} | "
                   f"{f(s['peak_rss_mb'], '.1f')} | {', '.join(f(w, '.1f') for w in s['wall_s'])} |")
    out += ["", f"vip-agent / VipSession peak RSS: **×{data['ratio_peak_rss_agent_over_vipsession']:.3f}**. "
            f"Target ({data['target']}): **{'met' if data['target_met'] else 'NOT met'}**."]
    stages = [r for r in data["samples"] if r["stages_s"]]
    if stages:
        out += ["", "Seconds per stage (first cycle of each):", ""]
        for client in data["summary"]:
            first = next((r for r in stages if r["client"] == client), None)
            if first:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in first["stages_s"].items())
                out.append(f"* {client}: {parts}")
    return out


def watch_latency(data: dict[str, Any]) -> list[str]:
    out = [f"### Watch: upload start after the last write, minus settle S = {data['settle_s']:g} s; idle cost",
           "", machine_line(data), "",
           f"Debounce {data['debounce_s']:g} s; polling interval {data['poll_interval_s']:g} s.", "",
           "| observer | datasets started | latency − S median (s) | min | mean | max | first seen after (median s) "
           "| idle CPU (s / window) | idle CPU (% of a core) | idle RSS (MiB) | peak RSS (MiB) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in data["observers"].items():
        lat = r.get("latency", {})
        st = lat.get("upload_start_minus_settle_s", {})
        seen = lat.get("seen_after_s", {})
        idle = r.get("idle", {})
        out.append(
            f"| {mode} | {lat.get('upload_started', 0)}/{lat.get('datasets', 0)} | {f(st.get('median'), '.2f')} | "
            f"{f(st.get('min'), '.2f')} | {f(st.get('mean'), '.2f')} | {f(st.get('max'), '.2f')} | "
            f"{f(seen.get('median'), '.2f')} | {f(idle.get('cpu_s'), '.2f')} / {f(idle.get('seconds'), '.0f')} s | "
            f"{f(idle.get('cpu_percent_of_one_core'), '.3f')} | {f(idle.get('rss_mib'), '.1f')} | "
            f"{f(r.get('peak_rss_mib'), '.1f')} |"
        )
    out += ["", "CPU times come in 10 ms clock ticks: an idle figure of 0.01–0.03 s is at the "
            "resolution limit (a few wake-ups a minute)."]
    return out


def dicom_ingest(data: dict[str, Any]) -> list[str]:
    quiet = data["quiet_s"]
    return [
        f"### DICOM node: {data['objects']} objects ({data['bytes'] / 1e6:.0f} MB) in one association, "
        f"dcmtk storescu ({data.get('dcmtk_env', '')})", "", machine_line(data), "",
        "| measure | vip-agent | storescp | ratio | goal |", "|---|---:|---:|---:|---:|",
        f"| objects/s into the spool | {f(data['agent_objects_per_s'], '.0f')} | "
        f"{f(data['storescp_objects_per_s'], '.0f')} | {f(data['ratio'], '.2f')} | >= {data['goal_ratio']} |",
        f"| last object -> first upload, deidentify: basic (quiet {quiet:g} s) | "
        f"{f(data['last_object_to_upload_s'], '.2f')} s | | | <= {data['goal_latency_s']:g} s |",
        f"| last object -> first upload, deidentify: none | "
        f"{f(data.get('last_object_to_upload_s_without_deid'), '.2f')} s | | | <= {data['goal_latency_s']:g} s |",
    ]


def latest_run() -> dict[str, Any] | None:
    """``results.json`` of the newest ``python -m benchmarks`` run folder, if any."""
    runs = sorted(RESULTS.glob("run-*/results.json"))
    return json.loads(runs[-1].read_text()) if runs else None


def measured(data: dict[str, Any]) -> list[str]:
    """The run's measures, the ideal server and the production profile side by side."""
    from run_all import Measure, side_by_side

    fields = set(Measure.__dataclass_fields__)
    measures = [Measure(**{k: v for k, v in m.items() if k in fields}) for m in data["measures"]]
    return ["### `python -m benchmarks`: ideal server and production profile", "",
            machine_line(data), "", *side_by_side(measures)]


def download_check(data: dict[str, Any]) -> list[str]:
    out = ["### Download vs curl, two ways of timing (`download_check.py`)", "", machine_line(data), "",
           "| server storage | size | vip-agent inside its process | vip-agent as a process | curl raw "
           "| curl + fsync | curl as a process + fsync | ratio inside | ratio as processes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in data["cases"]:
        out.append(
            f"| {c['storage']} | {c['size_mib']} MiB | {f(c['agent_mb_s_inside'], '.0f')} | "
            f"{f(c['agent_mb_s_process'], '.0f')} | {f(c['curl_mb_s_raw'], '.0f')} | "
            f"{f(c['curl_mb_s_with_fsync'], '.0f')} | {f(c['curl_mb_s_process_with_fsync'], '.0f')} | "
            f"{f(c['ratio_inside'], '.2f')} | {f(c['ratio_process'], '.2f')} |")
    out += ["", "MB/s (10⁶ bytes per second); medians of the timed rounds."]
    return out


def render() -> str:
    parts: list[str] = []
    run = latest_run()
    if run and run.get("measures"):
        parts += measured(run) + [""]
    check = load("download_check")
    if check:
        parts += download_check(check) + [""]
    for name, fn in (("transfer", transfer), ("run_memory", run_memory), ("watch_latency", watch_latency),
                     ("dicom_ingest", dicom_ingest)):
        data = load(name)
        parts += (fn(data) if data else [f"### {name}", "", f"*(no results/{name}.json yet)*"]) + [""]
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the tables in README.md")
    args = parser.parse_args()
    text = render()
    if not args.update:
        print(text, end="")
        return 0
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        print(f"{README} has no {BEGIN} ... {END} section", file=sys.stderr)
        return 1
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    print(f"updated {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
