"""Load ``job.yaml`` files and merge them into a :class:`JobSpec`.

A ``job.yaml`` in the drop folder is the *template* for every dataset in it; a
``job.yaml`` inside a dataset folder overrides it key by key (see
:func:`merge`). Structural problems (YAML syntax, unknown keys, wrong types)
raise one :class:`~agent.errors.ConfigError` that lists them all with file and
line. Checks that need the pipeline description live in :mod:`agent.validate`.

Input values are kept as the **text the user wrote** (``1.10`` stays
``"1.10"``, ``no`` stays ``"no"``): YAML's number and boolean guessing does not
apply to pipeline inputs, because VIP receives strings anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import yamlread
from agent.dataset import JOB_FILE, scan
from agent.errors import ConfigError
from agent.jobcheck import Doc, check_doc, listing, parse

#: remote folder under which the agent creates its per-dataset sessions
DEFAULT_VIP_ROOT = "/vip/Home/vip-agent"
#: name of the implicit variant when ``variants`` is absent
DEFAULT_VARIANT = "default"

#: the bounds of :mod:`agent.yamlread`, which reads job files and agent.yaml alike
MAX_JOB_BYTES = yamlread.MAX_BYTES
MAX_DEPTH = yamlread.MAX_DEPTH
MAX_NODES = yamlread.MAX_NODES
#: default most ``runs`` of one dataset (``max_runs`` in agent.yaml, ``run --max-runs``)
MAX_RUNS = 100
#: default most jobs one dataset may create on VIP, all variants and runs together
#: (``max_jobs`` in agent.yaml, ``run --max-jobs``)
MAX_JOBS = 1000

#: an input value as written in YAML: text, a list of texts, or None (``key:`` / ``null``)
InputValue = Any


@dataclass(frozen=True)
class JobSpec:
    """A dataset's job after merging the drop template with the dataset's own file.

    ``root`` is the folder relative input paths resolve in. For a folder dataset
    it is the dataset folder; for a single-file dataset it is the file's folder
    and ``single_file`` names the only file in scope. ``output_dir`` is the
    folder the user chose (absolute), or None for the agent's default; the
    runner puts each dataset's outputs in a subfolder named after ``name``.
    """

    pipeline: str
    name: str
    inputs: Mapping[str, InputValue]
    root: Path
    runs: int = 1
    variants: Mapping[str, Mapping[str, InputValue]] = field(default_factory=dict)
    output_dir: Path | None = None
    extract: bool = True
    cleanup: bool = True
    expect: tuple[str, ...] = ()
    vip_root: str = DEFAULT_VIP_ROOT
    single_file: str | None = None
    #: names in the dataset that are never inputs (e.g. the readiness marker)
    exclude: tuple[str, ...] = ()
    sources: tuple[Path, ...] = ()
    #: which file set each input: ``inputs.NAME`` / ``variants.V.inputs.NAME`` -> its path
    origins: Mapping[str, str] = field(default_factory=dict)
    #: problems with the job file's own keys (runs, extract, ...) kept for the validation
    #: report (``load_job(keep_problems=True)``), so that they come with the input problems
    problems: tuple[str, ...] = ()

    @property
    def dataset(self) -> Path:
        """The dataset itself: the folder, or the single file."""
        return self.root / self.single_file if self.single_file else self.root

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (for the journal); :meth:`from_dict` reverses it."""
        return {
            "pipeline": self.pipeline,
            "name": self.name,
            "inputs": dict(self.inputs),
            "root": str(self.root),
            "runs": self.runs,
            "variants": {k: dict(v) for k, v in self.variants.items()},
            "output_dir": str(self.output_dir) if self.output_dir is not None else None,
            "extract": self.extract,
            "cleanup": self.cleanup,
            "expect": list(self.expect),
            "vip_root": self.vip_root,
            "single_file": self.single_file,
            "exclude": list(self.exclude),
            "sources": [str(p) for p in self.sources],
            "origins": dict(self.origins),
            "problems": list(self.problems),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        out = data.get("output_dir")
        return cls(
            pipeline=data["pipeline"],
            name=data["name"],
            inputs=dict(data.get("inputs") or {}),
            root=Path(data["root"]),
            runs=int(data.get("runs", 1)),
            variants={k: dict(v) for k, v in (data.get("variants") or {}).items()},
            output_dir=Path(out) if out else None,
            extract=bool(data.get("extract", True)),
            cleanup=bool(data.get("cleanup", True)),
            expect=tuple(data.get("expect") or ()),
            vip_root=data.get("vip_root") or DEFAULT_VIP_ROOT,
            single_file=data.get("single_file"),
            exclude=tuple(data.get("exclude") or ()),
            sources=tuple(Path(p) for p in data.get("sources") or ()),
            origins=dict(data.get("origins") or {}),
            problems=tuple(data.get("problems") or ()),
        )

    def variant_inputs(self) -> dict[str, dict[str, InputValue]]:
        """Variant name -> the inputs it runs with (base inputs overlaid by its own).

        Without ``variants`` there is one variant, ``default``, with the base
        inputs. With ``variants`` only the named variants run. A ``None`` value
        removes an input (VIP then uses the pipeline's default).
        """
        if not self.variants:
            return {DEFAULT_VARIANT: {k: v for k, v in self.inputs.items() if v is not None}}
        out: dict[str, dict[str, InputValue]] = {}
        for vname, override in self.variants.items():
            merged = dict(self.inputs)
            merged.update(override)
            out[vname] = {k: v for k, v in merged.items() if v is not None}
        return out

    def input_source(self, name: str, variant: str | None = None) -> Path | None:
        """The job file that set input ``name`` (in ``variant``, else the base inputs)."""
        key = f"variants.{variant}.inputs.{name}" if variant else None
        found = (self.origins.get(key) if key else None) or self.origins.get(f"inputs.{name}")
        return Path(found) if found else None

    def inherited_from(self, name: str, variant: str | None = None) -> Path | None:
        """The file input ``name`` came from when it is not the dataset's own job.yaml (the
        drop folder's template, or ``--job``), so that a message can name it."""
        source = self.input_source(name, variant)
        own = self.root / JOB_FILE if self.single_file is None else None
        return source if source is not None and source != own else None

    def missing_expected(self) -> list[str]:
        """The ``expect`` patterns that match no file of the dataset yet (for readiness)."""
        rels = dataset_files(self)
        return [p for p in self.expect if not any(glob_match(p, r) for r in rels)]


# --------------------------------------------------------------------------- paths


def dataset_files(job: JobSpec) -> list[str]:
    """Relative POSIX names of the files in scope (job.yaml, dot-files and partial files excluded)."""
    only = [job.single_file] if job.single_file else None
    return [f.rel for f in scan(job.root, only=only, exclude=job.exclude).files]


def has_magic(pattern: str) -> bool:
    """Whether ``pattern`` is a glob rather than a plain path."""
    return any(c in pattern for c in "*?[")


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _translate(pattern: str) -> re.Pattern[str]:
    """Glob -> regex: ``*``/``?``/``[...]`` stay inside one folder, ``**/`` spans folders.

    Wildcards never match a leading dot, like the shell.
    """
    cached = _GLOB_CACHE.get(pattern)
    if cached is not None:
        return cached
    parts = pattern.split("/")
    out: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(r"(?:[^/.][^/]*/)*" if not last else r"(?:[^/.][^/]*/)*[^/.][^/]*")
            continue
        seg = ""
        j = 0
        while j < len(part):
            c = part[j]
            if c == "*":
                seg += "[^/]*"
            elif c == "?":
                seg += "[^/]"
            elif c == "[":
                k = part.find("]", j + 2 if part[j + 1 : j + 2] in ("!", "^") else j + 1)
                if k < 0:
                    seg += re.escape(c)
                else:
                    body = part[j + 1 : k]
                    if body[:1] in ("!", "^"):
                        body = "^" + body[1:]
                    seg += "[" + body.replace("\\", "\\\\") + "]"
                    j = k
            else:
                seg += re.escape(c)
            j += 1
        if not part.startswith(".") and has_magic(part[:1]):
            seg = "(?!\\.)" + seg
        out.append(seg + ("" if last else "/"))
    rx = re.compile("".join(out))
    _GLOB_CACHE[pattern] = rx
    return rx


def glob_match(pattern: str, rel: str) -> bool:
    """Whether the relative POSIX path ``rel`` matches the glob ``pattern``."""
    return _translate(norm_rel(pattern)).fullmatch(rel) is not None


def norm_rel(value: str) -> str:
    """A relative path or glob without leading ``./`` and doubled slashes."""
    while value.startswith("./"):
        value = value[2:]
    return re.sub("/{2,}", "/", value)


def is_remote(value: str) -> bool:
    """A value that names a file already on VIP (passed through, never uploaded)."""
    return value == "/vip" or value.startswith("/vip/")


# --------------------------------------------------------------------------- YAML


# --------------------------------------------------------------------------- merge


def merge(template: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay a dataset's job file on the drop template.

    Rule: top-level keys replace the template's. ``inputs`` merge input by input,
    ``variants`` merge variant by variant and, inside a variant, ``inputs`` input
    by input. Lists are replaced, never concatenated. A ``null`` value removes
    the key it names (a top-level key, a base input, a whole variant); a
    ``null`` input inside a variant is kept: that variant runs without the input.
    """
    out: dict[str, Any] = {k: v for k, v in template.items()}
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif key == "inputs" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        elif key == "variants" and isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = dict(out[key])
            for vname, body in value.items():
                base = merged.get(vname)
                if body is None:
                    merged.pop(vname, None)
                elif isinstance(body, dict) and isinstance(base, dict):
                    nb = dict(base)
                    for k, v in body.items():
                        if k == "inputs" and isinstance(v, dict) and isinstance(nb.get(k), dict):
                            # keep nulls: inside a variant, null means "run without this input"
                            nb[k] = {**nb[k], **v}
                        elif v is None:
                            nb.pop(k, None)
                        else:
                            nb[k] = v
                    merged[vname] = nb
                else:
                    merged[vname] = body
            out[key] = merged
        else:
            out[key] = value
    return out


def _overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- load


def _stem(filename: str) -> str:
    """File name without its extension (both parts of ``.nii.gz``-like ones)."""
    stem, dot, ext = filename.rpartition(".")
    if not dot or not stem:
        return filename
    if ext.lower() in ("gz", "bz2", "xz", "zst") and "." in stem:
        stem = stem.rpartition(".")[0]
    return stem


def find_template(dataset: Path) -> Path | None:
    """The drop folder's job.yaml for ``dataset`` (folder or file), if there is one."""
    candidate = dataset.parent / JOB_FILE
    return candidate if candidate.is_file() else None


def load_job(
    dataset: Path, template: Path | None = None, *, exclude: Iterable[str] = (),
    keep_problems: bool = False,
) -> JobSpec:
    """Build the :class:`JobSpec` of ``dataset`` (a folder, or one acquisition file).

    ``template`` is the drop folder's ``job.yaml``. A folder dataset may carry its
    own ``job.yaml`` that overrides the template key by key; a single-file
    dataset takes its job from the template alone. Raises ConfigError listing
    every structural problem found. With ``keep_problems``, a problem of one of the job's
    own keys (``runs``, ``extract``, an unknown key...) does not raise: the key is left out
    and the message kept in :attr:`JobSpec.problems`, for :func:`agent.validate.validate`
    to report together with the input problems.
    """
    dataset = Path(dataset).absolute()
    if not dataset.exists():
        raise ConfigError(f"the dataset {dataset} does not exist")
    single = dataset.is_file()
    if single and dataset.name == JOB_FILE:
        raise ConfigError(f"{dataset} is a job file, not a dataset")
    docs: list[Doc] = []
    if template is not None:
        docs.append(parse(Path(template).absolute()))
    own = None if single else dataset / JOB_FILE
    if own is not None and own.is_file():
        docs.append(parse(own))
    if not docs:
        if single:
            raise ConfigError(
                f"{dataset.name}: a single-file dataset takes its job from the drop folder's "
                f"{JOB_FILE}, and there is none in {dataset.parent}"
            )
        alt = dataset / "job.yml"
        hint = f" (found {alt.name}: rename it to {JOB_FILE})" if alt.exists() else ""
        raise ConfigError(
            f"{dataset.name}: no {JOB_FILE} in the dataset or its drop folder{hint}; "
            "write one (see 'vip-agent pipelines PIPELINE --job-yaml')"
        )

    problems: list[str] = []
    keyed: list[tuple[Doc, str, str]] = []
    for doc in docs:
        check_doc(doc, problems, keyed)
    if problems or (keyed and not keep_problems):
        every = problems + [message for _doc, _key, message in keyed]
        raise ConfigError(listing(every) if len(every) > 1 else every[0])
    for doc, key, _message in keyed:
        doc.data.pop(key, None)  # left out: its problem is reported by the validation

    origins: dict[str, str] = {}
    for doc in docs:  # the later file (the dataset's own) wins, as in merge()
        for name in doc.data.get("inputs") or {}:
            origins[f"inputs.{name}"] = str(doc.path)
        for vname, body in (doc.data.get("variants") or {}).items():
            for name in ((body or {}).get("inputs") or {}) if isinstance(body, dict) else ():
                origins[f"variants.{vname}.inputs.{name}"] = str(doc.path)

    data: dict[str, Any] = {}
    for doc in docs:
        data = merge(data, doc.data)

    sources = tuple(doc.path for doc in docs)
    files = ", ".join(str(p) for p in sources)
    if not data.get("pipeline"):
        problems.append(f"'pipeline' is missing (checked {files}); e.g. pipeline: LCModel/0.2")
    if data.get("inputs") is None and not data.get("variants"):
        problems.append(f"'inputs' is missing (checked {files}); list the pipeline's input values")
    if problems:
        raise ConfigError(listing(problems) if len(problems) > 1 else problems[0])

    root = dataset.parent if single else dataset
    name = data.get("name") or (_stem(dataset.name) if single else dataset.name)
    variants: dict[str, dict[str, InputValue]] = {}
    for vname, body in (data.get("variants") or {}).items():
        variants[vname] = dict((body or {}).get("inputs") or {})
    out_raw = data.get("output_dir")
    output_dir = None
    if out_raw:
        # relative to the drop folder, whichever file set it (dataset folders come and go)
        drop = root if single else root.parent
        output_dir = (drop / Path(out_raw).expanduser()).resolve()
    expect = data.get("expect") or ()
    if isinstance(expect, str):
        expect = (expect,)
    return JobSpec(
        pipeline=data["pipeline"],
        name=name,
        inputs=dict(data.get("inputs") or {}),
        root=root,
        runs=data.get("runs") or 1,
        variants=variants,
        output_dir=output_dir,
        extract=data.get("extract", True),
        cleanup=data.get("cleanup", True),
        expect=tuple(expect),
        vip_root=(data.get("vip_root") or DEFAULT_VIP_ROOT).rstrip("/"),
        single_file=dataset.name if single else None,
        exclude=tuple(exclude),
        sources=sources,
        origins=origins,
        problems=tuple(message for _doc, _key, message in keyed),
    )
