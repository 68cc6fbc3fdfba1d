"""Check a :class:`~agent.jobfile.JobSpec` and its dataset against a VIP pipeline.

:func:`validate` reports every problem at once, in words a lab user can act
on, before a byte is sent. :func:`resolve_inputs` turns a job's input values
into concrete values per variant: local files (found by path or glob inside the
dataset, uploaded once) and texts (passed as they are). The rules mirror what
the VIP server accepts (see docs/job-yaml.md and docs/vip-rest.md).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.dataset import JOB_FILE
from agent.errors import ValidationError
from agent.fsutil import natural_key
from agent.jobcheck import VARIANT_NAME_RE
from agent.jobfile import (
    MAX_JOBS,
    MAX_RUNS,
    JobSpec,
    dataset_files,
    glob_match,
    has_magic,
    is_remote,
    norm_rel,
)
from agent.names import vip_safe_path
from agent.resolved import Item, LocalFile, ResolvedInput, ResolvedJob, ResolvedVariant

#: characters VIP accepts in one input value (AC INPUT_VALID_CHARS + additional chars)
INPUT_VALUE_RE = re.compile(r"[0-9.,A-Za-z\-+@/_(): \[\]?&=]+")
#: legacy server placeholders that mean "no default value"
NO_DEFAULT = frozenset({"$input.getDefaultValue()", "No_value_provided"})
#: the agent always sets this input itself
RESULTS_DIRECTORY = "results-directory"
ALLOWED_CHARS_WORDS = "letters, digits, spaces and . , - + @ / _ ( ) : [ ] ? & ="
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})
#: above this many jobs for one dataset, warn (a list or glob may be broader than meant)
MANY_JOBS = 100


# --------------------------------------------------------------------------- report


@dataclass
class ValidationReport:
    """Every problem found; ``errors`` stop the dataset, ``warnings`` do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resolved: ResolvedJob | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, msg: str) -> None:
        if msg not in self.errors:
            self.errors.append(msg)

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def raise_if_errors(self) -> None:
        if self.errors:
            raise ValidationError(self.errors, detail="; ".join(self.warnings) or None)

    def text(self) -> str:
        """Human-readable summary (for ERROR.txt and the CLI)."""
        lines = [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines) if lines else "ok"


# --------------------------------------------------------------------------- helpers


