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

    @classmethod
    def parse(cls, spec: str) -> FaultSpec:
        """Build a spec from the CLI syntax (see module docstring)."""
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
                if key in ("legacy_dates", "legacy_defaults"):
                    kwargs[key] = value.strip().lower() not in ("0", "false", "no") if sep else True
                elif key in ("seed", "times"):
                    kwargs[key] = int(value)
                elif key == "match":
                    re.compile(value)
                    kwargs[key] = value
                elif key == "methods":
                    kwargs[key] = frozenset(m.strip().upper() for m in re.split(r"[|+ ]", value) if m.strip())
                else:
                    kwargs[key] = float(value)
            except (ValueError, re.error) as err:
                raise ConfigError(f"bad value for fault '{key}': {value!r}", detail=str(err)) from None
        return cls(**kwargs)
