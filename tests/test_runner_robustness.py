"""Bad things the runner meets over HTTP: hostile archives, a full disk, secrets."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agenthelpers import drive, run_agent, start_runner, tmpfs, write_dataset

from agent.backend import open_backend
from agent.journal import Journal
from agent.localvip import LocalVip
from agent.runner import Runner


def _runner(
    tmp_path: Path, server: LocalVip, dataset: Path, output_root: Path | None = None
) -> tuple[Journal, int, Runner]:
    s = start_runner(tmp_path, dataset, server, client_options={"backoff": 0.05},
                     output_root=output_root, poll_min=0.1, poll_max=0.5,
                     retry_base=0.1, capacity_wait=0.1)  # fmt: skip
    return s.journal, s.dataset_id, s.runner


# capacity refusals at launch: test_runner_memory.py (no HTTP needed)


HOSTILE_PIPELINE = {
    "name": "Hostile",
    "tool-version": "1.0",
    "description": "Emits a tarball that tries to escape its folder.",
    "schema-version": "0.5",
    "command-line": '"$PYTHON" "$DESCRIPTOR_DIR/hostile.py" [INPUT] [OUT]',
    "inputs": [{"id": "input", "name": "Input", "type": "File", "value-key": "[INPUT]"}],
    "output-files": [
        {"id": "out", "name": "Archive", "path-template": "evil.tgz", "value-key": "[OUT]"}
    ],
}
HOSTILE_SCRIPT = '''
import io, sys, tarfile
with tarfile.open(sys.argv[2], "w:gz") as tar:
    for name, data in (("fine.txt", b"fine"), ("../../escaped.txt", b"escaped")):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
'''


def test_hostile_tarball_from_the_server_is_kept_not_extracted(tmp_path: Path) -> None:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "Hostile.json").write_text(json.dumps(HOSTILE_PIPELINE))
    (pipelines / "hostile.py").write_text(HOSTILE_SCRIPT)
    with LocalVip(tmp_path / "root", pipelines_dir=pipelines) as server:
        ds = write_dataset(tmp_path / "drop" / "evil-1", {"a.txt": "a\n"},
                           {"pipeline": "Hostile/1.0", "inputs": {"input": "a.txt"}})
        journal, dataset_id, runner = _runner(tmp_path, server, ds)
        assert runner.run(dataset_id).stage == "failed"
        row = journal.get(dataset_id)
        assert "evil.tgz" in (row.error or "") and "not extracted" in (row.error or "")
        assert any("../../escaped.txt" in e.message for e in journal.events(dataset_id))
        archive = next(Path(row.output_dir or "").rglob("evil.tgz"))
        assert archive.is_file()  # kept as downloaded, for the user to inspect
        assert not list(tmp_path.rglob("escaped.txt"))
        # the mirror was complete, so the server was still cleaned
        assert not open_backend(server.url, server.api_key).storage.exists(row.remote_root or "/x")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB filesystem (tmpfs). Needs root and mount rights: skipped otherwise."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    with tmpfs(mount, "size=1m", "cannot mount a small tmpfs here (needs root): full-disk test not run"):
        yield mount


def test_full_disk_waits_and_resumes_without_losing_anything(
    tmp_path: Path, vip_server: LocalVip, small_disk: Path
) -> None:
    vip_server.max_download = 50_000_000
    payload = os.urandom(1_500_000)  # the result (~1.5 MB) does not fit in 1 MB
    ds = write_dataset(tmp_path / "drop" / "full-1", {"a.bin": payload},
                       {"pipeline": "ConcatFiles/1.0",
                        "inputs": {"files": ["a.bin"], "output_name": "big"}})
    journal, dataset_id, runner = _runner(tmp_path, vip_server, ds, output_root=small_disk)
    outcome = drive(runner, dataset_id, until=lambda o: o.stage == "mirror" and bool(o.retry_after))
    assert not outcome.final, journal.get(dataset_id).error
    row = journal.get(dataset_id)
    assert row.stage == "mirror" and row.state == "downloading"
    assert "disk is full" in (row.error or "")
    assert not list(small_disk.rglob("*.part"))  # no half file left to fill the disk
    # the operator frees space (here: grows the filesystem); the dataset resumes
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    assert runner.run(dataset_id).stage == "done", journal.get(dataset_id).error
    out = Path(journal.get(dataset_id).output_dir or "")
    (joined,) = out.rglob("concatenated.txt")
    assert joined.read_bytes() == payload


def test_api_key_is_nowhere_after_a_run(tmp_path: Path) -> None:
    key = "sEcReT-" + os.urandom(12).hex()
    with LocalVip(tmp_path / "root", api_keys=[key]) as server:
        ds = write_dataset(tmp_path / "drop" / "leak-1", {"a.txt": "a\n"},
                           {"pipeline": "FileStats/1.0", "inputs": {"input_file": "a.txt"}})
        result = run_agent("run", str(ds), "--server", server.url, "--state",
                           str(tmp_path / "state"), "--output", str(tmp_path / "out"),
                           api_key=key, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr
    for folder in (tmp_path / "state", tmp_path / "out", tmp_path / "drop"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path
    # the server's own job processes never saw it either (their logs were mirrored)
    logs = list((tmp_path / "out").rglob("logs/**/*.txt"))
    assert logs and all(key not in p.read_text() for p in logs)


def test_archive_members_stay_inside_the_output_folder(tmp_path: Path) -> None:
    """A direct check of the promise "nothing from the network lands outside the output"."""
    from agent.extract import UnsafeArchiveError, safe_extract

    out = tmp_path / "out"
    out.mkdir()
    archive = out / "x.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc"
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive)
    assert [p.name for p in out.iterdir()] == ["x.tgz"]
