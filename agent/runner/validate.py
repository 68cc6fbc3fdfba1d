"""Stage ``validate``: read job.yaml, check it against the pipeline, fix the plan (files,
executions, session, output folder) in the journal before any byte is sent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from agent import dataset as dataset_mod
from agent.errors import ValidationError
from agent.jobfile import JobSpec, load_job
from agent.journal import Dataset, Stage
from agent.runner.common import Advance, Context, Next, dataset_root, safe_token
from agent.runner.settings import settings_of
from agent.validate import (
    check_platform_paths,
    closest_pipelines,
    execution_name,
    probe_with,
    resolve_inputs,
    validate,
)
from agent.vip.errors import NotFoundError, VipError


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


def choose_output_dir(ds: Dataset, job: JobSpec, name: str) -> Path:
    root = Path(ds.output_root)
    job_out = job.output_dir
    if job_out and not settings_of(ds).output_override:
        root = Path(job_out)
        if not root.is_absolute():
            root = Path(ds.path).parent / root
    base = safe_token(name, 80)
    # chosen once, stored in the journal before use; never a folder that already exists
    candidates = [base, f"{base}-{(ds.fingerprint or '')[:8]}", f"{base}-{ds.id}"]
    if ds.attempts:
        candidates.insert(0, f"{base}-attempt{ds.attempts + 1}")
    for candidate in candidates:
        if not (root / candidate).exists():
            return root / candidate
    return root / f"{base}-{ds.id}-{int(time.time())}"


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
    # a retry is a new attempt: new session and execution names, never the old ones
    identity = (ds.fingerprint or "") + (f"#{ds.attempts}" if ds.attempts else "")
    session = f"{safe_token(name)}-{(ds.fingerprint or '0' * 8)[:8]}"
    if ds.attempts:
        session += f"-a{ds.attempts + 1}"
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
