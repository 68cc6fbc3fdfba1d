"""The status page in a real headless Chromium (Debian's chromium + chromium-driver, selenium).

One page load for the whole story: a dataset is seen uploading then done, a failed one
shows its full error, and Retry (with the token typed into the page's form) sends it
again; the page follows every change by itself, never reloading.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthelpers import wait_for, write_dataset
from webhelpers import (
    TEMPLATE,
    Page,
    headless_chromium,
    make_drop,
    page_service,
)

from agent.journal import Journal
from agent.localvip import LocalVip


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path) as driver:
        yield driver


def js(browser: Any, script: str) -> Any:
    return browser.execute_script(script)


def act(browser: Any, element_id: str, action: str, *args: Any) -> None:
    """Find the element and act on it, again if the page redrew it in between (live updates)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt() -> bool:
        try:
            getattr(browser.find_element("id", element_id), action)(*args)
        except StaleElementReferenceException:
            return False
        return True

    wait_for(attempt, timeout=10, what=f"{action} on #{element_id}")


def row_state(browser: Any, name: str) -> str | None:
    return js(browser, f"""
        const a = [...document.querySelectorAll('#datasets tbody tr')]
          .find((tr) => tr.querySelector('td.name')?.textContent === {name!r});
        return a ? a.dataset.state : null;""")  # fmt: skip


def test_page_follows_datasets_and_retries_with_the_token(
    tmp_path: Path, vip_server: LocalVip, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path)
    service = page_service(tmp_path, vip_server.url, drop)
    service.start()
    journal = Journal.in_state_dir(tmp_path / "state")
    try:
        page = Page(tmp_path / "state")
        browser.get(page.url)
        wait_for(lambda: js(browser, "return document.querySelector('#conn').dataset.ok === '1'"),
                 timeout=15, what="page live")  # fmt: skip
        js(browser, "window.loadedOnce = 'yes'")  # lost if the page ever reloads

        # uploading, seen while the server holds every upload for a while, then done
        vip_server.faults.latency = 1.5
        vip_server.faults.match = r"^/rest/path/"
        vip_server.faults.methods = frozenset({"PUT"})
        write_dataset(drop / "scan-slow", {"data.txt": "slow\n" * 1000})
        wait_for(lambda: row_state(browser, "scan-slow") == "uploading", timeout=30, interval=0.05,
                 what="row shows uploading")  # fmt: skip
        vip_server.faults.latency = 0.0
        wait_for(lambda: row_state(browser, "scan-slow") == "done", timeout=30, what="row shows done")

        # a failed dataset: its whole error, every line, in its row
        write_dataset(drop / "scan-typo", {"date.txt": "typo\n"})
        wait_for(lambda: row_state(browser, "scan-typo") == "failed", timeout=30, what="row shows failed")
        (failed,) = [d for d in journal.datasets() if d.name == "scan-typo"]
        assert failed.error and "\n" in failed.error
        shown = js(browser, f"return document.querySelector('tr[data-id=\"{failed.id}\"] td.error').innerText")
        assert shown.strip() == failed.error.strip()
        assert "(did you mean 'date.txt'?)" in shown

        # filter and sort, on the page itself
        act(browser, "filter", "send_keys", "did you mean")
        wait_for(lambda: js(browser, "return [...document.querySelectorAll('#datasets tbody tr')]"
                                     ".map((tr) => tr.dataset.state)") == ["failed"], timeout=5)  # fmt: skip
        js(browser, "const f = document.querySelector('#filter'); f.value = ''; f.dispatchEvent(new Event('input'))")
        js(browser, "document.querySelector('#datasets th[data-sort=name]').click()")
        names = js(browser, "return [...document.querySelectorAll('#datasets td.name')].map((td) => td.textContent)")
        assert names == ["scan-slow", "scan-typo"]
        js(browser, "document.querySelector('#datasets th[data-sort=name]').click()")
        names = js(browser, "return [...document.querySelectorAll('#datasets td.name')].map((td) => td.textContent)")
        assert names == ["scan-typo", "scan-slow"]

        # fix the drop folder's job.yaml (editing the dataset itself would make it a new run),
        # open the dataset, Retry: the page asks for the token (a wrong one is refused)
        (drop / "job.yaml").write_text(yaml.safe_dump({**TEMPLATE, "inputs": {"input_file": "*.txt"}}))
        # (the table is redrawn 4 times a second: click the link from script, not by position)
        js(browser, f"document.querySelector('tr[data-id=\"{failed.id}\"] td.name a').click()")
        wait_for(lambda: js(browser, "return location.hash") == f"#/dataset/{failed.id}", timeout=5)
        wait_for(lambda: js(browser, "return !document.querySelector('#view-dataset').hidden"
                            " && document.querySelector('#d-name').textContent === 'scan-typo'"
                            " && !document.querySelector('#act-retry').disabled"), timeout=10)  # fmt: skip
        act(browser, "act-retry", "click")
        wait_for(lambda: js(browser, "return document.querySelector('#token-dialog').open"), timeout=5)
        act(browser, "token-input", "send_keys", "wrong-token")
        act(browser, "token-save", "click")
        wait_for(lambda: "refused" in js(browser, "return document.querySelector('#toast').textContent"),
                 timeout=10, what="wrong token refused")  # fmt: skip
        wait_for(lambda: js(browser, "return document.querySelector('#token-dialog').open"), timeout=5)
        assert journal.get(failed.id).attempts == 0
        act(browser, "token-input", "send_keys", page.token)
        act(browser, "token-save", "click")
        wait_for(lambda: journal.get(failed.id).attempts == 1, timeout=10, what="retry recorded")
        wait_for(lambda: js(browser, "return document.querySelector('#d-state').dataset.state") == "done",
                 timeout=30, what="detail shows done")  # fmt: skip
        assert js(browser, "return document.querySelector('#d-error').hidden")
        assert js(browser, "return window.loadedOnce") == "yes"  # updated in place, never reloaded
        assert js(browser, "return document.querySelectorAll('#d-execs tbody tr td.mono').length") >= 1
        segments = js(browser, "return [...document.querySelectorAll('#d-stages .seg b')].map((b) => b.textContent)")
        assert segments[:3] == ["validate", "upload", "queue"] and "run" in segments
        logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not [e for e in logs if "401" not in e.get("message", "")], logs  # no script error, no CSP refusal
    finally:
        vip_server.faults.latency = 0.0
        service.stop()


