"""What a user may do to a dataset: retry, rerun, cancel. The CLI and the web page call these.

An ``incomplete`` dataset (outputs left on VIP, see ``agent.leftovers``) is not run
again: ``retry`` fetches only what was left, ``cancel(discard=True)`` deletes it.

Each action writes its request to the journal; the agent that holds the state
folder (it polls the journal) does the work. :func:`cancel_here` is for when no
agent runs: it drives the runner itself, under the state folder's lock.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.errors import AgentError, CredentialError
from agent.journal import RETRYABLE_STAGES, Dataset, Journal, Owner, Stage
from agent.leftovers import left_on_vip
from agent.watch.after import error_file
from agent.watch.readiness import current_fingerprint

#: stages :func:`retry` accepts (a done dataset needs :func:`rerun`; an incomplete one is
#: fetched, not run again)
RETRYABLE = RETRYABLE_STAGES


class CannotRetry(AgentError):
    """The dataset cannot be sent again (not final, or its files are gone)."""

    exit_code = 1


class CannotCancel(AgentError):
    exit_code = 1


def _again(journal: Journal, ds: Dataset) -> Dataset:
    """Send a final dataset back to validation as a new attempt, with its current content."""
    path = Path(ds.path)
    fingerprint = current_fingerprint(path)
    if fingerprint is None:
        raise CannotRetry(f"{ds.name}: the dataset {path} no longer exists; drop it again instead")
    busy = [d for d in journal.find(path=ds.path) if d.id != ds.id and not d.final]
    if busy:
        raise CannotRetry(
            f"{ds.name}: this folder is already being run as #{busy[-1].id} ({busy[-1].state})"
        )
    report = error_file(path)
    if report.exists():
        report.unlink()
    # the content may have been fixed: take it as it is now
    journal.reset_for_retry(ds.id, fingerprint=fingerprint)
    return journal.get(ds.id)


def retry(journal: Journal, ds: Dataset) -> Dataset:
    """Run a failed or cancelled dataset again (a new attempt); returns it, now ``validating``.

    An incomplete dataset goes back to ``mirror`` instead: only the outputs left on VIP
    are fetched (the limit is asked again), then VIP is cleaned.
    """
    if ds.stage == "incomplete":
        left = left_on_vip(journal, ds.id)
        journal.reopen(
            ds.id, Stage.MIRROR, message=f"retry: fetching the {len(left)} output file(s) left on VIP"
        )
        return journal.get(ds.id)
    if ds.stage not in RETRYABLE:
        hint = " (use `vip-agent rerun` to run a finished dataset again)" if ds.final else ""
        raise CannotRetry(
            f"{ds.name} is {ds.state}; only a failed, cancelled or incomplete dataset can be "
            f"retried{hint}"
        )
    return _again(journal, ds)


def rerun(journal: Journal, ds: Dataset) -> Dataset:
    """Run any finished dataset (done too) again as a new attempt, into a new output folder."""
    if not ds.final:
        raise CannotRetry(f"{ds.name} is {ds.state}; wait until it has finished, or cancel it")
    if ds.stage == "incomplete":
        # a new attempt forgets this one's outputs: what is left on VIP would stay forever
        raise CannotRetry(
            f"{ds.name} is incomplete: outputs are still on VIP. Fetch them first (`vip-agent "
            f"retry {ds.name}`) or delete them (`vip-agent cancel {ds.name} --discard`)"
        )
    return _again(journal, ds)


def cancel(journal: Journal, ds: Dataset, *, discard: bool = False) -> str:
    """Ask for a dataset to stop; returns ``"final"`` (it had already ended),
    ``"cancelled"`` (it was only waiting for its files: done at once),
    ``"requested"`` (the agent kills its executions and cleans the server) or
    ``"incomplete"`` (outputs are left on VIP and ``discard`` was not given).

    ``discard`` on an incomplete dataset deletes what was left on VIP (with its
    execution); it then ends ``cancelled``, its mirrored outputs kept.
    """
    if ds.stage == "incomplete":
        if not discard:
            return "incomplete"
        left = left_on_vip(journal, ds.id)
        journal.update(ds.id, options={**ds.options, "discard": True})
        journal.reopen(
            ds.id, Stage.CLEANUP, cancel=True,
            message=f"discard requested by the user: deleting the {len(left)} output file(s) "
                    "left on VIP",
        )  # fmt: skip
        return "requested"
    if ds.final:
        return "final"
    if ds.stage == "waiting":
        journal.set_stage(
            ds.id, Stage.CANCELLED, message="cancelled by the user before it was complete"
        )
        return "cancelled"
    journal.update(ds.id, cancel_requested=1)
    journal.event(ds.id, "cancel requested by the user", level="warning")
    return "requested"


def wait_final(journal: Journal, dataset_id: int, timeout: float) -> str | None:
    """The final stage the dataset reaches within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ds = journal.get(dataset_id)
        if ds.final:
            return ds.stage
        time.sleep(0.2)
    return None


def cancel_here(
    journal: Journal, dataset_id: int, key_file: Path | None, timeout: float
) -> str | None:
    """Drive the runner until the dataset is final (no agent runs; the caller holds the lock)."""
    from agent.clients import ClientProvider
    from agent.runner import Runner
    from agent.vip.errors import AuthError

    ds = journal.get(dataset_id)
    owner = Owner.this_process("cancel")
    if journal.take_lease(dataset_id, owner) is not None:
        return wait_final(journal, dataset_id, timeout)  # a live `vip-agent run` cancels it
    provider = ClientProvider({ds.server: key_file})
    stop = threading.Event()
    runner = Runner(journal, provider, stop_event=stop)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            outcome = runner.step(dataset_id)
            if outcome.final:
                return str(outcome.stage)
            if outcome.retry_after:
                stop.wait(min(outcome.retry_after, max(0.0, deadline - time.monotonic())))
    except AuthError as err:
        raise CredentialError(
            f"the cancel is recorded, but {ds.server} refused the API key ({err.message}); "
            "the agent finishes it when it runs with a working key",
            detail=err.detail,
        ) from None
    finally:
        journal.release_lease(dataset_id, owner)
    return None
