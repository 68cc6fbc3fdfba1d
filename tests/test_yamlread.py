"""The one YAML reader (agent.yamlread) for agent.yaml and job.yaml: bounds, messages,
duplicate keys, and no YAML 1.1 guessing, through the real CLI where a user meets it."""

from __future__ import annotations

from pathlib import Path

import pytest
from agenthelpers import run_agent, write

from agent import yamlread
from agent.config import load_config
from agent.errors import ConfigError
from agent.jobfile import load_job
from agent.localvip import LocalVip


def _agent_yaml(tmp_path: Path, body: str) -> Path:
    (tmp_path / "drop").mkdir(exist_ok=True)
    return write(tmp_path / "agent.yaml", f"state: {tmp_path / 'state'}\n" + body)


# --------------------------------------------------------------------------- scalars


@pytest.mark.parametrize(("text", "value"), [
    ("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("y", "y"), ("n", "n"),
    ("Yes", "Yes"), ("true", True), ("False", False), ("010", 10), ("030", 30), ("-7", -7),
    ("2:30", "2:30"), ("1:30", "1:30"), ("1_000", "1_000"), ("0x1F", "0x1F"), ("1.10", 1.1),
    ("1e3", 1000.0), (".5", 0.5), ("2026-01-01", "2026-01-01"), ("~", None), ("null", None),
    ("", None), ("'on'", "on"),
])  # fmt: skip
def test_scalars_are_what_was_written(text: str, value: object) -> None:
    assert yamlread.load_text(f"k: {text}\n", "x") == {"k": value}


def test_on_off_yes_no_keys_are_the_words() -> None:
    data = yamlread.load_text("on: 1\noff: 2\nyes: 3\nno: 4\ny: 5\nn: 6\n", "x")
    assert list(data) == ["on", "off", "yes", "no", "y", "n"]


def test_pyyaml_itself_is_left_alone() -> None:
    import yaml

    yamlread.load_text("a: on\n", "x")
    assert yaml.safe_load("a: on\nb: 010\n") == {"a": True, "b": 8}


def test_as_flag() -> None:
    assert [yamlread.as_flag(v) for v in (True, "yes", "ON", "off", "No", "maybe", 1)] == [
        True, True, True, False, False, None, None,
    ]


# --------------------------------------------------------------------------- refusals


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, "drops:\n  - {path: drop, output: a}\nlog_format: text\n"
                                 "drops:\n  - {path: drop, output: b}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"line 5: 'drops' is set twice \(first on line 2\)"):
        load_config(path)


def test_every_duplicate_is_listed_at_once(tmp_path: Path) -> None:
    text = "a: 1\na: 2\nb:\n  c: 1\n  c: 2\n"
    with pytest.raises(ConfigError) as info:
        yamlread.load_text(text, "f.yaml")
    assert "line 2: 'a' is set twice" in str(info.value)
    assert "line 5: 'b.c' is set twice (first on line 4)" in str(info.value)


def test_merge_keys_may_be_overridden() -> None:
    data = yamlread.load_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "x")
    assert data["other"] == {"x": 3, "y": 2}


def test_tab_in_agent_yaml_gets_the_friendly_message(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, "drops:\n\t- path: drop\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: this is not valid YAML: tabs cannot "
                                          "indent YAML; use spaces"):  # fmt: skip
        load_config(path)


def test_bounds_apply_to_agent_yaml(tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcde", "bcdef", strict=True)
    )
    with pytest.raises(ConfigError, match="more than 100,000 values once its '\\*aliases'"):
        load_config(write(tmp_path / "agent.yaml", bomb))
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(write(tmp_path / "big.yaml", "# " + "x" * (300 << 10) + "\n"))
    with pytest.raises(ConfigError, match="nested more than 32 deep; a configuration file"):
        load_config(write(tmp_path / "deep.yaml", "a: " + "[" * 40 + "]" * 40 + "\n"))


def test_text_setting_read_as_boolean_says_to_quote(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, "drops:\n  - path: drop\n    output: out\n"
                                 "    readiness: {rule: marker, marker: true}\n")  # fmt: skip
    with pytest.raises(ConfigError, match="marker: must be a non-empty text, not True; YAML "
                                          "reads True as a bool: put it in quotes"):  # fmt: skip
        load_config(path)


# --------------------------------------------------------------------------- agent.yaml values


