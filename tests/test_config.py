"""agent.yaml: defaults, paths, overrides, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.config import (
    DEFAULT_SETTLE,
    config_from_args,
    default_state_dir,
    load_config,
    parse_duration,
)
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_file_loads_with_documented_defaults(tmp_path: Path) -> None:
    config = load_config(REPO / "examples" / "agent.yaml")
    (drop,) = config.drops
    assert drop.path == (REPO / "examples" / "drop").resolve()
    assert drop.output == (REPO / "examples" / "results").resolve()
    assert drop.readiness.rule == "settle" and drop.readiness.settle_seconds == 30
    assert drop.readiness.stale_after == 86400
    assert drop.limits.max_running == 1 and drop.limits.max_uploads == 2
    assert drop.after == "keep" and drop.failed_dir is None
    assert drop.server == "https://vip.creatis.insa-lyon.fr"


def test_full_drop_and_defaults_merge(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
state: st
log_format: json
defaults:
  server: http://127.0.0.1:9/
  max_running: 3
  readiness: {rule: marker, marker: DONE}
drops:
  - path: a
    output: out-a
    readiness: {stale_after: 2h}
    after: archive
  - path: b
    output: out-b
    datasets: files
    pattern: "*.nii.gz"
    max_running: 2
    observer: polling
    poll_interval: 5s
""",
    )
    config = load_config(path, settle=0.5)
    a, b = config.drops
    assert config.state == (tmp_path / "st").resolve() and config.log_format == "json"
    assert a.server == "http://127.0.0.1:9"  # trailing slash dropped
    assert a.readiness.rule == "marker" and a.readiness.marker == "DONE"
    assert a.readiness.stale_after == 7200 and a.readiness.settle_seconds == 0.5
    assert a.archive_dir == a.path / "_archive" and a.failed_dir == a.path / "_failed"
    assert b.datasets == "files" and b.pattern == "*.nii.gz" and b.limits.max_running == 2
    assert b.limits.max_running == 2 and a.limits.max_running == 3
    assert b.poll_interval == 5.0 and b.observer == "polling"
    assert config.drop_for(str(b.path)) is b


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("drops: [{path: d, output: o, readiness: {setle_seconds: 3}}]",
         "drops[0].readiness.setle_seconds", "did you mean 'settle_seconds'"),
        ("drops: [{path: d}]", "drops[0].output", "required"),
        ("drops: [{path: d, output: o, readiness: {rule: magic}}]",
         "drops[0].readiness.rule", "settle, marker, manifest"),
        ("drops: [{path: d, output: o, max_running: 0}]", "drops[0].max_running", ">= 1"),
        ("drops: [{path: d, output: o, poll_interval: soon}]", "drops[0].poll_interval", "duration"),
        ("drops: [{path: d, output: o, server: notaurl}]", "drops[0].server", "portal URL"),
        ("drops: [{path: d, output: o, datasets: files, readiness: {rule: manifest}}]",
         "drops[0].readiness.rule", "datasets: folders"),
        ("drops: []", "drops", "at least one"),
        ("drops: [{path: d, output: o}, {path: d/sub, output: o2}]", "drops[1].path", "overlaps"),
        ("drop: [{path: d, output: o}]", "drop", "did you mean 'drops'"),
        ("drops: [{path: d, output: o, keep_remote: maybe}]", "drops[0].keep_remote", "true or false"),
        ("drops: [{path: d, output: o, poll: '30:2'}]", "drops[0].poll", "max >= min"),
        ("drops: [{path: d, output: o, poll: {min: 0}}]", "drops[0].poll", "min > 0"),
        ("drops: [{path: d, output: o, poll: {low: 1}}]", "drops[0].poll", "{min: 2, max: 60}"),
        ("drops: [{path: d, output: o, transfer_parallelism: 0}]",
         "drops[0].transfer_parallelism", ">= 1"),
        ("drops: [{path: d, output: o, transfer_parallelism: 1000}]",
         "drops[0].transfer_parallelism", "at most 64"),
    ],
)  # fmt: skip
def test_one_clear_error_naming_file_and_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert key in message and words in message, message
    assert info.value.exit_code == 2


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, "drops:\n  - path: d\n   output: [\n")
    with pytest.raises(ConfigError, match=r"line 3, column \d+: this is not valid YAML: the indentation"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")


def test_cli_exit_code_2_on_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "drops: [{path: d, output: o, bogus: 1}]")
    (tmp_path / "d").mkdir()
    assert cli_main(["watch", "--config", str(path)]) == 2
    assert "drops[0].bogus: unknown setting" in capsys.readouterr().err


def test_config_from_args(tmp_path: Path) -> None:
    config = config_from_args(
        tmp_path / "drop", server="http://127.0.0.1:5", output=tmp_path / "out",
        state=tmp_path / "state", settle=2,
    )  # fmt: skip
    (drop,) = config.drops
    assert drop.readiness.settle_seconds == 2.0 and drop.server == "http://127.0.0.1:5"
    assert config.state == (tmp_path / "state").resolve()
    default = config_from_args(tmp_path / "drop").drops[0]
    assert default.readiness.settle_seconds == DEFAULT_SETTLE
    assert default.output == (tmp_path / "drop" / "_results").resolve()


def test_state_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/sd:{tmp_path}/other")
    assert default_state_dir() == tmp_path / "sd"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "vip-agent"


def test_durations() -> None:
    assert parse_duration("1d") == 86400 and parse_duration("250ms") == 0.25
    assert parse_duration(3) == 3.0 and parse_duration("5m") == 300
    for bad in ("-1", "soon", True, None, -2):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_poll_and_transfer_parallelism(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
defaults: {transfer_parallelism: 12}
drops:
  - {path: a, output: oa, poll: {min: 1, max: 2m}}
  - {path: b, output: ob, poll: "0.5:30", transfer_parallelism: 3}
  - {path: c, output: oc, poll: 4}
  - {path: d, output: od}
""",
    )
    a, b, c, d = load_config(path).drops
    assert (a.poll_min, a.poll_max, a.transfer_parallelism) == (1.0, 120.0, 12)
    assert (b.poll_min, b.poll_max, b.transfer_parallelism) == (0.5, 30.0, 3)
    assert (c.poll_min, c.poll_max) == (4.0, None)
    # unset: the runner's defaults apply
    assert (d.poll_min, d.poll_max) == (None, None)