def pipeline_params(pipeline: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not pipeline:
        return {}
    return {str(p.get("name")): p for p in pipeline.get("parameters") or [] if p.get("name")}


def has_default(param: Mapping[str, Any]) -> bool:
    """Whether VIP will fill this parameter itself (legacy placeholders mean no)."""
    d = param.get("defaultValue")
    if d is None:
        return False
    if isinstance(d, str) and (d == "" or d in NO_DEFAULT):
        return False
    return True


def _as_text(value: Any) -> str | None:
    """A scalar as VIP will see it (Java ``toString``); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)


def _desc(param: Mapping[str, Any] | None) -> str:
    if not param:
        return ""
    text = re.sub(r"<[^>]+>", " ", str(param.get("description") or ""))
    text = " ".join(text.split())
    return f" ({text[:100]}{'...' if len(text) > 100 else ''})" if text else ""


def _check_chars(label: str, value: str, report: ValidationReport) -> None:
    if value == "":
        report.error(
            f"{label} is empty; VIP refuses empty values. Give a value, or remove the input"
        )
        return
    bad = sorted({c for c in value if not INPUT_VALUE_RE.fullmatch(c)})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        report.error(
            f"{label} has the value '{value}', which contains {shown}: VIP only accepts "
            f"{ALLOWED_CHARS_WORDS}. Change the value"
        )
    if "@@" in value:
        report.error(
            f"{label} contains '@@', which VIP reads as a list separator; to run several values, "
            "write them as a YAML list instead"
        )


class _Scope:
    """The dataset's files, listed once."""

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self._files: list[str] | None = None

    @property
    def files(self) -> list[str]:
        if self._files is None:
            self._files = dataset_files(self.job)
        return self._files

    def where(self) -> str:
        if self.job.single_file:
            return f"the dataset file {self.job.single_file}"
        return f"the dataset folder {self.job.root}"


def _check_local(scope: _Scope, rel: str, label: str, report: ValidationReport) -> LocalFile | None:
    """Existence, type, size and containment of one local file."""
    job = scope.job
    root = job.root
    path = root / rel
    try:
        st = os.lstat(path)
    except OSError:
        near = [f for f in scope.files if f.lower() == rel.lower()]
        near = near or difflib.get_close_matches(rel, scope.files, n=1, cutoff=0.6)
        report.error(
            f"{label}: the file '{rel}' is not in {scope.where()}"
            + (f" (did you mean '{near[0]}'?)" if near else "")
            + ". Check the name (case matters) or add the file"
        )
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            report.error(
                f"{label}: '{rel}' is a symbolic link to a file that does not exist. Fix or replace the link"
            )
            return None
        real_root = root.resolve()
        if job.single_file:
            inside = target == (root / job.single_file).resolve()
        else:
            inside = target == real_root or real_root in target.parents
        if not inside:
            report.error(
                f"{label}: '{rel}' is a symbolic link that leads outside the dataset (to {target}). "
                "Copy the file into the dataset instead of linking it"
            )
            return None
        st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        report.error(
            f"{label}: '{rel}' is a folder, but this input takes one file. Use a pattern such as "
            f"'{rel}/*' for one job per file, or pack the folder into a .zip or .tar.gz"
        )
        return None
    if not stat.S_ISREG(st.st_mode):
        report.error(f"{label}: '{rel}' is not a regular file")
        return None
    if st.st_size == 0:
        report.error(
            f"{label}: the file '{rel}' is empty (0 bytes); VIP cannot store empty files "
            "(it would become a folder). Check the file was copied completely"
        )
        return None
    return LocalFile(rel=rel, path=path, size=st.st_size, remote_rel=vip_safe_path(rel))


def _resolve_file(
    scope: _Scope, value: str, label: str, report: ValidationReport
) -> tuple[list[Item], bool]:
    """One File value -> remote path text or local files; bool: a glob (so a list)."""
    job = scope.job
    if value == "":
        report.error(
            f"{label} is empty; give a file path inside the dataset, a pattern, or a /vip/... path"
        )
        return [], False
    if is_remote(value):
        if ".." in value.split("/"):
            report.error(
                f"{label}: the VIP path '{value}' contains '..'; write the path without it"
            )
        else:
            _check_chars(label, value, report)
        return [value], False
    if "\\" in value:
        report.error(
            f"{label}: '{value}' uses backslashes; write paths with '/' (e.g. signals/a.RAW)"
        )
        return [], False
    if _URL_RE.match(value):
        report.error(
            f"{label}: '{value}' looks like a URL; give a file inside the dataset, or a file already "
            "on VIP as /vip/Home/..."
        )
        return [], False
    if value.startswith("/") or value.startswith("~"):
        report.error(
            f"{label}: '{value}' is an absolute path outside VIP. Put the file inside the dataset and "
            "give its path relative to the dataset folder, or upload it to VIP and give /vip/..."
        )
        return [], False
    rel = norm_rel(value)
    if ".." in PurePosixPath(rel).parts:
        report.error(
            f"{label}: '{value}' goes outside the dataset ('..'). Only files inside the dataset are "
            "uploaded; copy the file in, or use a /vip/... path"
        )
        return [], False
    if rel == JOB_FILE:
        report.error(f"{label}: {JOB_FILE} is the job description, never a pipeline input")
        return [], False
    if has_magic(rel):
        # natural order: f1, f2, ..., f10 become jobs 0, 1, ..., 9 (not f1, f10, f11, f2)
        matches = sorted((r for r in scope.files if glob_match(rel, r)), key=natural_key)
        if not matches:
            extra = (
                f" (only {job.single_file} is in scope for a single-file dataset)"
                if job.single_file
                else ""
            )
            report.error(
                f"{label}: the pattern '{value}' matches no file in {scope.where()}{extra}. "
                "Check the pattern (case matters) or add the files"
            )
            return [], True
        items: list[Item] = []
        for m in matches:
            f = _check_local(scope, m, label, report)
            if f is not None:
                items.append(f)
        return items, True
    if job.single_file and rel != job.single_file:
        report.error(
            f"{label}: '{value}' is not the dataset file; a single-file dataset has only "
            f"{job.single_file} in scope. Put shared files on VIP (/vip/...) or make the dataset a folder"
        )
        return [], False
    f = _check_local(scope, rel, label, report)
    return ([f] if f is not None else []), False


def _check_typed(ptype: str, text: str, label: str, report: ValidationReport) -> str:
    """Type check for Boolean/Int64/Double; returns the normalised text."""
    t = text.strip()
    if ptype == "Boolean":
        low = t.lower()
        if low in _TRUE:
            return "true"
        if low in _FALSE:
            return "false"
        report.error(f"{label} must be true or false, not '{text}'")
    elif ptype == "Int64":
        if not _INT_RE.fullmatch(t) or not -(2**63) <= int(t) < 2**63:
            report.error(f"{label} must be a whole number (e.g. 3), not '{text}'")
        return t
    elif ptype == "Double":
        ok = bool(_FLOAT_RE.fullmatch(t)) and math.isfinite(float(t))
        if not ok:
            hint = " (use a dot as decimal separator)" if re.fullmatch(r"[+-]?\d+,\d+", t) else ""
            report.error(f"{label} must be a number (e.g. 0.5){hint}, not '{text}'")
        return t
    return text


# --------------------------------------------------------------------------- main entry points


def _resolve(
    job: JobSpec, pipeline: Mapping[str, Any] | None, report: ValidationReport
) -> ResolvedJob:
    params = pipeline_params(pipeline)
    scope = _Scope(job)
    variants: dict[str, ResolvedVariant] = {}
    files: dict[str, LocalFile] = {}
    many = len(job.variants) > 0
    for vname, inputs in job.variant_inputs().items():
        in_v = f" (variant '{vname}')" if many else ""
        resolved: dict[str, ResolvedInput] = {}
        for name, raw in inputs.items():
            inherited = job.inherited_from(name, vname if many else None)
            # an input set in the drop folder's template is named with it: the user looks
            # for it in the dataset's job.yaml otherwise
            in_file = f" (set in {inherited})" if inherited is not None else ""
            label = f"input '{name}'{in_v}{in_file}"
            if name == RESULTS_DIRECTORY:
                report.error(
                    f"input '{RESULTS_DIRECTORY}' is set by vip-agent (outputs are mirrored to "
                    f"output_dir); remove it from the job file's inputs"
                )
                continue
            param = params.get(name)
            if pipeline is not None and param is None:
                # an error, not a warning: VIP ignores unknown inputs, so a typo would
                # silently run the pipeline with the default the user meant to change
                report.error(unknown_input(name, job.pipeline, list(params), where=in_v + in_file,
                                           file=inherited))  # fmt: skip
                continue
            ptype = (
                str(param.get("type") or "String") if param else _guess_type(scope, raw, pipeline)
            )
            is_list = isinstance(raw, list)
            raws = list(raw) if isinstance(raw, (list, tuple)) else [raw]
            items: list[Item] = []
            for r in raws:
                text = _as_text(r)
                if text is None:
                    report.error(f"{label} has no value; give one, or remove the line")
                    continue
                if ptype == "File" or (ptype == "List" and _names_local(scope, text)):
                    got, globbed = _resolve_file(scope, text, label, report)
                    is_list = is_list or globbed
                    items.extend(got)
                    for f in got:
                        if isinstance(f, LocalFile):
                            files.setdefault(f.rel, f)
                else:
                    text = _check_typed(ptype, text, label, report)
                    _check_chars(label, text, report)
                    items.append(text)
            if items:
                resolved[name] = ResolvedInput(tuple(items), is_list, crossed=ptype != "List")
        for pname, param in params.items():
            if pname in inputs or param.get("isOptional") or has_default(param):
                continue
            report.error(
                f"the pipeline {job.pipeline} needs input '{pname}' ({param.get('type', '?')})"
                f"{_desc(param)}, and the job file does not set it{in_v}; add '{pname}: ...' under inputs"
            )
        rv = ResolvedVariant(vname, resolved)
        lists = [
            f"'{k}' ({len(v.items)} values)"
            for k, v in resolved.items()
            if v.is_list and v.crossed and len(v.items) > 1
        ]
        if len(lists) > 1:
            report.warn(
                f"inputs {', '.join(lists)}{in_v} are all lists: VIP runs every combination "
                f"({rv.job_count} jobs per run)"
            )
        if rv.job_count * job.runs > MANY_JOBS:
            report.warn(
                f"this dataset{in_v} makes {rv.job_count * job.runs} jobs; check the patterns and lists "
                "are what you meant"
            )
        variants[vname] = rv
    ordered = {k: files[k] for k in sorted(files)}
    _check_names(ordered.values(), job, report)
    return ResolvedJob(job, variants, ordered)


def unknown_input(name: str, pipeline: str, params: Sequence[str], *, where: str = "",
                  file: Path | None = None) -> str:  # fmt: skip
    """The message for an input name the pipeline does not have, naming the closest real one
    (and ``file``, the job file to fix, when it is not the dataset's own)."""
    near = difflib.get_close_matches(name, list(params), n=1, cutoff=0.0)
    text = f"input '{name}'{where} is not a parameter of {pipeline}"
    if near:
        text += f" (did you mean '{near[0]}'?)"
    if params:
        text += f"; its inputs are: {', '.join(sorted(params))}"
    fix = f"fix the name in {file}" if file is not None else "fix the name in the job file"
    return text + f"; {fix} (`vip-agent pipelines {pipeline}` describes them)"


def closest_pipelines(identifier: str, listing: Iterable[Mapping[str, Any]], n: int = 3) -> list[str]:
    """Identifiers in ``listing`` closest to ``identifier`` (case-insensitive), best first."""
    ids = [str(p.get("identifier")) for p in listing if p.get("identifier")]
    lowered = {i.lower(): i for i in ids}
    near = difflib.get_close_matches(identifier.lower(), list(lowered), n=n, cutoff=0.5)
    name = identifier.split("/")[0].lower()
    same_name = [i for i in ids if i.split("/")[0].lower() == name and lowered[i.lower()] not in near]
    return ([lowered[k] for k in near] + same_name)[:n]


def _names_local(scope: _Scope, text: str) -> bool:
    """Whether a List item names dataset files (VIP does not say what a List holds)."""
    if is_remote(text) or not text:
        return False
    rel = norm_rel(text)
    if has_magic(rel):
        return any(glob_match(rel, r) for r in scope.files)
    return rel in scope.files


def _guess_type(scope: _Scope, raw: Any, pipeline: Mapping[str, Any] | None) -> str:
    """Without a pipeline description: a value naming dataset files is a File."""
    if pipeline is not None:
        return "String"  # unknown to the pipeline: pass as text
    values = raw if isinstance(raw, list) else [raw]
    for v in values:
        t = _as_text(v)
        if t and _names_local(scope, t):
            return "File"
    return "String"


def _check_names(files: Iterable[LocalFile], job: JobSpec, report: ValidationReport) -> None:
    """VIP renames uploads: report renames, collisions and names it cannot pass as values."""
    by_remote: dict[str, list[str]] = {}
    for f in files:
        by_remote.setdefault(f.remote_rel, []).append(f.rel)
        if any(part == "" for part in f.remote_rel.split("/")):
            report.error(
                f"the file '{f.rel}' has a name made only of characters VIP drops (accents, non-Latin "
                "letters); rename it with letters, digits, '-' or '_'"
            )
            continue
        if f.remote_rel != f.rel:
            report.warn(
                f"VIP will store '{f.rel}' as '{f.remote_rel}' (it replaces spaces and drops accents)"
            )
        bad = sorted({c for c in f.remote_rel if not INPUT_VALUE_RE.fullmatch(c)})
        if bad or "@@" in f.remote_rel:
            shown = " ".join(repr(c) for c in bad) if bad else "'@@'"
            report.error(
                f"the file '{f.rel}' has {shown} in its name; VIP refuses it in input values "
                f"(allowed: {ALLOWED_CHARS_WORDS}). Rename the file"
            )
    for remote, rels in by_remote.items():
        if len(rels) > 1:
            report.error(
                f"the files {', '.join(repr(r) for r in rels)} would all be stored on VIP as "
                f"'{remote}' (VIP replaces spaces and drops accents); rename one of them"
            )
    root_bad = sorted({c for c in job.vip_root if not INPUT_VALUE_RE.fullmatch(c)})
    if root_bad:
        report.error(
            f"vip_root '{job.vip_root}' contains {' '.join(repr(c) for c in root_bad)}, which VIP refuses "
            f"in input values; use only {ALLOWED_CHARS_WORDS}"
        )


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.absolute() == b.absolute()


#: pipeline identifier -> last description seen by validate(), so that
#: resolve_inputs(job, path) called after validate() types values the same way
_SEEN_PIPELINES: dict[str, Mapping[str, Any]] = {}


def validate(
    job: JobSpec, dataset: Path | None, pipeline: Mapping[str, Any], *,
    max_runs: int | None = None, max_jobs: int | None = None,
) -> ValidationReport:  # fmt: skip
    """Check ``job`` and its dataset against ``pipeline`` (``GET /rest/pipelines/{id}`` JSON).

    Never raises for a problem with the data: every problem is in the report.
    ``dataset`` must be the path the job was loaded for (``job.dataset``).
    ``max_runs``/``max_jobs`` (default :data:`agent.jobfile.MAX_RUNS`/``MAX_JOBS``)
    refuse a job that would launch more than that.
    """
    max_runs = MAX_RUNS if max_runs is None else max_runs
    max_jobs = MAX_JOBS if max_jobs is None else max_jobs
    report = ValidationReport()
    _SEEN_PIPELINES[job.pipeline] = pipeline
    if dataset is not None and not _same(Path(dataset), job.dataset):
        report.error(f"the job was loaded for {job.dataset}, not for {dataset}")
        return report
    for problem in job.problems:  # the job file's own keys (load_job(keep_problems=True))
        report.error(problem)
    ident = pipeline.get("identifier")
    if ident and ident != job.pipeline:
        report.warn(f"the job names pipeline {job.pipeline} but was checked against {ident}")
    if isinstance(job.runs, bool) or not isinstance(job.runs, int) or job.runs < 1:
        report.error(f"runs must be a whole number of at least 1, not {job.runs!r}")
    elif job.runs > max_runs:
        report.error(
            f"runs: {job.runs} is more than the {max_runs} runs a dataset may ask for; lower it "
            "(or raise max_runs in agent.yaml, or --max-runs for `vip-agent run`)"
        )
    unusable = False
    for vname, override in job.variants.items():
        if not VARIANT_NAME_RE.fullmatch(vname):
            report.error(f"variant name '{vname}' may only use letters, digits, '-' and '_'")
        if not isinstance(override, Mapping):
            report.error(f"variant '{vname}' must be a mapping of inputs, not {override!r}")
            unusable = True
    if unusable:  # the inputs cannot be read; anything else is reported with them, at once
        return report
    if not job.dataset.exists():
        report.error(f"the dataset {job.dataset} no longer exists")
        return report
    report.resolved = _resolve(job, pipeline, report)
    runs = job.runs if isinstance(job.runs, int) and not isinstance(job.runs, bool) and job.runs > 0 else 1
    jobs = sum(v.job_count for v in report.resolved.variants.values()) * runs
    if jobs > max_jobs:
        report.error(
            f"this dataset would create {jobs:,} jobs on VIP ({len(report.resolved.variants)} "
            f"variant(s) x {runs} run(s) x the lists and patterns of its inputs), more than "
            f"the {max_jobs:,} allowed; check the lists and patterns (or raise max_jobs in "
            "agent.yaml, or --max-jobs for `vip-agent run`)"
        )
    for pattern in job.missing_expected():
        report.error(
            f"the job expects a file matching '{pattern}' (key 'expect'), and {_Scope(job).where()} has none"
        )
    return report


def resolve_inputs(
    job: JobSpec, dataset: Path | None = None, pipeline: Mapping[str, Any] | None = None
) -> ResolvedJob:
    """Concrete input values of every variant, and the files to upload once.

    The pipeline's parameter types decide which values are files. Without
    ``pipeline``, the description last given to :func:`validate` for the same
    identifier is used; failing that, a value is a file when it names (or a
    pattern matches) a dataset file. Raises ValidationError when something
    cannot be resolved.
    """
    if pipeline is None:
        pipeline = _SEEN_PIPELINES.get(job.pipeline)
    if pipeline is not None:
        report = validate(job, dataset, pipeline)
    else:
        report = ValidationReport()
        report.resolved = _resolve(job, None, report)
    report.raise_if_errors()
    assert report.resolved is not None
    return report.resolved
