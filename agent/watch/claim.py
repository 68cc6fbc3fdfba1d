"""One agent per drop folder: a claim file in the folder itself, ``.vip-agent-claim``.

Two agents with different state folders (two PCs on one NFS share, a copied configuration)
would otherwise both take every dataset. The first agent to watch a drop folder writes a
claim (its agent id, host, pid and process start, state folder, a heartbeat); any other agent
sees it, reports it (log, ``vip-agent status``, ``doctor``) and takes nothing from that folder.

A claim is stale when its agent is gone: on the same host its pid is dead or was reused (the
process start differs); from another host, its heartbeat is older than :data:`CLAIM_TTL`.
A stale claim is taken over. The claim is renewed every :data:`CLAIM_BEAT` seconds, and the
renewal re-reads it: an agent that finds another's claim in its place (two agents took a
stale claim at the same instant) stops taking that folder's datasets.

The file is written whole and moved into place (``link`` to create, ``replace`` to renew),
which NFS does atomically; nothing else in the drop folder is touched. Drop-folder scans
ignore it like every hidden file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.journal import Owner

CLAIM_NAME = ".vip-agent-claim"
#: the drop state (journal ``drops``, ``vip-agent status``) of a folder another agent claimed
CLAIMED = "claimed"
#: seconds between two heartbeats of a claim
CLAIM_BEAT = 30.0
#: a claim from another host not renewed for this long is stale (4 missed heartbeats)
CLAIM_TTL = 120.0


@dataclass(frozen=True)
class Claim:
    """What ``.vip-agent-claim`` says: which agent takes this folder's datasets."""

    agent_id: str
    host: str
    pid: int
    started: str | None
    state: str
    since: float
    beat: float

    def describe(self, now: float | None = None) -> str:
        """``agent 1a2b3c4d on pc2 (pid 812, state folder /var/lib/vip-agent), heartbeat 12 s ago``."""
        ago = max(0.0, (time.time() if now is None else now) - self.beat)
        return (f"agent {self.agent_id} on {self.host} (pid {self.pid}, state folder {self.state}), "
                f"heartbeat {ago:.0f} s ago")  # fmt: skip

    def alive(self, now: float | None = None) -> bool:
        """Whether the claiming agent still runs, as far as this machine can tell."""
        now = time.time() if now is None else now
        owner = Owner("service", self.pid, self.host, self.started, "")
        return owner.alive(self.beat + CLAIM_TTL, now)

    def same_agent(self, other: Claim) -> bool:
        return (self.agent_id, self.host, self.state) == (other.agent_id, other.host, other.state)


def read_claim(folder: Path, name: str = CLAIM_NAME) -> Claim | None:
    """The claim of a drop folder, or None (none, or unreadable: a torn file counts as none)."""
    try:
        data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        return Claim(
            agent_id=str(data["agent_id"]), host=str(data["host"]), pid=int(data["pid"]),
            started=data.get("started"), state=str(data["state"]), since=float(data["since"]),
            beat=float(data["beat"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


class DropClaim:
    """This agent's claim on one drop folder."""

    def __init__(self, folder: Path, *, agent_id: str, state: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / CLAIM_NAME
        me = Owner.this_process("service")
        now = time.time()
        self.me = Claim(agent_id, me.host, me.pid, me.started, str(state), now, now)
        #: whether this agent holds the claim (after the last take or renew)
        self.held = False

    def _write(self, claim: Claim, *, replace: bool) -> bool:
        """Write ``claim`` to the claim file at once (False: another was created meanwhile)."""
        tmp = self.folder / f"{CLAIM_NAME}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            tmp.write_text(json.dumps(asdict(claim)), encoding="utf-8")
            if replace:
                os.replace(tmp, self.path)
                return True
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def take(self) -> Claim | None:
        """Claim the folder (or renew this agent's claim); None when held, else the live
        claim of the agent that has the folder. Raises OSError if the folder is not writable."""
        for _ in range(3):
            now = time.time()
            current = read_claim(self.folder)
            if current is not None and current.same_agent(self.me):
                self.me = Claim(**{**asdict(self.me), "since": current.since, "beat": now})
                self._write(self.me, replace=True)
                self.held = True
                return None
            if current is not None and current.alive(now):
                self.held = False
                return current
            if current is not None or self.path.exists():  # stale (or torn): moved aside
                aside = self.folder / f"{CLAIM_NAME}.stale.{uuid.uuid4().hex[:12]}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue  # someone else moved it first: look again
                moved = read_claim(self.folder, aside.name)
                if moved is not None and moved != current:
                    # another agent claimed it between our look and the move: put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, self.path)
                    with contextlib.suppress(OSError):
                        aside.unlink()
                    continue
                with contextlib.suppress(OSError):
                    aside.unlink()
            self.me = Claim(**{**asdict(self.me), "since": now, "beat": now})
            if self._write(self.me, replace=False):
                self.held = True
                return None
        current = read_claim(self.folder)
        self.held = False
        return current

    def renew(self) -> Claim | None:
        """The heartbeat: None while this agent holds the claim, else who has it now."""
        current = read_claim(self.folder)
        if current is not None and not current.same_agent(self.me):
            self.held = False
            return current
        return self.take()

    def release(self) -> None:
        """Remove this agent's claim (not another's)."""
        current = read_claim(self.folder)
        if current is not None and current.same_agent(self.me):
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.held = False
