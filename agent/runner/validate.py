"""Stage ``validate``: read job.yaml, check it against the pipeline, fix the plan (files,
executions, session, output folder) in the journal before any byte is sent."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

from agent import dataset as dataset_mod
from agent.backend.errors import NotFoundError, VipError
from agent.errors import ValidationError
from agent.jobfile import JobSpec, load_job
from agent.journal import Dataset, Stage
from agent.names import execution_name
from agent.platformpaths import check_platform_paths, probe_with
from agent.runner.common import STATUS_FILE, Advance, Context, Next, dataset_root, safe_token
from agent.runner.settings import settings_of
from agent.session_data import SAVE_FILE
from agent.validate import closest_pipelines, resolve_inputs, validate


class PipelineSource(Protocol):
    """Anything that lists pipelines: a backend's engine (or a bare ``VipClient``)."""

    def pipelines(self) -> list[dict[str, object]]: ...


def unknown_pipeline(source: PipelineSource, identifier: str, server: str | None = None) -> str:
    """Why ``identifier`` cannot be used, naming the closest pipelines the server offers."""
    try:
        near = closest_pipelines(identifier, source.pipelines())
    except VipError:
        near = []
    hint = f" (closest: {', '.join(repr(n) for n in near)})" if near else ""
    where = server or str(getattr(source, "base_url", "the server"))
    return (
        f"pipeline {identifier!r} does not exist on {where} or you may not use it{hint}; "
        "check the name with `vip-agent pipelines`"
    )


#: what the agent writes into an output folder before any result: a folder holding only
#: these (and hidden temporary files) holds nothing of an attempt
BOOKKEEPING = frozenset({STATUS_FILE, SAVE_FILE})
#: how many numbered folders (``NAME-2`` ...) are looked at before a time-stamped one
MAX_SLOTS = 1000


def choose_output_dir(ds: Dataset, job: JobSpec, name: str) -> Path:
    """The output folder of this attempt of ``ds``: the rule of docs/operations.md
    ("Attempts and output folders"), computed here only, once per attempt, and stored in the
    journal before use.

    1. A dataset's folder is ``NAME``; when ``NAME`` holds another dataset's outputs (the
       same name dropped again with other content, or files of the user's), it is the first
       of ``NAME-2``, ``NAME-3`` ... that is free or already its own.
    2. Attempt 1 writes there; so does a later attempt when nothing of an earlier one is
       there (it ended before any result or log: the folder is missing or holds only
       ``STATUS.json``/``session_data.json``).
    3. Otherwise attempt N writes beside it into ``<folder>-attemptN``: the earlier
       attempts' results are never written over.
    """
    root = Path(ds.output_root)
    job_out = job.output_dir
    if job_out and not settings_of(ds).output_override:
        root = Path(job_out)
        if not root.is_absolute():
            root = Path(ds.path).parent / root
    base = safe_token(name, 80)
    for k in range(1, MAX_SLOTS + 1):
        folder = root / (base if k == 1 else f"{base}-{k}")
        if not folder.exists():
            return folder
        if not _owned_by(folder, ds):
            continue  # another dataset's (or the user's): never mixed
        if ds.attempt == 1 or _holds_nothing(folder):
            return folder
        later = folder.with_name(f"{folder.name}-attempt{ds.attempt}")
        if not later.exists() or (_owned_by(later, ds) and _holds_nothing(later)):
            return later
        return folder.with_name(f"{later.name}-{int(time.time())}")  # a user made it: beside
    return root / f"{base}-{int(time.time())}"


def _owned_by(folder: Path, ds: Dataset) -> bool:
    """Whether ``folder`` is this dataset's: its ``STATUS.json`` names the dataset's path and
    creation time (another dataset of the same name, even at the same path, has another)."""
    try:
        status = json.loads((folder / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(status, dict) and status.get("path") == ds.path
        and status.get("created") == ds.created
    )


def _holds_nothing(folder: Path) -> bool:
    """Nothing of an attempt is in ``folder``: only the agent's bookkeeping files."""
    try:
        return all(
            p.name in BOOKKEEPING or p.name.startswith(".") for p in folder.iterdir()
        )
    except OSError:
        return False


def step(ctx: Context, ds: Dataset) -> Next:
    journal = ctx.journal
    path = Path(ds.path)
    template = Path(ds.template) if ds.template else None
    settings = settings_of(ds)
    marker = settings.marker
    # every entry of the dataset must be readable (loops, permissions): said, never skipped
    dataset_mod.scan(
        dataset_root(ds), only=[path.name] if path.is_file() else None,
        exclude=(marker,) if marker else (),
    ).raise_if_unreadable()
    # keep_problems: a bad key of the job file is reported with the input problems, at once
    job = load_job(path, template, exclude=(marker,) if marker else (), keep_problems=True)
    backend = ctx.backend(ds.server)
    try:
        pipeline = backend.engine.pipeline(job.pipeline)
    except NotFoundError as err:
        raise ValidationError(
            [unknown_pipeline(backend.engine, job.pipeline, ds.server)], detail=err.detail
        ) from err
    report = validate(job, path, pipeline, max_runs=settings.max_runs, max_jobs=settings.max_jobs)
    # platform paths (/vip/...) the inputs name, and a group vip_root: there and readable,
    # or nothing is sent (VIP would fail the execution only after its jobs queued)
    check_platform_paths(report, job, pipeline, probe_with(backend.storage.exists),
                         vip_root=settings.vip_root)  # fmt: skip
    for warning in report.warnings:
        journal.event(ds.id, warning, level="warning")
    report.raise_if_errors()

    name = job.name or ds.name
    # a retry is a new attempt: new session and execution names, never the old ones. The
    # agent id keeps two agents' sessions apart on VIP; a plan already made keeps its names
    agent_id = journal.agent_id()
    identity = f"{agent_id}:{ds.fingerprint or ''}" + (f"#{ds.attempts}" if ds.attempts else "")
    session = f"{safe_token(name)}-{agent_id}-{(ds.fingerprint or '0' * 8)[:8]}"
    if ds.attempts:
        session += f"-a{ds.attempts + 1}"
    session = ds.session or session
    layout = backend.session(settings.vip_root or job.vip_root, session)
    resolved = report.resolved or resolve_inputs(job, path, pipeline)
    output_dir = ds.output_dir or str(choose_output_dir(ds, job, name))

    scan = dataset_mod.scan(resolved.root, only=list(resolved.files))
    by_rel = {f.rel: f for f in scan.files}
    entries = []
    for rel in resolved.files:
        f = by_rel.get(rel)
        if f is None:
            raise ValidationError([f"input file {rel} disappeared from the dataset"])
        entries.append((rel, f.size, f.mtime_ns, resolved.remote_path(layout.inputs, rel)))
    # written before any byte is sent: the plan is fixed from here on
    journal.set_files(ds.id, entries)
    for variant in resolved.variants:
        values = resolved.remote_inputs(variant, layout.inputs)
        for run in range(1, job.runs + 1):
            journal.add_execution(
                ds.id, key=f"{variant}-r{run}", name=execution_name(name, variant, run, identity),
                variant=variant, run=run, inputs=values,
            )
    journal.update(
        ds.id, name=name, job=job.to_dict(), session=session, remote_root=layout.root,
        output_dir=output_dir,
    )
    return Advance(
        Stage.UPLOAD,
        f"valid: {len(entries)} file(s) to upload, "
        f"{len(resolved.variants) * job.runs} execution(s) of {job.pipeline}",
    )
