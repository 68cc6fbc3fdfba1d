"""Validation of a job + dataset against a pipeline description, and input resolution.

The pipeline descriptions here are hand-written dicts in the shape of VIP's
``GET /rest/pipelines/{id}`` (the pure checks need no server); the last tests
check the example datasets against the real built-in pipelines of agent/localvip.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from agenthelpers import write

from agent.errors import ValidationError
from agent.jobfile import JobSpec, load_job
from agent.names import EXEC_NAME_RE, execution_name, vip_safe_name, vip_safe_path
from agent.validate import ValidationReport, resolve_inputs, validate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def param(name: str, type_: str = "String", optional: bool = False, default: Any = None) -> dict[str, Any]:
    return {
        "name": name,
        "type": type_,
        "isOptional": optional,
        "isReturnedValue": False,
        "defaultValue": default,
        "description": f"<b>{name}</b> description",
    }


PIPELINE: dict[str, Any] = {
    "identifier": "LCModel/0.2",
    "name": "LCModel",
    "version": "0.2",
    "description": "test",
    "canExecute": True,
    "parameters": [
        param("signal_file", "File"),
        param("control_file", "File", optional=True),
        param("zero_fill", "Boolean", optional=True, default="false"),
        param("iterations", "Int64", optional=True),
        param("factor", "Double", optional=True),
        param("label", "String", optional=True),
        param("extras", "List", optional=True),
        param("mode", "String", default="fast"),  # required, with a default: may be left out
    ],
}


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    d = tmp_path / "drop" / "subject-042"
    write(d / "signals" / "b.RAW", "bb")
    write(d / "signals" / "a.RAW", "aa")
    write(d / "params.control", "ctl")
    return d


def job_for(ds: Path, inputs: dict[str, Any], **kw: Any) -> JobSpec:
    return JobSpec(pipeline="LCModel/0.2", name=ds.name, inputs=inputs, root=ds, **kw)


def check(ds: Path, inputs: dict[str, Any], pipeline: dict[str, Any] | None = None, **kw: Any) -> ValidationReport:
    return validate(job_for(ds, inputs, **kw), ds, pipeline or PIPELINE)


def only_error(report: ValidationReport) -> str:
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


# --------------------------------------------------------------------------- happy path


def test_valid_job_resolves(ds: Path) -> None:
    report = check(ds, {"signal_file": "signals/*.RAW", "control_file": "params.control", "zero_fill": True})
    assert report.ok, report.errors
    assert report.warnings == []
    resolved = report.resolved
    assert resolved is not None
    assert resolved.files == ("params.control", "signals/a.RAW", "signals/b.RAW")
    assert list(resolved.variants) == ["default"]
    values = resolved.remote_inputs("default", "/vip/Home/vip-agent/s42/INPUTS/")
    assert values == {
        "signal_file": ["/vip/Home/vip-agent/s42/INPUTS/signals/a.RAW", "/vip/Home/vip-agent/s42/INPUTS/signals/b.RAW"],
        "control_file": "/vip/Home/vip-agent/s42/INPUTS/params.control",
        "zero_fill": "true",  # YAML/Python booleans become VIP's "true"/"false"
    }
    assert resolved.variants["default"].job_count == 2  # a glob with two files = two parallel jobs
    assert resolved.local_files["signals/a.RAW"].size == 2


def test_remote_paths_pass_through(ds: Path) -> None:
    report = check(ds, {"signal_file": "/vip/Home/shared/basis.zip"})
    assert report.ok
    assert report.resolved is not None and report.resolved.files == ()
    assert report.resolved.remote_inputs("default", "/x") == {"signal_file": "/vip/Home/shared/basis.zip"}


def test_yaml_list_is_parallel_jobs(ds: Path) -> None:
    report = check(ds, {"signal_file": ["signals/b.RAW", "signals/a.RAW"], "label": ["x", "y", "z"]})
    assert report.ok
    assert report.resolved is not None
    v = report.resolved.variants["default"]
    assert v.input_values("/r")["signal_file"] == ["/r/signals/b.RAW", "/r/signals/a.RAW"]  # order kept
    assert v.job_count == 6
    assert any("every combination (6 jobs per run)" in w for w in report.warnings)


def test_variants_share_one_upload(ds: Path) -> None:
    job = job_for(
        ds,
        {"signal_file": "signals/a.RAW"},
        variants={"fast": {"zero_fill": "true"}, "other": {"signal_file": "signals/*.RAW", "label": None}},
        runs=2,
    )
    resolved = resolve_inputs(job, ds, PIPELINE)
    assert list(resolved.variants) == ["fast", "other"]  # the base inputs alone do not run
    assert resolved.files == ("signals/a.RAW", "signals/b.RAW")  # union, each file once
    assert resolved.remote_inputs("fast", "/r") == {"signal_file": "/r/signals/a.RAW", "zero_fill": "true"}
    assert resolved.remote_inputs("other", "/r") == {"signal_file": ["/r/signals/a.RAW", "/r/signals/b.RAW"]}


def test_list_parameter_files_go_to_one_job(ds: Path) -> None:
    report = check(ds, {"signal_file": "params.control", "extras": ["signals/*.RAW", "plain-text"]})
    assert report.ok, report.errors
    assert report.resolved is not None
    v = report.resolved.variants["default"]
    assert v.input_values("/r")["extras"] == ["/r/signals/a.RAW", "/r/signals/b.RAW", "plain-text"]
    assert v.job_count == 1
    assert "signals/b.RAW" in report.resolved.files


def test_resolve_inputs_raises_with_every_problem(ds: Path) -> None:
    job = job_for(ds, {"signal_file": "nope.RAW", "iterations": "many"})
    with pytest.raises(ValidationError) as info:
        resolve_inputs(job, ds, PIPELINE)
    assert len(info.value.problems) == 2
    assert "nope.RAW" in str(info.value) and "iterations" in str(info.value)


def test_resolve_inputs_without_pipeline_reuses_validated_description(ds: Path) -> None:
    # the label names a dataset file, but the pipeline says it is a String: it stays text
    job = job_for(ds, {"signal_file": "signals/a.RAW", "label": "params.control"})
    assert validate(job, ds, PIPELINE).ok
    resolved = resolve_inputs(job, ds)
    assert resolved.files == ("signals/a.RAW",)
    assert resolved.remote_inputs("default", "/r")["label"] == "params.control"


def test_raise_if_errors(ds: Path) -> None:
    report = check(ds, {})
    with pytest.raises(ValidationError) as info:
        report.raise_if_errors()
    assert info.value.problems == report.errors
    check(ds, {"signal_file": "params.control"}).raise_if_errors()  # no errors: no raise


# --------------------------------------------------------------------------- one test per error


@pytest.mark.parametrize(
    ("default", "missing"),
    [(None, True), ("$input.getDefaultValue()", True), ("No_value_provided", True), ("", True), ("x", False), (0, False)],
)
def test_missing_required_input(ds: Path, default: Any, missing: bool) -> None:
    pipeline = dict(PIPELINE, parameters=[param("signal_file", "File", default=default)])
    report = check(ds, {}, pipeline)
    if missing:
        msg = only_error(report)
        assert "needs input 'signal_file' (File)" in msg and "add 'signal_file: ...' under inputs" in msg
    else:
        assert report.ok


def test_missing_required_input_names_variant(ds: Path) -> None:
    report = validate(
        job_for(ds, {}, variants={"a": {"signal_file": "params.control"}, "b": {}}), ds, PIPELINE
    )
    assert "(variant 'b')" in only_error(report)


def test_unknown_input_is_an_error(ds: Path) -> None:
    """VIP ignores unknown inputs: a typo would silently run with the default."""
    msg = only_error(check(ds, {"signal_file": "params.control", "zerofill": "true"}))
    assert msg.startswith(
        "input 'zerofill' is not a parameter of LCModel/0.2 (did you mean 'zero_fill'?); its inputs are: "
    )
    assert "`vip-agent pipelines LCModel/0.2`" in msg


def test_results_directory_is_refused(ds: Path) -> None:
    msg = only_error(check(ds, {"signal_file": "params.control", "results-directory": "/vip/Home/out"}))
    assert "'results-directory' is set by vip-agent" in msg


@pytest.mark.parametrize(
    ("name", "value", "ok", "sent"),
    [
        ("zero_fill", "maybe", False, None),
        ("zero_fill", "Yes", True, "true"),
        ("zero_fill", False, True, "false"),
        ("iterations", "1.5", False, None),
        ("iterations", "99999999999999999999", False, None),
        ("iterations", "-3", True, "-3"),
        ("iterations", 7, True, "7"),
        ("factor", "abc", False, None),
        ("factor", "nan", False, None),
        ("factor", "1e-3", True, "1e-3"),
        ("factor", 2.0, True, "2.0"),
        ("label", "anything 1.0 (x)", True, "anything 1.0 (x)"),
    ],
)
def test_types(ds: Path, name: str, value: Any, ok: bool, sent: str | None) -> None:
    report = check(ds, {"signal_file": "params.control", name: value})
    assert report.ok is ok, report.errors
    if ok:
        assert report.resolved is not None
        assert report.resolved.remote_inputs("default", "/r")[name] == sent
    else:
        assert f"input '{name}' must be" in only_error(report)


def test_decimal_comma_hint(ds: Path) -> None:
    assert "use a dot as decimal separator" in only_error(check(ds, {"signal_file": "params.control", "factor": "1,5"}))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("a#b", "contains '#'"),
        ("caf\u00e9", "contains '\u00e9'"),
        ("", "is empty"),
        ("a@@b", "'@@'"),
        ("/vip/Home/x y/b;c", "contains ';'"),
    ],
)
def test_characters_vip_refuses(ds: Path, value: str, words: str) -> None:
    report = check(ds, {"signal_file": "params.control", "label": value})
    msg = only_error(report)
    assert "input 'label'" in msg and words in msg


def test_no_value(ds: Path) -> None:
    assert "has no value" in only_error(check(ds, {"signal_file": ["params.control", None]}))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("missing.RAW", "is not in the dataset folder"),
        ("signals/A.raw", "did you mean 'signals/a.RAW'"),
        ("signals/*.nii", "matches no file"),
        ("../outside.txt", "goes outside the dataset"),
        ("signals/../../x", "goes outside the dataset"),
        ("/home/me/a.RAW", "absolute path outside VIP"),
        ("~/a.RAW", "absolute path outside VIP"),
        ("https://example.org/a.RAW", "looks like a URL"),
        ("lfn:/grid/a.RAW", "looks like a URL"),
        ("signals\\a.RAW", "backslashes"),
        ("/vip/Home/../x", "contains '..'"),
        ("job.yaml", "never a pipeline input"),
        ("", "is empty"),
    ],
)
def test_file_value_errors(ds: Path, value: str, words: str) -> None:
    write(ds / "job.yaml", "runs: 1\n")
    msg = only_error(check(ds, {"signal_file": value}))
    assert "input 'signal_file'" in msg and words in msg


def test_empty_file(ds: Path) -> None:
    write(ds / "empty.RAW", "")
    msg = only_error(check(ds, {"signal_file": "empty.RAW"}))
    assert "is empty (0 bytes)" in msg and "would become a folder" in msg


def test_empty_file_inside_glob(ds: Path) -> None:
    write(ds / "signals" / "c.RAW", "")
    assert "'signals/c.RAW' is empty" in only_error(check(ds, {"signal_file": "signals/*.RAW"}))


def test_directory(ds: Path) -> None:
    msg = only_error(check(ds, {"signal_file": "signals"}))
    assert "is a folder" in msg and "'signals/*'" in msg


def test_symlink_leaving_dataset(ds: Path, tmp_path: Path) -> None:
    outside = write(tmp_path / "secret.txt", "s")
    os.symlink(outside, ds / "link.RAW")
    assert "leads outside the dataset" in only_error(check(ds, {"signal_file": "link.RAW"}))


def test_symlink_inside_dataset_is_fine(ds: Path) -> None:
    os.symlink(ds / "params.control", ds / "link.control")
    assert check(ds, {"signal_file": "link.control"}).ok


def test_dangling_symlink(ds: Path) -> None:
    os.symlink(ds / "gone", ds / "dangling.RAW")
    assert "link to a file that does not exist" in only_error(check(ds, {"signal_file": "dangling.RAW"}))


def test_runs_must_be_positive(ds: Path) -> None:
    for runs in (0, -1, True):
        assert "runs must be a whole number" in only_error(check(ds, {"signal_file": "params.control"}, runs=runs))


def test_bad_variant(ds: Path) -> None:
    report = check(ds, {"signal_file": "params.control"}, variants={"no good": {}, "x": "zero_fill"})
    assert len(report.errors) == 2
    assert "variant name 'no good'" in report.errors[0]
    assert "variant 'x' must be a mapping" in report.errors[1]


def test_unknown_input_in_variant_is_an_error(ds: Path) -> None:
    msg = only_error(check(ds, {"signal_file": "params.control"}, variants={"v": {"colour": "red"}}))
    assert "input 'colour' (variant 'v') is not a parameter" in msg


def test_expect_unmatched(ds: Path) -> None:
    msg = only_error(check(ds, {"signal_file": "params.control"}, expect=("done.marker",)))
    assert "expects a file matching 'done.marker'" in msg


def test_bad_vip_root(ds: Path) -> None:
    msg = only_error(check(ds, {"signal_file": "params.control"}, vip_root="/vip/Home/my~root"))
    assert "vip_root" in msg and "'~'" in msg


def test_other_dataset_path(ds: Path, tmp_path: Path) -> None:
    report = validate(job_for(ds, {"signal_file": "params.control"}), tmp_path, PIPELINE)
    assert "the job was loaded for" in only_error(report)


# --------------------------------------------------------------------------- VIP name sanitisation


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("my file \u00e9.txt", "my_file_e.txt"),
        ("  padded.txt\t", "padded.txt"),
        ("\u00c5ngstr\u00f6m.csv", "Angstrom.csv"),
        ("\u65e5\u672c.txt", ".txt"),
        ("a/b/c d.txt", "c_d.txt"),
        ("plain-name_1.RAW", "plain-name_1.RAW"),
        ("\ufb01le.txt", "file.txt"),  # NFKD also splits ligatures
    ],
)
def test_vip_safe_name(name: str, safe: str) -> None:
    assert vip_safe_name(name) == safe


def test_vip_safe_path() -> None:
    assert vip_safe_path("caf\u00e9 data/r\u00e9sum\u00e9 1.txt") == "cafe_data/resume_1.txt"


def test_renamed_file_warns_and_maps(ds: Path) -> None:
    write(ds / "caf\u00e9 data" / "scan 1.RAW", "s")
    report = check(ds, {"signal_file": "caf\u00e9 data/scan 1.RAW"})
    assert report.ok
    assert report.warnings == ["VIP will store 'caf\u00e9 data/scan 1.RAW' as 'cafe_data/scan_1.RAW' (it replaces spaces and drops accents)"]
    assert report.resolved is not None
    assert report.resolved.remote_path("/r", "caf\u00e9 data/scan 1.RAW") == "/r/cafe_data/scan_1.RAW"


def test_sanitised_collision(ds: Path) -> None:
    write(ds / "a b.RAW", "1")
    write(ds / "a_b.RAW", "2")
    msg = only_error(check(ds, {"signal_file": "*.RAW"}))
    assert "'a b.RAW', 'a_b.RAW' would all be stored on VIP as 'a_b.RAW'" in msg


def test_name_with_only_dropped_characters(ds: Path) -> None:
    write(ds / "\u65e5\u672c", "1")
    assert "made only of characters VIP drops" in only_error(check(ds, {"signal_file": "\u65e5\u672c"}))


@pytest.mark.parametrize("name", ["scan#1.RAW", "it's.RAW", "x@@y.RAW", "50%.RAW"])
def test_remote_name_invalid_as_input_value(ds: Path, name: str) -> None:
    write(ds / name, "1")
    msg = only_error(check(ds, {"signal_file": name}))
    assert f"the file '{name}' has" in msg and "Rename the file" in msg


# --------------------------------------------------------------------------- execution names


def test_execution_name_is_valid_and_deterministic() -> None:
    for job_name in ("subject-042", "caf\u00e9 / r\u00e9sum\u00e9 (v2).nii", "\u65e5\u672c", "x" * 300, "a.b.c"):
        name = execution_name(job_name, "fast", 2, "fp")
        assert EXEC_NAME_RE.fullmatch(name), name
        assert name == execution_name(job_name, "fast", 2, "fp")
        assert len(name) <= 80
    assert execution_name("subject-042", "default", 1, "abc").startswith("subject-042_default_r1_")
    assert execution_name("s", "v", 1, "fp1") != execution_name("s", "v", 1, "fp2")
    assert execution_name("s", "v", 1) != execution_name("s", "v", 2)
    # names that sanitise alike stay apart through the hash
    assert execution_name("a.b", "v", 1) != execution_name("a_b", "v", 1)
    assert re.fullmatch(r"dataset_default_r1_[0-9a-f]{8}", execution_name("\u65e5\u672c"))


# --------------------------------------------------------------------------- single-file datasets


def test_single_file_dataset_scope(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    write(drop / "job.yaml", "pipeline: LCModel/0.2\ninputs:\n  signal_file: '*.RAW'\n  control_file: other.RAW\n")
    f = write(drop / "s1.RAW", "1")
    write(drop / "s2.RAW", "2")
    write(drop / "other.RAW", "3")
    job = load_job(f, drop / "job.yaml")
    report = validate(job, f, PIPELINE)
    # the glob sees only the dataset file; another file of the drop folder is out of scope
    msg = only_error(report)
    assert "input 'control_file'" in msg and "only s1.RAW in scope" in msg
    assert report.resolved is not None
    assert report.resolved.files == ("s1.RAW",)
    assert report.resolved.remote_inputs("default", "/r")["signal_file"] == ["/r/s1.RAW"]


# --------------------------------------------------------------------------- examples vs real pipelines


def example_datasets() -> list[Path]:
    return sorted(p for p in (EXAMPLES / "drop").iterdir() if p.is_dir())


def test_examples_exist() -> None:
    assert len(example_datasets()) >= 2
    assert (EXAMPLES / "drop" / "job.yaml").is_file()


@pytest.mark.parametrize("dataset", example_datasets(), ids=lambda p: p.name)
def test_example_validates_against_builtin_pipeline(vip_server: Any, dataset: Path) -> None:
    from agent.vip.client import VipClient

    job = load_job(dataset, EXAMPLES / "drop" / "job.yaml")
    with VipClient(vip_server.url, vip_server.api_key, retries=0) as client:
        pipeline = client.pipeline(job.pipeline)
    report = validate(job, dataset, pipeline)
    assert report.errors == []
    assert report.warnings == []
    assert report.resolved is not None and report.resolved.files


def test_failing_example_validates(vip_server: Any) -> None:
    """examples/failing is valid: it fails at run time, on purpose, not at validation."""
    from agent.vip.client import VipClient

    dataset = EXAMPLES / "failing" / "fail-on-purpose"
    job = load_job(dataset, EXAMPLES / "failing" / "job.yaml")
    with VipClient(vip_server.url, vip_server.api_key, retries=0) as client:
        assert validate(job, dataset, client.pipeline(job.pipeline)).ok
