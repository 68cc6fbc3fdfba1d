"""Screenshots of the status page in a real headless Chromium, on a real (local) run.

A local VIP server, a watch service with its page on a free loopback port, a handful
of datasets (done, failed, one uploading slowly because the server delays every upload),
then Debian's Chromium takes `benchmarks/results/status-page.png` (the overview) and
`benchmarks/results/status-page-detail.png` (the failed dataset). About 20 seconds.

    .venv/bin/python benchmarks/screenshot.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from agenthelpers import wait_for, write_dataset  # noqa: E402
from webhelpers import chromium, make_drop, page_service  # noqa: E402

from agent.journal import Journal  # noqa: E402
from agent.localvip import LocalVip  # noqa: E402


def fit(browser: Any) -> None:
    """Make the window as tall as the page, so that the screenshot shows all of it."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1360, "height": min(2400, int(height)), "deviceScaleFactor": 1, "mobile": False,
    })  # fmt: skip
    time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vip-agent-bench-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        server = LocalVip(root / "vip")
        server.start()
        os.environ["VIP_API_KEY"] = server.api_key  # this process only: the service reads it
        drop = make_drop(root)
        service = page_service(root, server.url, drop, transfer_parallelism=2)
        service.start()
        journal = Journal.in_state_dir(root / "state")
        browser = None
        try:
            for i, text in enumerate(["alpha\n" * 2000, "beta\n" * 50, "gamma\n" * 900], start=1):
                write_dataset(drop / f"mri-2026-11-0{i}", {"data.txt": text})
                wait_for(lambda n=i: sum(d.stage == "done" for d in journal.datasets()) >= n, timeout=60)
            write_dataset(drop / "mri-2026-11-04-typo", {"date.txt": "typo in the file name\n"})
            wait_for(lambda: any(d.stage == "failed" for d in journal.datasets()), timeout=30)
            page = (root / "state" / "http-url").read_text().strip()
            browser = chromium(root / "profile", width=1360, height=1180)
            browser.get(page)
            # the next upload crawls: the server waits 1 s before taking each of 16 files, 2 at a time
            server.faults.latency = 1.0
            server.faults.match = r"^/rest/path/"
            server.faults.methods = frozenset({"PUT"})
            files = {f"slice-{k:02d}.dat": os.urandom(400_000) for k in range(16)}
            concat = {"pipeline": "ConcatFiles/1.0", "inputs": {"files": "slice-*.dat", "input_file": None}}
            write_dataset(drop / "mri-2026-11-05-series", files, job=concat)
            write_dataset(drop / "mri-2026-11-06", {"data.txt": "queued behind the series\n"})
            wait_for(lambda: browser.execute_script(
                "const b = document.querySelector('#datasets tr[data-state=uploading] .bar span');"
                "const w = b ? parseFloat(b.style.width) : 0;"
                "return w > 20 && w < 90 && document.querySelector('#gantt svg') !== null"
            ), timeout=60, interval=0.1)  # fmt: skip
            time.sleep(1.2)  # one more refresh, so that the rate and ETA have two samples
            fit(browser)
            browser.save_screenshot(str(args.out / "status-page.png"))
            failed = next(d for d in journal.datasets() if d.stage == "failed")
            browser.get(f"{page}#/dataset/{failed.id}")
            wait_for(lambda: browser.execute_script(
                "return document.querySelector('#d-error') && !document.querySelector('#d-error').hidden"
            ), timeout=20)  # fmt: skip
            fit(browser)
            browser.save_screenshot(str(args.out / "status-page-detail.png"))
            print(args.out / "status-page.png")
            print(args.out / "status-page-detail.png")
        finally:
            if browser is not None:
                browser.quit()
            server.faults.latency = 0.0
            service.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
