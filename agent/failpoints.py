"""Named crash points for resume tests (the etcd ``gofail`` pattern).

``VIP_AGENT_FAILPOINTS=launch:posted,stage:mirror`` makes the process kill
itself with SIGKILL the first time it reaches one of those points, exactly as
a power cut would. Unset (always, in production) it costs one set lookup.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(p for p in os.environ.get("VIP_AGENT_FAILPOINTS", "").split(",") if p)


def hit(name: str) -> None:
    """Die here, now, if the failpoint ``name`` is active."""
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
