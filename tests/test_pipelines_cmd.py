"""``vip-agent pipelines`` against the local VIP server, plus its pure helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import main as cli_main
from agent.commands.pipelines import (
    PLACEHOLDER,
    format_pipeline,
    job_yaml_skeleton,
    match_pipelines,
)
from agent.jobfile import load_job
from agent.validate import validate

LISTING = [
    {"identifier": "LCModel/0.2", "name": "LCModel", "version": "0.2"},
    {"identifier": "LCModel/0.1", "name": "LCModel", "version": "0.1"},
    {"identifier": "FileStats/1.0", "name": "FileStats", "version": "1.0"},
    {"identifier": "CQUEST/0.3", "name": "CQUEST", "version": "0.3"},
]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (None, ["CQUEST/0.3", "FileStats/1.0", "LCModel/0.1", "LCModel/0.2"]),
        ("lcmodel", ["LCModel/0.1", "LCModel/0.2"]),
        ("LCMODEL/0.2", ["LCModel/0.2"]),  # exact identifier, any case
        ("lcm*/0.1", ["LCModel/0.1"]),
        ("*st*", ["CQUEST/0.3", "FileStats/1.0"]),
        ("stats", ["FileStats/1.0"]),
        ("nothing", []),
    ],
)
def test_match_pipelines(pattern: str | None, expected: list[str]) -> None:
    assert [p["identifier"] for p in match_pipelines(LISTING, pattern)] == expected


DETAIL: dict[str, Any] = {
    "identifier": "Demo/1",
    "name": "Demo",
    "version": "1",
    "description": "Does <b>things</b>.<br/>Twice.",
    "parameters": [
        {"name": "zeta", "type": "Double", "isOptional": True, "defaultValue": 0.5, "description": "z"},
        {"name": "flag", "type": "Boolean", "isOptional": True, "defaultValue": "$input.getDefaultValue()",
         "description": "a flag"},
        {"name": "mode", "type": "String", "isOptional": False, "defaultValue": "fast", "description": "m"},
        {"name": "input", "type": "File", "isOptional": False, "defaultValue": None, "description": "the data"},
    ],
}


def test_format_pipeline() -> None:
    text = format_pipeline(DETAIL)
    assert "NAME: Demo | VERSION: 1" in text
    assert "Does things. Twice." in text  # HTML stripped
    req, opt = text.index("REQUIRED"), text.index("OPTIONAL")
    assert req < text.index("- input") < text.index("- mode") < opt < text.index("- flag") < text.index("- zeta")
    assert "[DOUBLE] default: 0.5. z" in text
    assert "getDefaultValue" not in text  # legacy placeholder is "no default"


def test_job_yaml_skeleton_shape() -> None:
    text = job_yaml_skeleton(DETAIL)
    data = yaml.safe_load(text)
    assert data["pipeline"] == "Demo/1"
    # required inputs set, the one without default as a placeholder; optional ones commented out
    assert data["inputs"] == {"input": PLACEHOLDER, "mode": "fast"}
    assert "  # zeta: \"0.5\"" in text and "  # flag: \"\"" in text
    assert text.index("input (File, required)") < text.index("flag (Boolean, optional")
    assert data["runs"] == 1 and data["extract"] is True and data["cleanup"] is True


def test_job_yaml_skeleton_placeholder_fails_validation(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "job.yaml").write_text(job_yaml_skeleton(DETAIL))
    report = validate(load_job(ds), ds, DETAIL)
    assert len(report.errors) == 1 and f"'{PLACEHOLDER}' is not in the dataset folder" in report.errors[0]


# --------------------------------------------------------------------------- against the local server


@pytest.fixture
def server(vip_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("VIP_API_KEY", vip_server.api_key)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return vip_server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(["pipelines", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_lists_all(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--server", server.url)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["IDENTIFIER", "NAME", "VERSION"]
    for ident in ("FileStats/1.0", "TextTransform/1.0", "Sleep/1.0"):
        assert ident in out
    assert server.api_key not in out + err


def test_list_json(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--server", server.url, "--json", "*/1.0")
    assert code == 0
    items = json.loads(out)
    assert {"identifier": "FileStats/1.0", "name": "FileStats", "version": "1.0"} in items
    assert all(set(i) == {"identifier", "name", "version"} for i in items)


def test_single_match_shows_parameters(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--server", server.url, "filestats")
    assert code == 0, err
    assert "FileStats/1.0" in out and "REQUIRED" in out
    assert "- input_file" in out and "[FILE]" in out
    assert out.index("- input_file") < out.index("OPTIONAL") < out.index("- count_words")


def test_single_match_json(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--server", server.url, "--json", "TextTransform/1.0")
    assert code == 0
    detail = json.loads(out)
    types = {p["name"]: p["type"] for p in detail["parameters"]}
    assert types["input_file"] == "File" and types["repeat"] == "Int64" and types["number_lines"] == "Boolean"


def test_job_yaml_for_builtin_validates_once_filled(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "--server", server.url, "--job-yaml", "FileStats/1.0")
    assert code == 0, err
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "data.txt").write_text("hello world\n")
    (ds / "job.yaml").write_text(out.replace(PLACEHOLDER, "data.txt"))
    from agent.vip.client import VipClient

    with VipClient(server.url, server.api_key, retries=0) as client:
        report = validate(load_job(ds), ds, client.pipeline("FileStats/1.0"))
    assert report.ok, report.errors


def test_job_yaml_needs_one_match(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--server", server.url, "--job-yaml", "*/1.0")
    assert code == 2
    assert "give one identifier" in err and "FileStats/1.0" in err


def test_no_match(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--server", server.url, "NoSuchThing/9")
    assert code == 2 and out == ""
    assert "no pipeline matches 'NoSuchThing/9'" in err


def test_bad_key(server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIP_API_KEY", "not-the-key")
    code, out, err = run(capsys, "--server", server.url)
    assert code == 3  # CredentialError (the server refused the key)
    assert out == "" and "not-the-key" not in err
