"""A dataset's stages, the legal changes between them and the public state each one shows
(the machine's table in agent/runner/ writes them through :meth:`agent.journal.Journal.set_stage`)."""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """Internal stages, in order. Equal to (and stored as) their lowercase text."""

    WAITING = "waiting"
    VALIDATE = "validate"
    UPLOAD = "upload"
    LAUNCH = "launch"
    MONITOR = "monitor"
    MIRROR = "mirror"
    EXTRACT = "extract"
    CLEANUP = "cleanup"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: ended with every output it could mirror; outputs too large to download stay on VIP
    INCOMPLETE = "incomplete"

    def __str__(self) -> str:
        return self.value


STAGES = tuple(s.value for s in Stage)
FINAL_STAGES = frozenset({Stage.DONE, Stage.FAILED, Stage.CANCELLED, Stage.INCOMPLETE})

_S = Stage
#: the only stage changes :meth:`Journal.set_stage` accepts (staying in a non-final stage is
#: always allowed). Any stage before ``done`` may fail or be cancelled; every final stage may
#: be run again (``validate``: retry, rerun); ``failed`` and ``incomplete`` may be cancelled
#: (the server is cleaned).
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    _S.WAITING: frozenset({_S.VALIDATE, _S.CANCELLED, _S.FAILED}),
    _S.VALIDATE: frozenset({_S.UPLOAD, _S.FAILED, _S.CANCELLED}),
    _S.UPLOAD: frozenset({_S.LAUNCH, _S.FAILED, _S.CANCELLED}),
    _S.LAUNCH: frozenset({_S.MONITOR, _S.FAILED, _S.CANCELLED}),
    _S.MONITOR: frozenset({_S.MIRROR, _S.FAILED, _S.CANCELLED}),
    _S.MIRROR: frozenset({_S.EXTRACT, _S.CLEANUP, _S.FAILED, _S.CANCELLED, _S.INCOMPLETE}),
    _S.EXTRACT: frozenset({_S.CLEANUP, _S.FAILED, _S.CANCELLED, _S.INCOMPLETE}),
    _S.CLEANUP: frozenset({_S.DONE, _S.FAILED, _S.CANCELLED, _S.INCOMPLETE}),
    _S.DONE: frozenset({_S.VALIDATE}),  # `vip-agent rerun`
    _S.FAILED: frozenset({_S.VALIDATE, _S.CANCELLED}),
    _S.CANCELLED: frozenset({_S.VALIDATE}),
    # retry fetches what was left on VIP (mirror); cancel --discard deletes it (cleanup)
    _S.INCOMPLETE: frozenset({_S.VALIDATE, _S.CANCELLED, _S.MIRROR, _S.CLEANUP}),
}
#: SQL list of the stages the runner still works on (for ``stage IN (...)``)
ACTIVE_STAGES_SQL = "(" + ",".join(
    f"'{s.value}'" for s in Stage if s not in FINAL_STAGES and s is not Stage.WAITING
) + ")"
#: SQL condition of the datasets a scheduler must hold: in progress, or asked to cancel
#: (indexed: the scheduler looks for them every few seconds, among every dataset ever run)
LIVE_SQL = f"stage IN {ACTIVE_STAGES_SQL} OR cancel_requested=1"
#: for SQL: ``stage NOT IN {FINAL_SQL}``
FINAL_SQL = "(" + ",".join(f"'{s.value}'" for s in sorted(FINAL_STAGES)) + ")"
#: final stages a dataset may be retried (or run again) from
RETRYABLE_STAGES = frozenset({_S.FAILED, _S.CANCELLED, _S.INCOMPLETE})

#: internal stage -> public state shown by ``vip-agent status``
PUBLIC_STATE = {
    "waiting": "waiting",
    "validate": "validating",
    "upload": "uploading",
    "launch": "queued",
    "monitor": "running",
    "mirror": "downloading",
    "extract": "downloading",
    "cleanup": "cleaning",
    "done": "done",
    "incomplete": "incomplete",
    "failed": "failed",
    "cancelled": "cancelled",
}


#: how the scheduler's reason starts for a dataset held back before its upload
#: (``upload_ahead``): such a dataset, at stage ``upload``, shows as ``queued``
UPLOAD_HELD = "waiting to upload: "


class IllegalTransition(RuntimeError):
    """A stage change the table forbids: a bug in vip-agent, never a user mistake."""



def check_transition(old: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`TRANSITIONS`."""
    try:
        src, dst = Stage(old), Stage(new)
    except ValueError:
        raise IllegalTransition(f"unknown stage in {old!r} -> {new!r}") from None
    if src == dst and src not in FINAL_STAGES:
        return
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(f"illegal stage change {src.value} -> {dst.value}")
