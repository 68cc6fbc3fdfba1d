"""Fault injection for the local VIP server (off by default).

A :class:`FaultSpec` is read on every request, so tests may mutate
``server.faults`` at runtime. Probabilistic knobs draw from one seeded
``random.Random`` (deterministic for sequential requests); ``match`` (URL path
regex, searched) and ``methods`` restrict which requests can be hit, and
``times`` caps how many faults are injected in total (then the spec goes quiet),
so a test can say "the next GET on /rest/executions fails exactly once".

Spec string (CLI ``--faults``): comma-separated ``key=value`` or bare flags, e.g.
``error_rate=0.1,drop_rate=0.05,latency=0.2,transfer_timeout=0.1,capacity=0.2,
unknown_blip=0.3,unknown_after_kill=0.5,delete_delay=2,legacy_dates,legacy_defaults,seed=1,
match=^/rest/path/,methods=GET|PUT,times=3``. ``match`` cannot contain commas.

Production behaviour (each usable alone, all on together in the ``production``
profile, see :data:`PROFILES` and docs/localvip.md): ``staging_delay=S``,
``platform_transfers=N`` (with ``transfer_wait=S``), ``results_delay=S``,
``launch_refusal=RATE`` (``launch_refusal_code=2003`` or ``8000|2003``),
``redirect_port=PORT``, ``late_landing=RATE`` (``late_landing_delay=S``),
``list_limit=N``, ``job_statuses=RATE``.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field, fields
from typing import Any

from agent.errors import ConfigError

_RATES = (
    "error_rate", "drop_rate", "transfer_timeout", "capacity", "unknown_blip", "unknown_after_kill",
)
_INTS = ("seed", "times", "platform_transfers", "redirect_port", "list_limit")
_FLAGS = ("legacy_dates", "legacy_defaults")

#: the engine refusals ``launch_refusal`` draws from (code, message without suffix). The two
#: 8000 messages are VIP 4.6's (``WorkflowBusiness.launch``: no usable resource, engine
#: failure); 2003 and 2004 come after 4.6 (an engine answering 503, or 400).
LAUNCH_REFUSALS: list[tuple[int, str]] = [
    (8000, "There are no ressources available for the moment !"),
    (8000, "Workflow is null, engine localvip-engine has been disabled"),
    (2003, "Engine is saturated!"),
    (2004, "Error launching execution, contact admins!"),
]


@dataclass
class FaultSpec:
    """Which faults to inject, how often, and on which requests."""

    #: share of requests answered 500/502 with a non-JSON (HTML) body
    error_rate: float = 0.0
    #: share of requests whose connection is dropped mid-body (uploads: while
    #: reading the request body, nothing lands; others: after the action ran,
    #: half the response body is sent, then the socket is closed)
    drop_rate: float = 0.0
    #: seconds added before handling each matching request
    latency: float = 0.0
    #: share of uploads/downloads answered 400 8000 (VIP's transfer timeout);
    #: an upload still lands ``transfer_land_delay`` seconds later
    transfer_timeout: float = 0.0
    transfer_land_delay: float = 0.3
    #: share of POST /executions refused with 2001 (user quota)
    capacity: float = 0.0
    #: share of GET /executions/{id} on a Running execution reading ``Unknown`` (the engine
    #: lost track of it; it goes on running)
    unknown_blip: float = 0.0
    #: share of GET /executions/{id} on a Killed execution reading ``Unknown`` (VIP's engine
    #: can record a kill as Unknown)
    unknown_after_kill: float = 0.0
    #: seconds a deleted path stays visible (max of this and the server's own)
    delete_delay: float = 0.0
    #: results timestamp folder in the legacy ``dd-MM-yyyy_HH:mm:ss`` format
    legacy_dates: bool = False
    #: pipeline detail shows ``"$input.getDefaultValue()"`` for absent defaults
    #: and stringified defaults otherwise (GWENDIA-era servers)
    legacy_defaults: bool = False
    seed: int | None = None
    #: regex searched in the request path (``/rest/...``); None = every request
    match: str | None = None
    #: HTTP methods that can be hit; empty = all
    methods: frozenset[str] = field(default_factory=frozenset)
    #: total number of probabilistic faults to inject; None = unlimited
    times: int | None = None
    # -- production behaviour (docs/localvip.md) ---------------------------------------
    #: seconds each upload or download is staged through storage before it completes
    #: (GRIDA checks a pending operation again after a 2 s retry delay)
    staging_delay: float = 0.0
    #: transfers staged at once platform-wide (0 = no cap); a transfer that finds no slot
    #: within ``transfer_wait`` seconds is answered VIP's timeout, 400 8000
    platform_transfers: int = 0
    #: seconds a transfer may wait for a slot before the timeout answer (VIP: 45)
    transfer_wait: float = 45.0
    #: seconds per output file on GET /executions/{id}/results (storage calls per output)
    results_delay: float = 0.0
    #: share of POST /executions refused by the engine (see LAUNCH_REFUSALS)
    launch_refusal: float = 0.0
    #: the codes ``launch_refusal`` may answer (empty = all of LAUNCH_REFUSALS)
    launch_refusal_code: frozenset[int] = field(default_factory=frozenset)
    #: port of an http listener answering 301 to the real address (0 = a free port;
    #: None = no listener); read when the server starts
    redirect_port: int | None = None
    #: share of uploads answered VIP's timeout (after ``transfer_wait``) whose file still
    #: lands ``late_landing_delay`` seconds later, recreating its folder if it was deleted
    late_landing: float = 0.0
    late_landing_delay: float = 1.0
    #: largest ``limit`` on GET /executions (400 8000 above it); None = 500, today's message
    list_limit: int | None = None
    #: share of jobs shown with GASW's other statuses (a completed job as CANCELLED_REPLICA,
    #: a running one as STALLED, RESCHEDULE or REPLICATE...; see JOB_STATUSES)
    job_statuses: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self.injected = 0

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "seed" and hasattr(self, "_lock"):
            with self._lock:
                self._rng = random.Random(value)
        if name == "methods" and not isinstance(value, frozenset):
            super().__setattr__("methods", frozenset(m.upper() for m in value))
        if name == "launch_refusal_code":
            if isinstance(value, int):
                value = frozenset({value})
            elif not isinstance(value, frozenset):
                value = frozenset(int(c) for c in value)
            unknown = value - {c for c, _m in LAUNCH_REFUSALS}
            if unknown:
                raise ConfigError(
                    f"launch_refusal_code {sorted(unknown)} is not an engine refusal",
                    detail="known: 8000, 2003, 2004",
                )
            super().__setattr__(name, value)

    @property
    def active(self) -> bool:
        """True when any knob is set (cheap check on the hot path)."""
        return bool(
            any(getattr(self, r) > 0 for r in _RATES) or self.latency > 0
        )

    def targets(self, method: str, path: str) -> bool:
        """Whether this request may receive a probabilistic fault."""
        if self.methods and method.upper() not in self.methods:
            return False
        return not (self.match and not re.search(self.match, path))

    def roll(self, knob: str, method: str, path: str) -> bool:
        """Draw for ``knob`` (a rate field name) on this request."""
        rate = float(getattr(self, knob))
        if rate <= 0 or not self.targets(method, path):
            return False
        with self._lock:
            if self.times is not None and self.injected >= self.times:
                return False
            hit = rate >= 1.0 or self._rng.random() < rate
            if hit:
                self.injected += 1
            return hit

    def choice(self, options: list[int]) -> int:
        with self._lock:
            return self._rng.choice(options)

    def refusal(self) -> tuple[int, str]:
        """One engine refusal drawn from the allowed codes."""
        allowed = [r for r in LAUNCH_REFUSALS if not self.launch_refusal_code or r[0] in self.launch_refusal_code]
        with self._lock:
            return self._rng.choice(allowed)

    @classmethod
    def for_profile(cls, profile: str, **overrides: Any) -> FaultSpec:
        """The spec of ``profile`` (``ideal`` or ``production``) with ``overrides`` applied,
        e.g. ``FaultSpec.for_profile("production", staging_delay=0.2, transfer_wait=1)``."""
        if profile not in PROFILES:
            raise ConfigError(f"unknown server profile '{profile}'", detail=f"known: {sorted(PROFILES)}")
        return cls(**{**PROFILES[profile], **overrides})

    @classmethod
    def parse(cls, spec: str, profile: str = "ideal") -> FaultSpec:
        """Build a spec from the CLI syntax (see module docstring) over ``profile``'s defaults."""
        kwargs = cls.parse_kwargs(spec)
        base = PROFILES.get(profile, {})
        if "launch_refusal_code" in kwargs and "launch_refusal" not in kwargs and not base.get("launch_refusal"):
            kwargs["launch_refusal"] = 1.0  # naming a code alone means: refuse with it
        return cls.for_profile(profile, **kwargs)

    @classmethod
    def parse_kwargs(cls, spec: str) -> dict[str, Any]:
        """The ``key=value`` items of a spec string, typed."""
        kwargs: dict[str, Any] = {}
        names = {f.name: f for f in fields(cls)}
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in names:
                raise ConfigError(f"unknown fault '{key}' in --faults", detail=f"known: {sorted(names)}")
            try:
                if key in _FLAGS:
                    kwargs[key] = value.strip().lower() not in ("0", "false", "no") if sep else True
                elif key in _INTS:
                    kwargs[key] = int(value)
                    if kwargs[key] < 0:
                        raise ValueError("must not be negative")
                elif key == "launch_refusal_code":
                    kwargs[key] = frozenset(int(c) for c in re.split(r"[|+ ]", value) if c.strip())
                elif key == "match":
                    re.compile(value)
                    kwargs[key] = value
                elif key == "methods":
                    kwargs[key] = frozenset(m.strip().upper() for m in re.split(r"[|+ ]", value) if m.strip())
                else:
                    kwargs[key] = float(value)
                    if not kwargs[key] >= 0:
                        raise ValueError("must be a number, not negative")
            except (ValueError, re.error) as err:
                raise ConfigError(f"bad value for fault '{key}': {value!r}", detail=str(err)) from None
        return kwargs


