"""Hostile and unlucky input: job.yaml bombs, unbounded runs and jobs, unreadable datasets.

Every refusal is exit 2 with a message and no traceback, through the real CLI; the
bombs are measured on the child process itself (time and peak RSS from ``wait4``).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from agenthelpers import agent_env, run_agent, wait_for, write_dataset

from agent import dataset as dataset_mod
from agent.config import Limits, parse_config
from agent.errors import ValidationError
from agent.localvip import LocalVip

JOB = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "a.txt"}}


def _alias_bomb() -> str:
    text = 'pipeline: FileStats/1.0\na: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for name in "bcdefghi":  # 9**9 values once expanded
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text + "inputs:\n  input_file: *i\n"


HOSTILE = {
    "alias-bomb": (_alias_bomb(), "aliases"),
    "deep-list": ("pipeline: FileStats/1.0\ninputs:\n  input_file: " + "[" * 100_000 + "]" * 100_000 + "\n",
                  "nested more than"),
    "nul-in-path": ('pipeline: FileStats/1.0\ninputs:\n  input_file: "a.txt\\0/../../etc/passwd"\n',
                    "NUL character"),
    "self-reference": ("pipeline: FileStats/1.0\nx: &x [1, *x]\ninputs:\n  input_file: a.txt\n",
                       "refers to the value that contains it"),
    "too-large": ("pipeline: FileStats/1.0\ninputs:\n  input_file: a.txt\n" + "# padding\n" * 40_000,
                  "larger than"),
}  # fmt: skip


def _measured(args: list[str], cwd: Path) -> tuple[int, str, float, float]:
    """Run ``vip-agent ARGS``; (exit code, stderr, seconds, peak RSS in MB of that child)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=cwd, env=agent_env("k"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        if proc.poll() is None and proc.returncode is None:
            proc.kill()
    seconds = time.monotonic() - start
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    return os.waitstatus_to_exitcode(status), err, seconds, usage.ru_maxrss / 1024


@pytest.mark.parametrize(("case", "mode"), [(c, "--dry-run") for c in sorted(HOSTILE)] + [("alias-bomb", "run")])
def test_hostile_job_yaml_is_exit_2_fast_and_small(tmp_path: Path, case: str, mode: str) -> None:
    text, words = HOSTILE[case]
    ds = write_dataset(tmp_path / case, {"a.txt": "x\n"})
    (ds / "job.yaml").write_text(text, encoding="utf-8")
    args = ["run", str(ds), "--server", "http://127.0.0.1:9", "--state", str(tmp_path / "state")]
    code, err, seconds, rss_mb = _measured(args + ([mode] if mode.startswith("--") else []), tmp_path)
    assert code == 2, err
    assert words in err and "Traceback" not in err, err
    assert seconds < 10 and rss_mb < 200, (seconds, rss_mb)


def test_runs_and_job_count_have_maxima(tmp_path: Path, vip_server: LocalVip) -> None:
    def run(job: dict[str, object], *extra: str) -> subprocess.CompletedProcess[str]:
        ds = write_dataset(tmp_path / f"d{len(list(tmp_path.iterdir()))}",
                           {f"f{i:02}.txt": f"{i}\n" for i in range(30)}, job)  # fmt: skip
        return run_agent("run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "s"),
                         *extra, api_key=vip_server.api_key, cwd=tmp_path, timeout=30)  # fmt: skip

    files = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "f00.txt"}}
    start = time.monotonic()
    huge = run({**files, "runs": 1_000_000_000}, "--dry-run")
    assert huge.returncode == 2 and "more than the 100 runs" in huge.stdout, huge.stdout
    assert len(huge.stdout.splitlines()) < 10 and time.monotonic() - start < 10
    many = run({**files, "runs": 100_000})  # not a warning that goes on launching
    assert many.returncode == 2 and "more than the 100 runs" in many.stderr
    assert vip_server.state.running() == 0 and not list_executions(vip_server)
    assert run({**files, "runs": 4}, "--max-runs", "3", "--dry-run").returncode == 2
    glob = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "*.txt"}}  # 30 jobs per run
    refused = run({**glob, "runs": 2}, "--max-jobs", "50", "--dry-run")
    assert refused.returncode == 2 and "would create 60 jobs" in refused.stdout, refused.stdout
    # within the limits, the dry run summarises instead of listing everything
    ok = run({**glob, "runs": 40}, "--max-jobs", "1200", "--dry-run")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "... and 10 more file(s)" in ok.stdout and "... and 20 more execution(s)" in ok.stdout
    assert "executions: 40 (1 variant(s) x 40 run(s)), 1200 job(s)" in ok.stdout
    assert len(ok.stdout.splitlines()) < 100


