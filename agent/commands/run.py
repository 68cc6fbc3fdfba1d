"""``vip-agent run DATASET``: one dataset from job.yaml to mirrored outputs and a clean server.

Exit status: 0 done (last stdout line: the output folder), 1 failed, 2 invalid (nothing
launched, or a refused option), 3 incomplete (outputs left on VIP; the output folder is
printed too), 4 cancelled (``vip-agent cancel`` from another shell), 130 stopped by
SIGINT/SIGTERM (resumable: run the same command again), 75 not run here: the running
service has it (or would take it: it is in one of its drop folders, or in progress in the
journal) or another ``vip-agent run`` drives it, said in one line naming that process's pid
(also 75: VIP kept failing past ``--give-up-after``).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import actions
from agent import dataset as dataset_mod
from agent.backend import open_backend
from agent.bandwidth import BandwidthConfig, Limiter, RateError, parse_bwlimit
from agent.config import parse_duration, parse_poll
from agent.errors import ConfigError
from agent.fsutil import natural_key
from agent.jobfile import MAX_JOBS, MAX_RUNS
from agent.journal import LEASE_BEAT, Dataset, Journal, Owner
from agent.leftovers import left_on_vip
from agent.pacer import DEFAULT_MAX_TRANSFERS, budget_for
from agent.paths import DEFAULT_SERVER
from agent.progress import TerminalProgress, human_size
from agent.runner import (
    DEFAULT_POLL_MAX,
    DEFAULT_POLL_MIN,
    GIVE_UP_AFTER,
    UNKNOWN_LIMIT,
    GaveUp,
    Interrupted,
    Runner,
    admit,
)
from agent.settings import dataset_server
from agent.settings import resolve as resolve_settings
from agent.vip.client import VipClient
from agent.watch.after import update_error_report
from agent.watch.claim import read_claim
from agent.watch.lock import AgentLock

EXIT_DONE, EXIT_FAILED, EXIT_INVALID, EXIT_INCOMPLETE, EXIT_CANCELLED = 0, 1, 2, 3, 4
EXIT_STOPPED = 130
#: the server kept failing past --give-up-after; running the command again resumes
EXIT_GAVE_UP = 75
#: another live process drives the dataset (the running service, another run): not run twice
EXIT_BUSY = 75


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder (or one acquisition file)")
    parser.add_argument(
        "--server", default=None,
        help="VIP portal URL (host, host:port or https://host; /rest is added). Default: "
             "VIP_AGENT_SERVER, else agent.yaml's server for this dataset's drop folder, "
             f"else {DEFAULT_SERVER}",
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="agent.yaml giving the server, key_file and state folder (default: the per-user "
             "agent.yaml, when there is one)",
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help="folder that receives <dataset>/ with the mirrored outputs (default: the job's "
             "output_dir, else the output: of agent.yaml's drop folder holding the dataset, "
             "else ./vip_outputs)",
    )
    parser.add_argument("--state", type=Path, default=None,
                        help="state folder (journal); default: VIP_AGENT_STATE, else agent.yaml's")
    parser.add_argument("--job", type=Path, default=None,
                        help="template job.yaml (default: job.yaml beside the dataset)")
    parser.add_argument("--keep-remote", action="store_true",
                        help="keep inputs, outputs and executions on the server")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the plan; send nothing")
    parser.add_argument("--max-runs", type=_positive, default=MAX_RUNS, metavar="N",
                        help=f"refuse a job asking for more runs than this (default {MAX_RUNS})")
    parser.add_argument("--max-jobs", type=_positive, default=MAX_JOBS, metavar="N",
                        help="refuse a dataset that would create more VIP jobs than this, all "
                             f"variants, runs and input lists together (default {MAX_JOBS})")
    parser.add_argument("--poll", type=_poll, default=None, metavar="MIN[:MAX]",
                        help="polling of a running execution, seconds: the first interval, and "
                             f"the longest it grows to (default {DEFAULT_POLL_MIN:g}:"
                             f"{DEFAULT_POLL_MAX:g})")
    parser.add_argument(
        "--give-up-after", type=_duration, default=GIVE_UP_AFTER, metavar="DURATION",
        help="stop (exit 75, resumable) when VIP has kept failing this long "
             f"(seconds, or 30m, 4h; default {GIVE_UP_AFTER / 3600:g}h)",
    )
    parser.add_argument(
        "--unknown-limit", type=_duration, default=UNKNOWN_LIMIT, metavar="DURATION",
        help="kill an execution that reads Unknown this long, then clean up once VIP confirms "
             f"it ended (default {UNKNOWN_LIMIT / 3600:g}h)",
    )
    parser.add_argument(
        "--timeout", type=_duration, default=60.0, metavar="SECONDS",
        help="read timeout of one VIP request; a request's overall deadline is 5 times this "
             "(default 60)",
    )
    parser.add_argument(
        "--bwlimit", type=_bwlimit, default=None, metavar="RATE",
        help="bandwidth limit, e.g. 5MB/s (both directions), or UP:DOWN such as 5MB/s:off "
             "(MB = 1,000,000 bytes, MiB = 1,048,576; default: no limit)",
    )
    parser.add_argument(
        "--max-transfers-per-server", type=_transfers, default=None, metavar="N",
        help="files moved with the server at once, all datasets together (default: agent.yaml's "
             f"max_transfers_per_server, else {DEFAULT_MAX_TRANSFERS}; VIP serves about 20 for "
             "all its users)",
    )


def _bwlimit(text: str) -> BandwidthConfig:
    try:
        return parse_bwlimit(text)
    except RateError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _transfers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"not a number of transfers from 1 to 64: {text!r}")
    return int(text)


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90, 30m, 4h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _poll(text: str) -> tuple[float, float | None]:
    try:
        return parse_poll(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN or MIN:MAX in seconds (MIN > 0, MAX >= MIN), e.g. 1:60, not {text!r}"
        ) from None


def dataset_identity(path: Path) -> tuple[Path, dataset_mod.DatasetScan]:
    """The dataset root and a scan of the files that belong to it."""
    if path.is_file():
        root, scan = path.parent, dataset_mod.scan(path.parent, only=[path.name])
    else:
        root, scan = path, dataset_mod.scan(path)
    scan.raise_if_unreadable()  # a symlink loop, a folder we may not read: exit 2, named
    return root, scan


def template_for(path: Path, explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"job file {explicit} does not exist")
        return explicit.resolve()
    candidate = path.parent / "job.yaml"
    return candidate.resolve() if candidate.is_file() else None


def print_events(
    journal: Journal, dataset_id: int, after: int, stream: Any = sys.stderr,
    write: Callable[[str], None] | None = None,
) -> int:  # fmt: skip
    """Print the dataset's journal events newer than ``after``; returns the last id."""
    for ev in journal.events(dataset_id):
        if ev.id > after:
            stamp = time.strftime("%H:%M:%S", time.localtime(ev.time))
            level = "" if ev.level == "info" else f"{ev.level.upper()}: "
            line = f"{stamp} {level}{ev.message}"
            if write is not None:
                write(line)
            else:
                print(line, file=stream, flush=True)
            after = ev.id
    return after


