"""One composition root (issue 15.4) and one spelling of a server (issue 16), through the real
CLI: agent.yaml, then the environment, then the flags, for every command that talks to VIP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from agenthelpers import agent_env, run_agent, wait_for, write, write_dataset

from agent import settings
from agent.dataset import scan
from agent.errors import ConfigError
from agent.journal import Journal
from agent.localvip import LocalVip
from agent.vip.urls import normalise_server

JOB = {"pipeline": "FileStats/1.0", "inputs": {"input_file": "data.txt", "count_words": "true"}}


def _home(tmp_path: Path) -> dict[str, str]:
    """A fresh user: its per-user agent.yaml lives under this HOME."""
    home = tmp_path / "home"
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_STATE_HOME": str(home / ".local" / "state")}  # fmt: skip


def _agent(tmp_path: Path, *args: str, api_key: str = "") -> subprocess.CompletedProcess[str]:
    """``vip-agent ARGS`` as the user of :func:`_home`."""
    home = tmp_path / "home"
    return run_agent(*args, api_key=api_key, cwd=tmp_path, HOME=str(home),
                     XDG_CONFIG_HOME=str(home / ".config"),
                     XDG_STATE_HOME=str(home / ".local" / "state"))  # fmt: skip


def _key_file(tmp_path: Path, key: str) -> Path:
    path = write(tmp_path / "secret" / "api-key", key + "\n")
    path.chmod(0o600)
    return path


def _init(tmp_path: Path, server: str, key_file: Path) -> Path:
    """`vip-agent init --server X` as a new user runs it, then key_file: added to defaults."""
    done = _agent(tmp_path, "init", "-y", "--server", server, "--drop", str(tmp_path / "drop"),
                  "--output", str(tmp_path / "out"), "--no-doctor")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    config = tmp_path / "home" / ".config" / "vip-agent" / "agent.yaml"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("defaults:", f"defaults:\n  key_file: {key_file}", 1))
    return config


# --------------------------------------------------------------------------- normalise_server


@pytest.mark.parametrize(("url", "canonical"), [
    ("vip.example.org", "https://vip.example.org"),
    ("vip.example.org:8443", "https://vip.example.org:8443"),
    ("https://vip.example.org/", "https://vip.example.org"),
    ("https://vip.example.org/rest/", "https://vip.example.org"),
    ("HTTPS://VIP.example.org:443/rest", "https://vip.example.org"),
    ("http://127.0.0.1:8080/rest", "http://127.0.0.1:8080"),
    ("127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("localhost:8080/rest/", "http://localhost:8080"),
    ("http://[::1]:8080/rest", "http://[::1]:8080"),
    ("https://host.example.org/vip/", "https://host.example.org/vip"),
])  # fmt: skip
def test_normalise_server(url: str, canonical: str) -> None:
    assert normalise_server(url) == canonical
    assert normalise_server(canonical) == canonical


@pytest.mark.parametrize(("url", "why"), [
    ("notaurl", "write http://notaurl if"), ("", "empty"), ("ftp://x.org", "ftp://"),
    ("https://user:pw@x.org", "user name or password"), ("x.org:http", "port"),
    ("https://x.org/?a=1", "'?'"), ("vip example.org", "spaces"), ("https://", "no host"),
])  # fmt: skip
def test_non_urls_are_config_errors(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match="is not a VIP server URL") as info:
        normalise_server(url)
    assert why in info.value.message


def test_resolution_order(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.yaml", (
        f"state: {tmp_path / 'st'}\n"
        "drops:\n  - {path: a, output: o, server: 'vip.one.org/rest/'}\n"
        "  - {path: b, output: p, server: 'https://vip.two.org', key_file: k}\n"
    ))  # fmt: skip
    with pytest.raises(ConfigError, match="names several servers"):
        settings.resolve(config=config, env={}).require_server()
    got = settings.resolve(config=config, dataset=tmp_path / "b" / "ds", env={})
    assert (got.server, got.key_file, got.state) == ("https://vip.two.org", tmp_path / "k", tmp_path / "st")
    got = settings.resolve(config=config, env={"VIP_AGENT_SERVER": "vip.one.org",
                                               "VIP_AGENT_STATE": str(tmp_path / "e")})  # fmt: skip
    assert (got.server, got.key_file, got.state) == ("https://vip.one.org", None, tmp_path / "e")
    got = settings.resolve(config=config, server="https://vip.two.org/", state=tmp_path / "f",
                           env={"VIP_AGENT_SERVER": "vip.one.org"})  # fmt: skip
    assert (got.server, got.server_from, got.state) == ("https://vip.two.org", "--server", tmp_path / "f")
    with pytest.raises(ConfigError, match="no such configuration file"):
        settings.resolve(config=tmp_path / "missing.yaml", env={})


# --------------------------------------------------------------------------- through the CLI


def test_pipelines_and_run_use_the_server_and_key_file_of_init(tmp_path: Path,
                                                               vip_server: LocalVip) -> None:  # fmt: skip
    # before: both asked the public VIP and found no key
    _init(tmp_path, vip_server.url, _key_file(tmp_path, vip_server.api_key))
    listed = _agent(tmp_path, "pipelines")
    assert listed.returncode == 0, listed.stderr
    assert "FileStats/1.0" in listed.stdout
    write_dataset(tmp_path / "drop" / "ds", {"data.txt": "a b c\n"}, JOB)
    ran = _agent(tmp_path, "run", str(tmp_path / "drop" / "ds"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    # the journal is the per-user state folder agent.yaml names (init's default)
    state = Path(_home(tmp_path)["XDG_STATE_HOME"]) / "vip-agent"
    (ds,) = Journal.in_state_dir(state).datasets()
    assert ds.server == vip_server.url and ds.stage == "done"
    # and the outputs where the service would put them: the drop folder's output:
    assert ran.stdout.strip().splitlines()[-1] == str(tmp_path / "out" / "ds")


def test_run_and_pipelines_take_config(tmp_path: Path, vip_server: LocalVip) -> None:
    key = _key_file(tmp_path, vip_server.api_key)
    config = write(tmp_path / "elsewhere.yaml", (
        f"state: {tmp_path / 'state'}\n"
        f"defaults: {{server: '{vip_server.url}/rest/', key_file: {key}}}\n"
        f"drops:\n  - {{path: {tmp_path / 'drop'}, output: {tmp_path / 'out'}}}\n"
    ))  # fmt: skip
    listed = _agent(tmp_path, "pipelines", "FileStats", "--config", str(config))
    assert listed.returncode == 0 and "count_words" in listed.stdout, listed.stderr
    write_dataset(tmp_path / "drop" / "ds", {"data.txt": "a\n"}, JOB)
    dry = _agent(tmp_path, "run", str(tmp_path / "drop" / "ds"), "--dry-run", "--config", str(config))
    assert dry.returncode == 0 and "valid: nothing was sent" in dry.stdout, dry.stderr


@pytest.mark.parametrize("form", ["{url}/rest/", "{url}/", "{hostport}", "{hostport}/rest"])
def test_every_spelling_of_the_server_works(form: str, tmp_path: Path, vip_server: LocalVip) -> None:
    # before: /rest/ gave /rest/rest/... (404), host:port a traceback in run
    server = form.format(url=vip_server.url, hostport=vip_server.url.removeprefix("http://"))
    listed = _agent(tmp_path, "pipelines", "--server", server, api_key=vip_server.api_key)
    assert listed.returncode == 0 and "FileStats/1.0" in listed.stdout, listed.stderr
    write_dataset(tmp_path / "drop" / "ds", {"data.txt": "a\n"}, JOB)
    dry = _agent(tmp_path, "run", str(tmp_path / "drop" / "ds"), "--dry-run", "--server", server,
                 api_key=vip_server.api_key)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    doctor = _agent(tmp_path, "doctor", "--server", server, api_key=vip_server.api_key)
    assert f"OK    server {vip_server.url}: reachable" in doctor.stdout, doctor.stdout


@pytest.mark.parametrize("command", ["run", "pipelines", "doctor", "login"])
def test_not_a_url_is_one_line_exit_2(command: str, tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", {"data.txt": "a\n"}, JOB)
    args = {"run": ("run", str(tmp_path / "ds")), "pipelines": ("pipelines",),
            "doctor": ("doctor",), "login": ("login", "--stdin")}[command]  # fmt: skip
    done = _agent(tmp_path, *args, "--server", "notaurl", api_key="k")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "ValueError" not in done.stderr
    assert "'notaurl' is not a VIP server URL" in done.stderr


def test_resumed_run_keeps_its_server_and_says_so(tmp_path: Path, vip_server: LocalVip) -> None:
    # a dataset recorded on vip_server, resumed with another --server: before, messages named
    # one server while requests went to the other
    ds = write_dataset(tmp_path / "drop" / "ds", {"data.txt": "a b\n"}, JOB)
    state = tmp_path / "state"
    journal = Journal.in_state_dir(state)
    journal.add_dataset(name="ds", path=str(ds), server=vip_server.url, output_root=str(tmp_path / "out"),
                        fingerprint=scan(ds).fingerprint, stage="validate")  # fmt: skip
    other = "http://127.0.0.1:9"  # nothing listens there
    done = _agent(tmp_path, "run", str(ds), "--state", str(state), "--server", other,
                  api_key=vip_server.api_key)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ds was started on {vip_server.url} and continues there (--server {other} is not used" in done.stderr
    assert ":9" not in done.stderr.replace(f"--server {other}", "")
    assert Journal.in_state_dir(state).datasets()[0].stage == "done"


def test_doctor_reports_the_configs_own_drop_folders(tmp_path: Path, vip_server: LocalVip) -> None:
    # an agent runs on the shared state folder with its own drop folder
    state = tmp_path / "state"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    running = write(tmp_path / "running.yaml", yaml.safe_dump({
        "state": str(state), "drops": [{"path": str(theirs), "output": str(tmp_path / "o1"),
                                        "server": vip_server.url}]}))  # fmt: skip
    watch = subprocess.Popen([sys.executable, "-m", "agent", "watch", "--config", str(running)],
                             env=agent_env(vip_server.api_key, **_home(tmp_path)), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: (state / "journal.sqlite3").exists() and Journal.in_state_dir(state).drop_states(),
                 timeout=30, what="the agent watches its drop folder")  # fmt: skip
        mine = tmp_path / "mine"
        mine.mkdir()
        other = write(tmp_path / "other.yaml", yaml.safe_dump({
            "state": str(state), "drops": [{"path": str(mine), "output": str(tmp_path / "o2"),
                                            "server": vip_server.url}]}))  # fmt: skip
        done = _agent(tmp_path, "doctor", "--config", str(other), api_key=vip_server.api_key)
        assert f"drop folder {mine}: exists, writable" in done.stdout
        assert str(theirs) not in done.stdout, done.stdout  # before: the running agent's folder
        again = _agent(tmp_path, "doctor", "--config", str(running), api_key=vip_server.api_key)
        assert f"drop folder {theirs}: watched by the running agent" in again.stdout, again.stdout
    finally:
        watch.terminate()
        watch.wait(timeout=30)


def test_doctor_invalid_config_probes_nothing(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.yaml", "drops:\n  - path: d\n    output: o\n    max_running: many\n")
    done = _agent(tmp_path, "doctor", "--config", str(config), api_key="k")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"FAIL  config {config}: not valid") and "max_running" in lines[0]
    # before: it went on to probe the public VIP with the key
    assert "vip.creatis.insa-lyon.fr" not in done.stdout
    assert "server and API key: not checked (correct the configuration first" in done.stdout