def list_executions(server: LocalVip) -> list[object]:
    import requests

    got = requests.get(f"{server.url}/rest/executions", headers={"apikey": server.api_key}, timeout=10)
    got.raise_for_status()
    return list(got.json())


def test_agent_yaml_max_runs_and_jobs(tmp_path: Path) -> None:
    config = parse_config({"drops": [{"path": "d", "output": "o", "max_runs": 5, "max_jobs": 7}]},
                          base=tmp_path)  # fmt: skip
    assert config.drops[0].limits.max_runs == 5 and config.drops[0].limits.max_jobs == 7
    assert config.drops[0].limits.extract_max_ratio == 200
    assert Limits().max_runs == 100 and Limits().max_jobs == 1000


# -- the dataset on disk ------------------------------------------------------------------


def test_symlink_loop_and_folder_link_are_named_exit_2(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "loop", {"a.txt": "x\n", "sub/b.txt": "y\n"}, JOB)
    (ds / "l1").symlink_to("l2")
    (ds / "l2").symlink_to("l1")
    (ds / "outside").symlink_to(tmp_path)
    done = run_agent("run", str(ds), "--dry-run", "--server", "http://127.0.0.1:9", api_key="k",
                     cwd=tmp_path, timeout=30)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "cannot read l1" in done.stderr and "loop of symbolic links" in done.stderr
    assert "cannot read outside" in done.stderr and "links to folders are not followed" in done.stderr


def test_unreadable_reasons_in_words() -> None:
    # root reads everything here, so permission denied cannot be made real: the wording is
    # checked on the error the OS would give
    assert "permission denied" in dataset_mod.why_unreadable(PermissionError(errno.EACCES, "x"))
    scan = dataset_mod.DatasetScan(Path("/d"), (), (), unreadable=(("f", "why"),))
    with pytest.raises(ValidationError, match="cannot read f in /d: why"):
        scan.raise_if_unreadable()
    assert scan.fingerprint != dataset_mod.DatasetScan(Path("/d"), (), ()).fingerprint


def test_symlink_loop_under_watch_fails_that_dataset_only(tmp_path: Path, vip_server: LocalVip) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "job.yaml").write_text(yaml.safe_dump(JOB))
    bad = write_dataset(tmp_path / "stage" / "bad", {"a.txt": "x\n"})
    (bad / "l1").symlink_to("l2")
    (bad / "l2").symlink_to("l1")
    write_dataset(tmp_path / "stage" / "good", {"a.txt": "y\n"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "watch", str(drop), "--server", vip_server.url,
         "--output", str(tmp_path / "out"), "--state", str(tmp_path / "state"), "--settle", "0.3"],
        cwd=tmp_path, env=agent_env(vip_server.api_key), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        (tmp_path / "stage" / "bad").rename(drop / "bad")
        (tmp_path / "stage" / "good").rename(drop / "good")
        from agent.journal import Journal

        journal = Journal.in_state_dir(tmp_path / "state")
        wait_for(lambda: len(journal.datasets()) == 2 and all(d.final for d in journal.datasets()),
                 timeout=60)  # fmt: skip
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    rows = {d.name: d for d in journal.datasets()}
    assert rows["good"].stage == "done", rows["good"].error
    assert rows["bad"].stage == "failed" and "loop of symbolic links" in (rows["bad"].error or "")
    assert "loop of symbolic links" in (drop / "bad" / "ERROR.txt").read_text()
    assert "Traceback" not in err


def test_alias_bomb_under_the_runner_fails_that_dataset_fast(tmp_path: Path) -> None:
    """Under ``watch`` the bomb stuck the dataset in validating (914 MB): now it fails, named."""
    from agent.journal import Journal
    from agent.runner import Runner, admit

    ds = write_dataset(tmp_path / "bomb", {"a.txt": "x\n"})
    (ds / "job.yaml").write_text(HOSTILE["alias-bomb"][0], encoding="utf-8")
    journal = Journal.in_state_dir(tmp_path / "state")
    i = admit(journal, ds, server="http://127.0.0.1:9", output_root=tmp_path / "out",
              fingerprint=dataset_mod.scan(ds).fingerprint, name="bomb")  # fmt: skip

    def no_server(url: str) -> object:
        raise AssertionError("the job file is refused before the server is asked")

    start = time.monotonic()
    outcome = Runner(journal, no_server).step(i)  # type: ignore[arg-type]
    assert outcome.stage == "failed" and time.monotonic() - start < 5
    assert "aliases" in (journal.get(i).error or "")