def test_yaml11_numbers_are_not_guessed_in_agent_yaml(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, (
        "drops:\n  - path: drop\n    output: out\n    poll: 2:30\n    max_running: 010\n"
        "    readiness: {settle_seconds: 030}\n    keep_remote: yes\n"
        "http:\n  listen: 127.0.0.1:8490\n  read_token: on\n"
    ))  # fmt: skip
    config = load_config(path)
    drop = config.drops[0]
    assert (drop.poll_min, drop.poll_max) == (2.0, 30.0)  # not 150 s (sexagesimal)
    assert drop.limits.max_running == 10  # not 8 (octal)
    assert drop.readiness.settle_seconds == 30.0  # not 24
    assert drop.keep_remote is True
    assert config.http is not None and config.http.read_token is True


def test_listen_1_30_is_not_port_90(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, "drops:\n  - {path: drop, output: out}\nhttp:\n  listen: 1:30\n")
    with pytest.raises(ConfigError, match=r"http\.listen: must be \[HOST:\]PORT, e\.g\. 127\.0\.0\.1:8490"):
        load_config(path)


# --------------------------------------------------------------------------- job.yaml values


def test_job_yaml_words_stay_words(tmp_path: Path) -> None:
    ds = tmp_path / "drop" / "ds"
    write(ds / "a.txt", "x")
    write(ds / "job.yaml", "pipeline: P/1\nname: no\ninputs:\n  on: off\n  n: 010\n"
                           "extract: no\ncleanup: yes\nruns: 03\n")  # fmt: skip
    job = load_job(ds)
    assert job.name == "no" and job.inputs == {"on": "off", "n": "010"}
    assert (job.extract, job.cleanup, job.runs) == (False, True, 3)


def test_job_yaml_bad_flag_names_the_line(tmp_path: Path) -> None:
    ds = tmp_path / "drop" / "ds"
    write(ds / "a.txt", "x")
    write(ds / "job.yaml", "pipeline: P/1\ninputs: {a: a.txt}\nextract: maybe\n")
    with pytest.raises(ConfigError, match=r"line 3: 'extract' must be true or false, not 'maybe'"):
        load_job(ds)


# --------------------------------------------------------------------------- through the CLI


def test_cli_duplicate_drops_block_is_refused(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, "drops:\n  - {path: drop, output: a}\ndrops:\n  - {path: x, output: b}\n")
    done = run_agent("watch", "--config", str(path), api_key="k", cwd=tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "line 4: 'drops' is set twice (first on line 2); keep one" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_notify_on_example_is_accepted(tmp_path: Path, vip_server: LocalVip) -> None:
    path = _agent_yaml(tmp_path, (
        f"drops:\n  - path: drop\n    output: out\n    server: {vip_server.url}\n"
        "    notify:\n      - on: [failed]\n        webhook: https://chat.example.org/hooks/x\n"
    ))  # fmt: skip
    done = run_agent("doctor", "--config", str(path), api_key=vip_server.api_key, cwd=tmp_path)
    assert f"OK    config {path}: 1 drop folder" in done.stdout, done.stdout + done.stderr
    assert "unknown setting" not in done.stdout


def test_nul_in_agent_yaml_is_refused_by_key(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, 'drops:\n  - path: "drop\\0x"\n    output: out\n')
    with pytest.raises(ConfigError, match=r"'drops\[0\]\.path' contains a NUL character"):
        load_config(path)


def test_unquoted_pattern_says_to_quote(tmp_path: Path) -> None:
    path = _agent_yaml(tmp_path, "drops:\n  - path: drop\n    output: out\n    datasets: files\n"
                                 "    pattern: *.nii.gz\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"line 6, column \d+: this is not valid YAML: a value "
                                          r"starting with '\*' is read as an alias: put a pattern "
                                          r"in quotes, e\.g\. '\*\.nii\.gz'"):  # fmt: skip
        load_config(path)


def test_cli_numbers_as_written(tmp_path: Path, vip_server: LocalVip) -> None:
    # YAML 1.1 read max_running: 08 as the text '08' (not octal, not a number: refused) and
    # settle_seconds: 1:30 as 90; now 08 is eight and 1:30 is refused with the forms to use
    good = _agent_yaml(tmp_path, (
        f"drops:\n  - path: drop\n    output: out\n    server: {vip_server.url}\n"
        "    max_running: 08\n    poll: 2:30\n"
    ))  # fmt: skip
    done = run_agent("doctor", "--config", str(good), api_key=vip_server.api_key, cwd=tmp_path)
    assert f"OK    config {good}: 1 drop folder" in done.stdout, done.stdout
    bad = write(tmp_path / "bad.yaml", good.read_text() + "    readiness: {settle_seconds: 1:30}\n")
    done = run_agent("watch", "--config", str(bad), api_key=vip_server.api_key, cwd=tmp_path,
                     timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert "drops[0].readiness.settle_seconds: must be a duration in seconds (30, 2.5, '10s', " \
           "'5m', '2h', '1d'), not '1:30'" in done.stderr, done.stderr  # fmt: skip
