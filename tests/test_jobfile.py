"""job.yaml loading: merge rules, messages with lines, single-file datasets, globs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from agenthelpers import run_agent, write

from agent.errors import ConfigError
from agent.jobfile import (
    DEFAULT_VIP_ROOT,
    JobSpec,
    dataset_files,
    find_template,
    glob_match,
    load_job,
    merge,
)
from agent.localvip import LocalVip


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    d = tmp_path / "drop"
    write(
        d / "job.yaml",
        "pipeline: LCModel/0.2\n"
        "inputs:\n"
        "  signal_file: 'signals/*.RAW'\n"
        "  control_file: params.control\n"
        "  zero_fill: 'false'\n"
        "variants:\n"
        "  fast: {inputs: {zero_fill: 'true'}}\n"
        "  slow: {inputs: {zero_fill: 'false', extra: x}}\n",
    )
    write(d / "subject-042" / "signals" / "a.RAW", "aa")
    write(d / "subject-042" / "params.control", "c")
    return d


def test_template_only(drop: Path) -> None:
    job = load_job(drop / "subject-042", drop / "job.yaml")
    assert job.pipeline == "LCModel/0.2"
    assert job.name == "subject-042"
    assert job.root == (drop / "subject-042").absolute()
    assert job.single_file is None
    assert job.inputs == {"signal_file": "signals/*.RAW", "control_file": "params.control", "zero_fill": "false"}
    assert job.runs == 1 and job.extract is True and job.cleanup is True
    assert job.vip_root == DEFAULT_VIP_ROOT
    assert job.output_dir is None
    assert job.sources == ((drop / "job.yaml").absolute(),)


def test_dataset_overrides_key_by_key(drop: Path) -> None:
    write(
        drop / "subject-042" / "job.yaml",
        "name: s42\n"
        "runs: 3\n"
        "inputs:\n"
        "  control_file: other.control\n"  # replaces one input
        "  zero_fill: null\n"  # removes a template input
        "variants:\n"
        "  fast: {inputs: {extra: y}}\n"  # merges into the template's variant
        "  slow: null\n"  # removes a template variant
        "  new: {inputs: {signal_file: [a.RAW, b.RAW]}}\n",
    )
    job = load_job(drop / "subject-042", drop / "job.yaml")
    assert job.name == "s42" and job.runs == 3
    assert job.inputs == {"signal_file": "signals/*.RAW", "control_file": "other.control"}
    assert dict(job.variants) == {
        "fast": {"zero_fill": "true", "extra": "y"},
        "new": {"signal_file": ["a.RAW", "b.RAW"]},
    }
    assert len(job.sources) == 2 and job.sources[-1].name == "job.yaml"
    runs = job.variant_inputs()
    # with variants only the named ones run, each = base inputs overlaid by its own
    assert set(runs) == {"fast", "new"}
    assert runs["fast"]["zero_fill"] == "true" and runs["fast"]["control_file"] == "other.control"
    assert runs["new"]["signal_file"] == ["a.RAW", "b.RAW"]


def test_no_variants_gives_default(drop: Path) -> None:
    write(drop / "subject-042" / "job.yaml", "variants: null\n")
    job = load_job(drop / "subject-042", drop / "job.yaml")
    assert list(job.variant_inputs()) == ["default"]
    assert job.variant_inputs()["default"]["zero_fill"] == "false"


def test_null_inside_variant_removes_input_for_that_variant(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", "pipeline: P/1\ninputs: {a: '1', b: '2'}\nvariants:\n  v: {inputs: {b: null}}\n")
    job = load_job(ds)
    assert job.variant_inputs() == {"v": {"a": "1"}}


def test_merge_function_rules() -> None:
    template = {
        "pipeline": "A/1",
        "inputs": {"x": "1", "l": ["a", "b"]},
        "variants": {"v": {"inputs": {"x": "2", "y": "3"}}},
        "expect": ["*.a"],
    }
    override = {"inputs": {"l": ["c"]}, "variants": {"v": {"inputs": {"y": None}}}, "expect": ["*.b"]}
    out = merge(template, override)
    assert out["inputs"] == {"x": "1", "l": ["c"]}  # lists are replaced, not concatenated
    assert out["variants"] == {"v": {"inputs": {"x": "2", "y": None}}}  # kept: removes y from base
    assert out["expect"] == ["*.b"]
    assert template["inputs"] == {"x": "1", "l": ["a", "b"]}  # inputs untouched


def test_input_values_are_the_text_written(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(
        ds / "job.yaml",
        "pipeline: P/1\ninputs:\n  a: 1.10\n  b: no\n  c: 010\n  d: '2'\n  e: [1, yes]\n  f: ~\n  g: true\n",
    )
    job = load_job(ds)
    assert job.inputs == {"a": "1.10", "b": "no", "c": "010", "d": "2", "e": ["1", "yes"], "f": None, "g": "true"}
    assert "f" not in job.variant_inputs()["default"]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("pipeline: P/1\ninputs:\n\tsignal: a\n", 3, "tabs cannot indent YAML"),
        ("pipeline: P/1\ninputs: {a: [1, 2}\n", 2, "not valid YAML"),
        ("pipeline: P/1\ninputs:\n  a: b: c\n", 3, "a ':' appears where YAML does not expect one"),
        ("pipeline: P/1\ninputs:\n  a: 'unclosed\n", 4, "not closed (it starts on line 3)"),
        ("pipeline: P/1\ninputs:\n  a: *nope\n", 3, "'*alias'"),
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_job(ds)
    msg = str(info.value)
    assert str(ds / "job.yaml") in msg
    assert f"line {line}" in msg
    assert words in msg
    assert info.value.detail  # the raw YAML error is kept for operators


def test_unknown_top_level_key_names_key_file_and_line(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", "pipeline: P/1\ninputs: {a: '1'}\n\noutput_dri: out\n")
    with pytest.raises(ConfigError) as info:
        load_job(ds)
    msg = str(info.value)
    assert "unknown key 'output_dri'" in msg and "line 4" in msg and "did you mean 'output_dir'" in msg
    assert str(ds / "job.yaml") in msg


def test_unknown_key_in_template_is_reported_with_template_path(drop: Path) -> None:
    write(drop / "job.yaml", (drop / "job.yaml").read_text() + "colour: blue\n")
    with pytest.raises(ConfigError) as info:
        load_job(drop / "subject-042", drop / "job.yaml")
    assert f"{drop / 'job.yaml'}, line 9" in str(info.value)


def test_unknown_variant_key(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", "pipeline: P/1\ninputs: {a: '1'}\nvariants:\n  v:\n    inputs: {}\n    runs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_job(ds)
    assert "unknown key 'runs' in variant 'v'" in str(info.value) and "line 6" in str(info.value)


def test_all_problems_at_once(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(
        ds / "job.yaml",
        "pipeline: NoVersion\ninputs: {a: {b: c}}\nruns: 0\nextract: maybe\nvariants: {'bad name': {}}\n"
        "expect: [/abs]\nvip_root: /tmp/x\n",
    )
    with pytest.raises(ConfigError) as info:
        load_job(ds)
    msg = str(info.value)
    for words in (
        "must be NAME/VERSION",
        "input 'a' has a nested mapping",
        "runs must be a whole number of at least 1",
        "'extract' must be true or false",
        "variant name 'bad name'",
        "expect pattern '/abs'",
        "vip_root '/tmp/x'",
    ):
        assert words in msg
    assert msg.count("\n  - ") == 7


@pytest.mark.parametrize("runs", ["'2'", "1.5", "true", "-1"])
def test_runs_must_be_positive_integer(tmp_path: Path, runs: str) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", f"pipeline: P/1\ninputs: {{a: '1'}}\nruns: {runs}\n")
    with pytest.raises(ConfigError, match="runs must be a whole number"):
        load_job(ds)


def test_duplicate_key(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", "pipeline: P/1\ninputs:\n  a: '1'\n  a: '2'\n")
    with pytest.raises(ConfigError) as info:
        load_job(ds)
    assert "'inputs.a' is set twice (first on line 3)" in str(info.value) and "line 4" in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "the job file is empty"),
        ("- a\n- b\n", "must be a mapping of keys"),
        ("inputs: {a: '1'}\n", "'pipeline' is missing"),
        ("pipeline: P/1\n", "'inputs' is missing"),
        ("pipeline: P/1\ninputs: [a, b]\n", "'inputs' must be a mapping"),
        ("pipeline: P/1\ninputs: {a: []}\n", "empty list"),
        ("pipeline: P/1\nname: ../x\ninputs: {a: '1'}\n", "cannot be empty, contain slashes"),
    ],
)
def test_shape_errors(tmp_path: Path, text: str, words: str) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", text)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(")):
        load_job(ds)


def test_not_utf8(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", b"pipeline: P/1\ninputs: {a: '\xe9'}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_job(ds)


def test_no_job_file_anywhere(tmp_path: Path) -> None:
    write(tmp_path / "ds" / "a.txt", "x")
    write(tmp_path / "ds" / "job.yml", "pipeline: P/1\n")
    with pytest.raises(ConfigError, match="rename it to job.yaml"):
        load_job(tmp_path / "ds")


def test_single_file_dataset(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    write(drop / "job.yaml", "pipeline: P/1\ninputs: {signal: '*.nii.gz'}\n")
    f = write(drop / "sub-01.nii.gz", "x")
    write(drop / "sub-02.nii.gz", "y")
    write(drop / "folder" / "job.yaml", "pipeline: Q/2\n")  # never consulted for a file
    job = load_job(f, find_template(f))
    assert job.single_file == "sub-01.nii.gz"
    assert job.root == drop.absolute()
    assert job.dataset == f.absolute()
    assert job.name == "sub-01"  # both parts of .nii.gz dropped
    assert dataset_files(job) == ["sub-01.nii.gz"]  # only that file is in scope
    assert job.sources == ((drop / "job.yaml").absolute(),)


def test_single_file_needs_template(tmp_path: Path) -> None:
    f = write(tmp_path / "a.RAW", "x")
    with pytest.raises(ConfigError, match="single-file dataset takes its job from the drop folder"):
        load_job(f)


def test_job_yaml_is_never_a_dataset_file(drop: Path) -> None:
    write(drop / "subject-042" / "job.yaml", "runs: 2\n")
    job = load_job(drop / "subject-042", drop / "job.yaml")
    files = dataset_files(job)
    assert "job.yaml" not in files
    assert files == ["params.control", "signals/a.RAW"]


def test_output_dir_relative_to_drop_folder(drop: Path) -> None:
    write(drop / "subject-042" / "job.yaml", "output_dir: ../results\n")
    job = load_job(drop / "subject-042", drop / "job.yaml")
    assert job.output_dir == (drop.parent / "results").resolve()
    write(drop / "subject-042" / "job.yaml", "output_dir: /abs/out\n")
    assert load_job(drop / "subject-042", drop / "job.yaml").output_dir == Path("/abs/out")


def test_expect_and_missing_expected(drop: Path) -> None:
    write(drop / "subject-042" / "job.yaml", "expect: ['signals/*.RAW', 'done.marker']\n")
    job = load_job(drop / "subject-042", drop / "job.yaml")
    assert job.expect == ("signals/*.RAW", "done.marker")
    assert job.missing_expected() == ["done.marker"]
    write(drop / "subject-042" / "done.marker", "ok")
    assert job.missing_expected() == []


def test_vip_root(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", "pipeline: P/1\ninputs: {a: '1'}\nvip_root: /vip/Home/lab/\n")
    assert load_job(ds).vip_root == "/vip/Home/lab"


def test_dict_round_trip(drop: Path) -> None:
    job = load_job(drop / "subject-042", drop / "job.yaml")
    assert JobSpec.from_dict(job.to_dict()) == job


@pytest.mark.parametrize(
    ("pattern", "rel", "hit"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", "sub/a.txt", False),
        ("sub/*.txt", "sub/a.txt", True),
        ("**/*.txt", "a.txt", True),
        ("**/*.txt", "x/y/a.txt", True),
        ("signals/**", "signals/x/y.raw", True),
        ("a?.raw", "ab.raw", True),
        ("a?.raw", "a/.raw", False),
        ("[ab].raw", "b.raw", True),
        ("[!ab].raw", "b.raw", False),
        ("*", ".hidden", False),
        ("./*.txt", "a.txt", True),
        ("*.TXT", "a.txt", False),
    ],
)
def test_glob_match(pattern: str, rel: str, hit: bool) -> None:
    assert glob_match(pattern, rel) is hit


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(
        ds / "job.yaml",
        "pipeline: P/1\n"
        "inputs: &base\n  a: '1'\n  b: '2'\n"
        "variants:\n"
        "  v:\n    inputs:\n      <<: *base\n      b: '3'\n",  # explicit key overrides the merged one
    )
    job = load_job(ds)
    assert dict(job.variants) == {"v": {"a": "1", "b": "3"}}


def test_input_names_are_text_as_written(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    write(ds / "job.yaml", "pipeline: P/1\ninputs:\n  on: x\n  1: y\n")
    assert load_job(ds).inputs == {"on": "x", "1": "y"}


# --------------------------------------------------------------------------- issue 17 items 2, 3


def _dry_run(dataset: Path, server: LocalVip, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_agent("run", str(dataset), "--dry-run", "--server", server.url,
                     api_key=server.api_key, cwd=cwd)  # fmt: skip


def test_inherited_input_names_the_template(tmp_path: Path, vip_server: LocalVip) -> None:
    drop = tmp_path / "drop"
    write(drop / "job.yaml", "pipeline: FileStats/1.0\ninputs:\n  input_file: '*.txt'\n"
                             "  count_words: true\n")  # fmt: skip
    write(drop / "ds" / "a.txt", "x\n")
    write(drop / "ds" / "job.yaml", "pipeline: TextTransform/1.0\ninputs:\n  input_file: a.txt\n")
    done = _dry_run(drop / "ds", vip_server, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    template = drop / "job.yaml"
    # before: "input 'count_words' is not a parameter ...; fix the name in the job file"
    assert (f"input 'count_words' (set in {template}) is not a parameter of TextTransform/1.0"
            in done.stdout), done.stdout  # fmt: skip
    assert f"fix the name in {template}" in done.stdout
    assert "input 'input_file' (set in" not in done.stdout  # the dataset's own value


def test_key_errors_and_input_errors_are_reported_at_once(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = tmp_path / "drop" / "ds"
    write(ds / "a.txt", "x\n")
    write(ds / "job.yaml", "pipeline: FileStats/1.0\nruns: 0\nextract: maybe\n"
                           "inputs:\n  input_fil: a.txt\n  count_words: perhaps\n")  # fmt: skip
    done = _dry_run(ds, vip_server, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    out = done.stdout
    # before: only runs and extract, the input problems hidden until those were fixed
    assert "line 2: runs must be a whole number of at least 1, not 0" in out, out
    assert "line 3: 'extract' must be true or false, not 'maybe'" in out
    assert "input 'input_fil' is not a parameter of FileStats/1.0 (did you mean 'input_file'?)" in out
    assert "input 'count_words' must be true or false" in out
    assert "Traceback" not in done.stderr


def test_key_problems_still_raise_without_keep_problems(tmp_path: Path) -> None:
    ds = tmp_path / "drop" / "ds"
    write(ds / "a.txt", "x\n")
    write(ds / "job.yaml", "pipeline: P/1\nruns: 0\ninputs: {a: a.txt}\n")
    with pytest.raises(ConfigError, match="runs must be a whole number"):
        load_job(ds)
    job = load_job(ds, keep_problems=True)
    assert job.runs == 1 and len(job.problems) == 1 and "runs must be" in job.problems[0]


def test_real_run_reports_key_and_input_errors_at_once(tmp_path: Path, vip_server: LocalVip) -> None:
    ds = tmp_path / "drop" / "ds"
    write(ds / "a.txt", "x\n")
    write(ds / "job.yaml", "pipeline: FileStats/1.0\ncleanup: sometimes\ninputs:\n  input_fil: a.txt\n")
    done = run_agent("run", str(ds), "--server", vip_server.url, "--state", str(tmp_path / "state"),
                     api_key=vip_server.api_key, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr  # nothing launched
    assert "'cleanup' must be true or false, not 'sometimes'" in done.stderr
    assert "input 'input_fil' is not a parameter of FileStats/1.0" in done.stderr
    assert (ds / "ERROR.txt").is_file() and "input_fil" in (ds / "ERROR.txt").read_text()