class EventPrinter:
    """The dataset's new events, printed from the main loop and, through the progress
    bars' ``before_bar``, just before a transfer's bar appears (above it, not after it)."""

    def __init__(self, journal: Journal, dataset_id: int) -> None:
        self.journal, self.dataset_id = journal, dataset_id
        self.last = 0
        self.bars: TerminalProgress | None = None
        self._lock = threading.Lock()

    def __call__(self) -> None:
        # the bars' lock when there are bars: a transfer thread calls this holding it
        with self.bars.lock if self.bars is not None else self._lock:
            write = self.bars.write if self.bars is not None else None
            self.last = print_events(self.journal, self.dataset_id, self.last, write=write)


def main(args: argparse.Namespace) -> int:
    from agent.credentials import find_api_key

    path: Path = args.dataset.resolve()
    if not path.exists():
        raise ConfigError(f"dataset {args.dataset} does not exist")
    # agent.yaml (--config, else the per-user one), then the environment, then the flags
    settings = resolve_settings(config=args.config, server=args.server, state=args.state,
                                dataset=path)  # fmt: skip
    server = settings.server
    template = template_for(path, args.job)
    root, scan = dataset_identity(path)
    if not scan.files:
        raise ConfigError(f"dataset {path} has no files")

    state = settings.state
    existing: list[Dataset] = []
    if not args.dry_run:
        journal = Journal.in_state_dir(state)
        existing = [d for d in journal.find(path=str(path), fingerprint=scan.fingerprint)]
    if existing:
        # a dataset's server is fixed by its journal record: its files, executions and
        # leftovers are there, whatever --server says now
        server = dataset_server(existing[-1].server)
        if args.server and settings.server != server:
            print(f"vip-agent: {existing[-1].name} was started on {server} and continues there "
                  f"(--server {settings.server} is not used for it)", file=sys.stderr)  # fmt: skip
    else:
        server = settings.require_server()  # agent.yaml naming several servers: say which
    credential = find_api_key(server, key_file=settings.key_file_for(server))
    client = open_backend(server, credential.key, timeout=args.timeout).client

    if args.dry_run:
        return dry_run(path, template, client, max_runs=args.max_runs, max_jobs=args.max_jobs)

    # a dataset in a drop folder of agent.yaml: its outputs go where the service puts them
    output_root = (args.output or (settings.drop.output if settings.drop else None)
                   or Path("vip_outputs")).resolve()  # fmt: skip
    options = {"keep_remote": args.keep_remote, "output_override": args.output is not None,
               "max_runs": args.max_runs, "max_jobs": args.max_jobs}  # fmt: skip
    if existing:
        refusal = output_conflict(existing[-1], args.output)
        if refusal:
            print(f"vip-agent: {refusal}", file=sys.stderr)
            return EXIT_INVALID
    if existing and existing[-1].stage == "done":
        ds = existing[-1]
        print(f"already done: outputs in {ds.output_dir}", file=sys.stderr)
        print(ds.output_dir)
        return EXIT_DONE
    # one owner per dataset: what the running service has or would take is its own, and this
    # run drives a dataset only under its journal lease (a dataset recorded below is leased
    # to it in the same write, so the service never picks it up meanwhile)
    owner = Owner.this_process("run")
    journal.owner = owner
    refusal = not_ours(journal, state, path, existing[-1] if existing else None, owner)
    if refusal:
        print(f"vip-agent: {refusal}", file=sys.stderr)
        return EXIT_BUSY
    if existing and existing[-1].stage == "incomplete":
        ds = existing[-1]
        dataset_id = ds.id
        left = left_on_vip(journal, ds.id)
        actions.retry(journal, ds)  # incomplete: back to mirror, only what is missing
        print(f"{ds.name}: fetching the {len(left)} output file(s) left on VIP", file=sys.stderr)
    elif existing and not existing[-1].final:
        ds = existing[-1]
        dataset_id = ds.id
        if args.output is not None and not ds.output_dir:
            # its output folder is not chosen yet: this --output is honoured
            journal.update(ds.id, output_root=str(output_root), options={**ds.options, **options})
        print(f"resuming {ds.name} at stage {ds.stage}", file=sys.stderr)
    elif existing:
        dataset_id = existing[-1].id
        journal.reset_for_retry(dataset_id)
        if args.output is not None:  # a new attempt: a new output folder under --output
            journal.update(
                dataset_id, output_root=str(output_root),
                options={**existing[-1].options, **options},
            )
    else:
        dataset_id = admit(
            journal, path, server=server, output_root=output_root, fingerprint=scan.fingerprint,
            name=path.stem if path.is_file() else path.name, template=template, options=options,
        )
    stop = threading.Event()
    # --bwlimit, else the bandwidth: of the dataset's drop folder in agent.yaml (as the service)
    bandwidth = args.bwlimit or (settings.drop.bandwidth if settings.drop else None)
    if bandwidth is not None and bandwidth.limited:  # every transfer reports its bytes to its budget
        budget_for(server).set_bandwidth(Limiter(bandwidth, stop=stop))
    budget_for(server).configure(max_transfers=args.max_transfers_per_server or (
        settings.config.max_transfers(server) if settings.config else DEFAULT_MAX_TRANSFERS
    ))
    poll_min, poll_max = args.poll or (DEFAULT_POLL_MIN, DEFAULT_POLL_MAX)
    events = EventPrinter(journal, dataset_id)
    # one bar per transfer on a terminal, below the events that announce it
    bars = events.bars = TerminalProgress(sys.stderr, before_bar=events)
    runner = Runner(journal, lambda _url: client, stop_event=stop, progress=bars,
                    poll_min=poll_min, poll_max=max(poll_min, poll_max or DEFAULT_POLL_MAX),
                    unknown_limit=args.unknown_limit, give_up_after=args.give_up_after)

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    # SIGINT too: transfers then stop at a chunk boundary instead of finishing first
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    beating = threading.Event()
    threading.Thread(target=heartbeat, args=(journal, owner, beating), daemon=True,
                     name="vip-agent lease").start()  # fmt: skip
    try:
        while True:
            # a `vip-agent cancel` from another shell is done here too: this run holds the
            # dataset's lease, so no other process kills or deletes at the same time
            outcome = runner.step(dataset_id)
            bars.close()  # a stage's bars end with it (not at 100 %: a retry may go back)
            events()
            if outcome.final:
                break
            if outcome.retry_after and wait(stop, outcome.retry_after, journal, dataset_id):
                raise Interrupted("stopped")
            if stop.is_set():
                raise Interrupted("stopped")
    except GaveUp as err:
        events()
        print(f"vip-agent: {err.message}", file=sys.stderr)
        return EXIT_GAVE_UP
    except (Interrupted, KeyboardInterrupt):
        events()
        ds = journal.get(dataset_id)
        print(
            f"vip-agent: {ds.name} stopped at stage {ds.stage} (not cancelled: what runs on VIP "
            "keeps running); run the same command again to resume, or "
            f"`vip-agent cancel {ds.name}` to cancel it",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    finally:
        beating.set()
        with contextlib.suppress(Exception):  # a dead owner's lease is taken over anyway
            journal.release_lease(dataset_id, owner)
        bars.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return report(journal, journal.get(dataset_id), path)


def heartbeat(journal: Journal, owner: Owner, stop: threading.Event) -> None:
    """Renew this run's lease until ``stop`` (an owner on another host counts by its beats)."""
    while not stop.wait(LEASE_BEAT):
        with contextlib.suppress(Exception):
            journal.renew_leases(owner)


def not_ours(
    journal: Journal, state: Path, path: Path, ds: Dataset | None, owner: Owner
) -> str | None:
    """Why this run must not drive the dataset (one line), or None once it holds its lease.

    Refused: a dataset in a drop folder of the running service, or one the journal has in
    progress while the service runs (the service takes both), or one another live process
    holds the lease of, or one in a drop folder another agent claimed (another PC's service,
    with its own state folder). A dead owner's lease (exited, killed) is taken over.
    """
    name = ds.name if ds is not None else (path.stem if path.is_file() else path.name)
    follow = f"follow it with `vip-agent status {name}` or `vip-agent logs {name} --follow`"
    claim = read_claim(path.parent)
    if claim is not None and Path(claim.state).resolve() != Path(state).resolve() and claim.alive():
        return (f"{name} is in the drop folder {path.parent}, claimed by another vip-agent "
                f"({claim.describe()}), which runs it; not run twice")  # fmt: skip
    lease = journal.lease(ds.id) if ds is not None else None
    if lease is not None and lease.owner.token != owner.token and lease.alive():
        return f"{name} is being run by {lease.owner.describe()}; not run twice: {follow}"
    pid = AgentLock(state).held_by_other()
    if pid is not None:
        service = f"the running service (vip-agent watch, pid {pid or '?'})"
        for drop in journal.drop_states():
            if Path(drop.path) == path or Path(drop.path) in path.parents:
                return (f"{name} is in the drop folder {drop.path} of {service}, which runs it; "
                        f"not run twice: {follow}")  # fmt: skip
        if ds is not None and not ds.final and ds.stage != "waiting":
            return f"{name} is being run by {service} (stage {ds.stage}); not run twice: {follow}"
    if ds is not None:
        held = journal.take_lease(ds.id, owner)
        if held is not None:
            return f"{name} is being run by {held.owner.describe()}; not run twice: {follow}"
    return None


def wait(stop: threading.Event, seconds: float, journal: Journal, dataset_id: int) -> bool:
    """Wait ``seconds``, less if a cancel is requested meanwhile; True if stopped."""
    deadline = time.monotonic() + seconds
    while not stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline or journal.get(dataset_id).cancel_requested:
            return False
    return True


def report(journal: Journal, ds: Dataset, path: Path) -> int:
    """Say how the dataset ended (``ERROR.txt`` as ``watch`` writes it); the exit status."""
    report_file = update_error_report(ds, journal, path, again=f"vip-agent run {path}")
    if ds.stage == "done":
        print(ds.output_dir)
        return EXIT_DONE
    if ds.stage == "incomplete":
        print(f"vip-agent: {ds.name} incomplete: {ds.error}", file=sys.stderr)
        print(ds.output_dir)
        return EXIT_INCOMPLETE
    if ds.stage == "cancelled":
        print(f"vip-agent: {ds.name} cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    # the error itself was just printed as the dataset's last event: not a second time
    said = any(ev.level == "error" and ev.message.strip() == (ds.error or "").strip()
               for ev in journal.events(ds.id)[-3:])  # fmt: skip
    where = f" (saved in {report_file})" if report_file else ""
    if said:
        print(f"vip-agent: {ds.name} failed: see the error above{where}", file=sys.stderr)
    else:
        print(f"vip-agent: {ds.name} failed: {ds.error}{where}", file=sys.stderr)
    launched = any(e.vip_id for e in journal.executions(ds.id))
    return EXIT_FAILED if launched else EXIT_INVALID


def output_conflict(ds: Dataset, output: Path | None) -> str | None:
    """Why ``--output`` cannot be honoured for a dataset that already ran, or None.

    A new attempt (after ``failed``/``cancelled``) or a run whose output folder is
    not chosen yet takes the new ``--output``; outputs already placed stay together.
    """
    if output is None or not ds.output_dir:
        return None
    if ds.stage in ("failed", "cancelled"):
        return None
    if Path(ds.output_dir).parent == output.resolve():
        return None
    where = {
        "done": "it already ran",
        "incomplete": "it ran (incomplete)",
    }.get(ds.stage, f"it is being run (stage {ds.stage})")
    return (
        f"--output {output} refused for {ds.name}: {where} with its outputs in {ds.output_dir}, "
        "and vip-agent keeps a dataset's outputs together. Run it without --output (or with "
        f"--output {Path(ds.output_dir).parent})"
        + (f", or `vip-agent cancel {ds.name}` first" if not ds.final else "")
    )


def _value_text(value: Any) -> str:
    """One input value as a user wrote it in job.yaml (not Python's repr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "(none)" if value is None else str(value)


def _input_text(name: str, value: Any) -> str:
    """``  name = value``; a list (one job per value) one value a line, the first ones only."""
    if not isinstance(value, list):
        return f"  {name} = {_value_text(value)}"
    lines = [f"  {name}: {len(value)} value(s), one job each"]
    lines += [f"    - {_value_text(v)}" for v in value[:DRY_RUN_SHOWN]]
    if len(value) > DRY_RUN_SHOWN:
        lines.append(f"    ... and {len(value) - DRY_RUN_SHOWN} more")
    return "\n".join(lines)


#: how many files and executions ``--dry-run`` lists before it summarises the rest
DRY_RUN_SHOWN = 20


def dry_run(
    path: Path, template: Path | None, client: VipClient, *,
    max_runs: int | None = None, max_jobs: int | None = None,
) -> int:  # fmt: skip
    """Validate against the pipeline and print what would be sent (at most
    :data:`DRY_RUN_SHOWN` files and executions, then a count); send nothing."""
    from agent.jobfile import load_job
    from agent.platformpaths import check_platform_paths, probe_with
    from agent.runner import unknown_pipeline
    from agent.validate import resolve_inputs, validate
    from agent.vip.errors import NotFoundError

    job = load_job(path, template, keep_problems=True)  # key problems come with the input ones
    try:
        pipeline = client.pipeline(job.pipeline)
    except NotFoundError:
        print(f"the dataset cannot be run:\n  - {unknown_pipeline(client, job.pipeline)}")
        return EXIT_INVALID
    report = validate(job, path, pipeline, max_runs=max_runs, max_jobs=max_jobs)
    check_platform_paths(report, job, pipeline, probe_with(client.exists))  # /vip/... inputs
    for w in report.warnings:
        print(f"warning: {w}")
    if report.errors:
        print("the dataset cannot be run:")
        for e in report.errors:
            print(f"  - {e}")
        return EXIT_INVALID
    resolved = report.resolved or resolve_inputs(job, path)
    remote_inputs = "<session>/INPUTS"
    print(f"pipeline: {job.pipeline}")
    sizes = {f.rel: f.size for f in dataset_mod.scan(resolved.root, only=resolved.files).files}
    total = sum(sizes.values())
    print(f"files to upload ({len(resolved.files)}, {human_size(total)}):")
    for rel in sorted(resolved.files, key=natural_key)[:DRY_RUN_SHOWN]:
        print(f"  {rel} ({sizes.get(rel, 0):,} bytes) -> {resolved.remote_path(remote_inputs, rel)}")
    if len(resolved.files) > DRY_RUN_SHOWN:
        print(f"  ... and {len(resolved.files) - DRY_RUN_SHOWN} more file(s)")
    executions = len(resolved.variants) * job.runs
    jobs = sum(v.job_count for v in resolved.variants.values()) * job.runs
    print(f"executions: {executions} ({len(resolved.variants)} variant(s) x {job.runs} run(s)), "
          f"{jobs} job(s) on VIP")  # fmt: skip
    shown = 0
    for variant in resolved.variants:
        values = resolved.remote_inputs(variant, remote_inputs)
        for run in range(1, job.runs + 1):
            if shown == DRY_RUN_SHOWN:
                break
            shown += 1
            if run > 1:  # the runs of a variant share its inputs: said once
                print(f"execution {variant} run {run}: the inputs of run 1")
                continue
            print(f"execution {variant} run {run}:")
            for k, v in values.items():
                print(_input_text(k, v))
    if executions > shown:
        print(f"... and {executions - shown} more execution(s)")
    print("valid: nothing was sent (dry run)")
    return EXIT_DONE
