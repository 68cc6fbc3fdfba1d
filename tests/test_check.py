"""``vip-agent check`` through the real CLI, on datasets mirrored from the local VIP server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from agenthelpers import run_agent, tree, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip

FILESTATS = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt"}}


def test_check_reports_missing_and_changed_outputs_without_touching_them(
    tmp_path: Path, vip_server: LocalVip
) -> None:
    state, out = tmp_path / "state", tmp_path / "out"
    common: dict[str, Any] = {"api_key": vip_server.api_key, "cwd": tmp_path}
    for name, job in (("arch", FILESTATS), ("raw", {**FILESTATS, "extract": False}), ("keep", FILESTATS)):
        ds = write_dataset(tmp_path / "drop" / name, {"data.txt": f"{name} one two\n"}, job)
        done = run_agent("run", str(ds), "--server", vip_server.url, "--state", str(state),
                         "--output", str(out), "--poll", "0.1", **common)  # fmt: skip
        assert done.returncode == 0, done.stderr
    fine = run_agent("check", "--state", str(state), **common)
    assert fine.returncode == 0 and fine.stdout == "", fine.stdout + fine.stderr
    assert "everything matches: 3 dataset(s), 3 mirrored output(s)" in fine.stderr

    journal = Journal.in_state_dir(state)
    by_name = {d.name: d for d in journal.datasets()}
    (extracted,) = [o.extracted_to for o in journal.outputs(by_name["arch"].id)]
    assert extracted and Path(extracted).is_dir()
    shutil.rmtree(extracted)  # an extracted result deleted by hand
    (raw,) = journal.outputs(by_name["raw"].id)
    assert raw.extracted == 0 and raw.size
    with open(raw.local, "ab") as fh:  # an archive kept as mirrored, then changed
        fh.write(b"junk")
    before = tree(out)

    found = run_agent("check", "--all", "--state", str(state), **common)
    assert found.returncode == 1, found.stdout + found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 2, lines  # one line per problem
    assert lines[0].startswith(f"arch #{by_name['arch'].id}: missing: {extracted}"), lines
    assert lines[1] == (
        f"raw #{by_name['raw'].id}: changed: {raw.local}: {raw.size + 4:,} bytes, "
        f"the mirrored file had {raw.size:,} bytes"
    ), lines
    assert "2 problem(s) in 2 of 3 dataset(s) checked" in found.stderr
    assert tree(out) == before  # read only: nothing fixed, created or removed

    one = run_agent("check", "keep", "--state", str(state), **common)
    assert one.returncode == 0, one.stdout + one.stderr
    as_json = run_agent("check", f"#{by_name['raw'].id}", "--json", "--state", str(state), **common)
    assert as_json.returncode == 1
    (doc,) = json.loads(as_json.stdout)
    assert doc["name"] == "raw" and not doc["ok"] and doc["problems"][0]["kind"] == "changed"
    assert doc["problems"][0]["path"] == raw.local and doc["checked_files"] == 1

    shutil.rmtree(by_name["keep"].output_dir or "")
    gone = run_agent("check", "keep", "--state", str(state), **common)
    assert gone.returncode == 1 and "missing: the output folder" in gone.stdout, gone.stdout

    # usage errors and a state folder without a journal: exit 2
    both = run_agent("check", "keep", "--all", "--state", str(state), **common)
    assert both.returncode == 2 and "not both" in both.stderr
    unknown = run_agent("check", "nope", "--state", str(state), **common)
    assert unknown.returncode == 2 and "no dataset named 'nope'" in unknown.stderr
    empty = run_agent("check", "--state", str(tmp_path / "nothing"), **common)
    assert empty.returncode == 2 and "no journal" in empty.stderr
