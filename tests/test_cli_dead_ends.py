"""The CLI without dead ends (issue 8 item 4), through the real `vip-agent` process and agent/localvip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from agenthelpers import agent_env, run_agent, wait_for, write_dataset

from agent.journal import Journal
from agent.localvip import LocalVip

FILESTATS = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt", "count_words": True}}


def run_closed_pipe(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``vip-agent ARGS`` with stdout a pipe nobody reads any more (`| head -0`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args], stdout=write_end, stderr=subprocess.PIPE,
            env=env, cwd=cwd, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(write_end)


def test_closed_pipe_exits_quietly(tmp_path: Path, vip_server: LocalVip) -> None:
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    for i in range(3):
        journal.add_dataset(name=f"d{i}", path=f"/drop/d{i}", server=vip_server.url, output_root="/o",
                            stage="done")  # fmt: skip
    env = agent_env(vip_server.api_key)
    for args in (
        ("status", "--state", str(state)),
        ("status", "--json", "--state", str(state)),
        ("status", "#1", "--state", str(state)),
        ("pipelines", "--server", vip_server.url),
        ("doctor", "--server", vip_server.url),
        ("--help",),
    ):
        result = run_closed_pipe(*args, env=env, cwd=tmp_path)
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, (args, result.stderr)
        # 141 = 128 + SIGPIPE, as a shell reports `yes | head -1`; argparse itself ignores the pipe
        assert result.returncode == (0 if args == ("--help",) else 141), (args, result.returncode)
    # the everyday form, through a shell and head
    shell = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m agent status --json --state {state} | head -1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shell.stdout == "[\n" and "Traceback" not in shell.stderr


def test_unknown_input_name_is_an_error(tmp_path: Path, vip_server: LocalVip) -> None:
    job = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt", "count_word": True}}
    ds = write_dataset(tmp_path / "typo", {"data.txt": "a b\n"}, job)
    result = run_agent("run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
                       "--output", str(tmp_path / "out"), api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "input 'count_word' is not a parameter of FileStats/1.0 (did you mean 'count_words'?)" in result.stderr
    assert vip_server.state.running() == 0
    dry = run_agent("run", str(ds), "--dry-run", "--server", vip_server.url,
                    api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert dry.returncode == 2 and "did you mean 'count_words'?" in dry.stdout


def test_unknown_pipeline_exit_2_with_closest_names(tmp_path: Path, vip_server: LocalVip) -> None:
    listing = run_agent("pipelines", "FileStat/1.0", "--server", vip_server.url,
                        api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert listing.returncode == 2 and "Closest: FileStats/1.0" in listing.stderr
    ds = write_dataset(tmp_path / "p", {"data.txt": "x\n"}, {**FILESTATS, "pipeline": "FileStat/1.0"})
    dry = run_agent("run", str(ds), "--dry-run", "--server", vip_server.url,
                    api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert dry.returncode == 2 and "(closest: 'FileStats/1.0'" in dry.stdout
    real = run_agent("run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
                     "--output", str(tmp_path / "out"), api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert real.returncode == 2 and "(closest: 'FileStats/1.0'" in real.stderr


def test_status_table_ids_and_wrapped_errors(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    error = ("the dataset cannot be run:\n  - input 'count_word' is not a parameter of FileStats/1.0 "
             "(did you mean 'count_words'?); its inputs are: count_words, input_file, label; the end")  # fmt: skip
    first = journal.add_dataset(name="scan", path="/a/scan", server="http://x:1", output_root="/o",
                                stage="failed", error=error)  # fmt: skip
    second = journal.add_dataset(name="scan", path="/b/scan", server="http://x:1", output_root="/o",
                                 stage="done")  # fmt: skip
    result = run_agent("status", "--state", str(state), api_key="k", cwd=tmp_path, COLUMNS="80")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["ID", "NAME", "STATE"]
    assert all(len(line) <= 80 for line in lines[1:]), lines
    rows = [line for line in lines if line.startswith("#")]
    assert [r.split()[:3] for r in rows] == [[f"#{first}", "scan", "failed"], [f"#{second}", "scan", "done"]]
    # nothing of the error is cut: its words are all there, in order, wrapped over lines
    start = lines.index(rows[0])
    shown = " ".join(line.strip() for line in lines[start:] if not line.startswith(f"#{second}"))
    assert "(did you mean 'count_words'?); its inputs are: count_words, input_file, label; the end" in shown


def test_status_detail_and_logs(tmp_path: Path, vip_server: LocalVip) -> None:
    state = tmp_path / "state"
    ds = write_dataset(tmp_path / "drop" / "sample", {"data.txt": "one two\nthree\n"}, FILESTATS)
    common = {"api_key": vip_server.api_key, "cwd": tmp_path}
    done = run_agent("run", str(ds), "--server", vip_server.url, "--state", str(state),
                     "--output", str(tmp_path / "out"), "--poll", "0.1", **common)  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = json.loads(run_agent("status", "sample", "--json", "--state", str(state), **common).stdout)
    assert isinstance(info, dict) and info["name"] == "sample" and info["state"] == "done"
    assert isinstance(info["id"], int) and info["error"] is None and info["executions"]
    assert info["output"] == done.stdout.strip().splitlines()[-1]
    assert all(set(ev) >= {"time", "message"} for ev in info["events"]) and info["events"]
    stages = [s["state"] for s in info["stages"]]
    assert stages[0] == "validating" and stages[-1] == "done" and "running" in stages
    assert all(s["end"] is not None and s["end"] >= s["start"] for s in info["stages"])
    assert info["runs"][0]["status"] == "Finished" and info["outputs"][0]["downloaded"]
    assert any(p.endswith("stdout.txt") for p in info["logs"]) and all(Path(p).is_file() for p in info["logs"])
    # by #ID, as text
    text = run_agent("status", f"#{info['id']}", "--state", str(state), **common).stdout
    assert text.startswith(f"#{info['id']} sample: done") and "stages:" in text and "Finished" in text
    # logs: every saved file, with its content
    logs = run_agent("logs", f"#{info['id']}", "--state", str(state), **common)
    assert logs.returncode == 0
    stdout_file = next(p for p in info["logs"] if p.endswith("stdout.txt"))
    assert f"==> {stdout_file} <==" in logs.stdout
    assert Path(stdout_file).read_text() in logs.stdout
    # --follow on a finished dataset ends at once
    follow = run_agent("logs", "sample", "--follow", "--state", str(state), timeout=20, **common)
    assert follow.returncode == 0 and f"==> {stdout_file} <==" in follow.stdout
    missing = run_agent("status", "#999", "--json", "--state", str(state), **common)
    assert missing.returncode == 1 and "no dataset with id #999" in missing.stderr


def test_logs_follow_a_running_dataset(tmp_path: Path, vip_server: LocalVip) -> None:
    state = tmp_path / "state"
    ds = write_dataset(tmp_path / "nap", {"note.txt": "n"}, {"pipeline": "Sleep/1.0", "inputs": {"duration": "1.5"}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(ds), "--server", vip_server.url, "--state", str(state),
         "--output", str(tmp_path / "out"), "--poll", "0.1"],
        env=agent_env(vip_server.api_key), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        journal = Journal.in_state_dir(state)
        wait_for(lambda: any(d.stage == "monitor" for d in journal.datasets()), timeout=30)
        follow = run_agent("logs", "nap", "--follow", "--interval", "0.1", "--state", str(state),
                           api_key=vip_server.api_key, cwd=tmp_path, timeout=30)  # fmt: skip
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert follow.returncode == 0, follow.stderr
    # events that happened while following, then the saved logs of the ended execution
    assert "cleaning" in follow.stdout or "clean" in follow.stdout
    assert "stdout.txt <==" in follow.stdout and "stderr.txt <==" in follow.stdout


def test_watch_several_drop_folders(tmp_path: Path, vip_server: LocalVip) -> None:
    drops = [tmp_path / "drop-a", tmp_path / "drop-b"]
    for d in drops:
        d.mkdir()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "watch", *map(str, drops), "--server", vip_server.url,
         "--output", str(tmp_path / "out"), "--state", str(state), "--settle", "0.2"],
        env=agent_env(vip_server.api_key), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        journal = Journal.in_state_dir(state)
        write_dataset(drops[0] / "a1", {"data.txt": "a\n"}, FILESTATS)
        write_dataset(drops[1] / "b1", {"data.txt": "b\n"}, FILESTATS)
        # both taken and launched (the first monitor poll is seconds away: no need to wait for it)
        wait_for(lambda: sorted(d.name for d in journal.datasets() if d.stage in ("monitor", "mirror", "done"))
                 == ["a1", "b1"], timeout=60, what="both datasets launched")  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert all(f"watching {d}" in err for d in drops)
    assert {Path(d.drop_dir or "").name for d in journal.datasets()} == {"drop-a", "drop-b"}


def test_watch_drop_and_config_refused(tmp_path: Path) -> None:
    result = run_agent("watch", "a", "b", "--config", "x.yaml", api_key="k", cwd=tmp_path)
    assert result.returncode == 2 and "not both" in result.stderr


def test_mistyped_option_gets_the_commands_usage(tmp_path: Path) -> None:
    done = run_agent("status", "--jsno", api_key="k", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: vip-agent status ")  # before: the top-level usage
    assert "unrecognized arguments: --jsno (did you mean '--json'?)" in done.stderr


def test_mistyped_command_gets_did_you_mean(tmp_path: Path) -> None:
    done = run_agent("stauts", api_key="k", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown command 'stauts' (did you mean 'status'?)" in done.stderr
    assert "invalid choice" not in done.stderr


def test_status_of_a_state_folder_without_journal(tmp_path: Path) -> None:
    done = run_agent("status", "--state", str(tmp_path / "typo"), api_key="k", cwd=tmp_path)
    assert done.returncode == 1  # before: "no datasets yet", exit 0
    assert f"the state folder {tmp_path / 'typo'} does not exist" in done.stderr


def test_unexpected_error_is_one_line_and_an_exit_code(tmp_path: Path) -> None:
    # a bug inside a command (simulated: its main raises) reaches the user as one line
    code = ("import sys, agent.commands.status as s\n"
            "def boom(args):\n    raise KeyError('k-' + 'x' * 3)\n"
            "s.main = boom\nfrom agent.cli import main\nsys.exit(main(['status']))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=agent_env("k"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 70
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "vip-agent: unexpected error: KeyError: 'k-xxx' (this is a bug; please report it with the "
        "command you ran. VIP_AGENT_DEBUG=1 shows where it happened)"
    ]