#: GASW's 21 job statuses (``GaswStatus``); an execution shows the latest task of each job
GASW_STATUSES = (
    "CANCELLED", "CANCELLED_REPLICA", "DELETED", "DELETED_REPLICA", "COMPLETED", "CREATED", "ERROR",
    "ERROR_HELD", "KILL", "KILL_REPLICA", "NOT_SUBMITTED", "QUEUED", "REPLICATE", "RESCHEDULE", "RUNNING",
    "STALLED", "STALLED_HELD", "SUCCESSFULLY_SUBMITTED", "UNDEFINED", "UNHOLD_ERROR", "UNHOLD_STALLED",
)

#: what ``job_statuses`` may show instead of the local engine's status: a job replicated
#: or resubmitted by GASW reads the status of its latest task
JOB_STATUSES: dict[str, tuple[str, ...]] = {
    "QUEUED": ("CREATED", "SUCCESSFULLY_SUBMITTED", "QUEUED"),
    "RUNNING": ("STALLED", "RESCHEDULE", "REPLICATE", "RUNNING"),
    "COMPLETED": ("CANCELLED_REPLICA", "COMPLETED"),
    "ERROR": ("ERROR_HELD", "ERROR"),
    "KILL": ("KILL_REPLICA", "CANCELLED", "KILL"),
}

#: server profiles: FaultSpec keyword defaults. ``ideal`` answers at once (the test suite's
#: server); ``production`` follows VIP-portal 4.6 and GRIDA as documented in docs/localvip.md
PROFILES: dict[str, dict[str, Any]] = {
    "ideal": {},
    "production": {
        "staging_delay": 2.0,
        "platform_transfers": 20,
        "transfer_wait": 45.0,
        "results_delay": 0.2,
        "launch_refusal": 0.03,
        "launch_refusal_code": frozenset({8000, 2003}),
        "redirect_port": 0,
        "late_landing": 0.002,
        "late_landing_delay": 5.0,
        "list_limit": 500,
        "job_statuses": 0.3,
        "unknown_after_kill": 0.5,
        "delete_delay": 2.0,
    },
}