def old_demo_run(journal: Journal, days: float = 3.0) -> int:
    """A dataset that went through every stage ``days`` ago (a demo run of last week)."""
    ds = journal.add_dataset(name="old-demo", path="/drop/old-demo", server="http://127.0.0.1:9",
                             output_root="/out", fingerprint="fp-old", stage="validate")  # fmt: skip
    for stage in ("upload", "launch", "monitor", "mirror", "cleanup", "done"):
        journal.set_stage(ds, stage, message=f"{stage} (long ago)")
    shift = days * 86400
    with journal._db() as db:
        db.execute("UPDATE events SET time = time - ? WHERE dataset_id = ?", (shift, ds))
        db.execute("UPDATE datasets SET created = created - ?, finished = finished - ?, updated = updated - ?"
                   " WHERE id = ?", (shift, shift, shift, ds))  # fmt: skip
    return ds


def test_page_says_what_queued_rows_wait_for_and_opens_on_recent_work(
    tmp_path: Path, vip_server: LocalVip, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17 #16: a queued row names what it waits for (here the running cap); the
    timeline opens on the last hour (a run of 3 days ago does not set its scale) and
    zooms out on demand; stage labels are whole; the token dialog names the real file."""
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    drop = make_drop(tmp_path, {"pipeline": "Sleep/1.0", "inputs": {"duration": "3"}})
    journal = Journal.in_state_dir(tmp_path / "state")
    old = old_demo_run(journal)
    service = page_service(tmp_path, vip_server.url, drop)  # max_running 1
    service.start()
    try:
        page = Page(tmp_path / "state")
        browser.get(page.url)
        wait_for(lambda: js(browser, "return document.querySelector('#conn').dataset.ok === '1'"),
                 timeout=15, what="page live")  # fmt: skip
        write_dataset(drop / "nap-a", {"note.txt": "a"})
        write_dataset(drop / "nap-b", {"note.txt": "b"})

        def queued_text() -> str | None:
            states = {n: row_state(browser, n) for n in ("nap-a", "nap-b")}
            if sorted(states.values(), key=str) != ["queued", "running"]:
                return None
            name = next(n for n, s in states.items() if s == "queued")
            return str(js(browser, f"""return [...document.querySelectorAll('#datasets tbody tr')]
                .find((tr) => tr.querySelector('td.name')?.textContent === {name!r})
                .querySelector('td.progress').innerText"""))  # fmt: skip

        text = wait_for(queued_text, timeout=30, interval=0.05, what="one running, one queued")
        assert text.startswith("waiting for a free slot: 1 of 1 execution(s) running on 127.0.0.1:"), text
        assert "max_running: 1" in text

        # the timeline: the last hour, the old run hidden until asked for
        def window() -> Any:
            return js(browser, "const g = document.querySelector('#gantt svg');"
                               " return g ? [Number(g.dataset.start), Number(g.dataset.end)] : null")  # fmt: skip

        wait_for(lambda: js(browser, "return document.querySelectorAll('#gantt svg a').length") >= 2, timeout=15)
        start, end = window()
        assert end - start <= 3600 + 5, (start, end)
        assert not js(browser, f"return document.querySelector('#gantt svg a[data-id=\"{old}\"]')")
        assert "1 older dataset hidden" in js(browser, "return document.querySelector('#gantt-window').textContent")
        js(browser, "document.querySelector('#gantt-zoom').click()")
        wait_for(lambda: js(browser, f"return !!document.querySelector('#gantt svg a[data-id=\"{old}\"]')"),
                 timeout=10, what="zoomed out")  # fmt: skip
        assert window()[1] - window()[0] > 2 * 86400

        # the token dialog names the real token file
        act(browser, "token-btn", "click")
        wait_for(lambda: js(browser, "return document.querySelector('#token-dialog').open"), timeout=5)
        assert js(browser, "return document.querySelector('#token-path').textContent") == str(
            tmp_path / "state" / "http-token"
        )
        js(browser, "document.querySelector('#token-dialog').close()")

        # a finished dataset's stages: every label whole (a short download stage included)
        wait_for(lambda: {row_state(browser, n) for n in ("nap-a", "nap-b")} == {"done"}, timeout=40)
        (nap,) = [d for d in journal.datasets() if d.name == "nap-a"]
        js(browser, f"location.hash = '#/dataset/{nap.id}'")
        wait_for(lambda: js(browser, "return document.querySelectorAll('#d-stages .seg b').length") >= 5, timeout=10)
        labels = js(browser, """return [...document.querySelectorAll('#d-stages .seg b')]
            .map((b) => [b.textContent, b.scrollWidth <= b.parentElement.clientWidth])""")  # fmt: skip
        assert "download" in [name for name, _ in labels], labels
        assert all(whole for _, whole in labels), labels
    finally:
        service.stop()
