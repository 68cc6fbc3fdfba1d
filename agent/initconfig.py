"""Write a first, commented ``agent.yaml`` (``vip-agent init``): checked before it lands, never over one."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import DEFAULT_SETTLE, load_config
from agent.errors import ConfigError
from agent.paths import DEFAULT_SERVER


@dataclass(frozen=True)
class InitChoices:
    """What ``vip-agent init`` asks for (every field has a default)."""

    drop: Path
    output: Path
    server: str = DEFAULT_SERVER
    rule: str = "settle"
    settle_seconds: float = DEFAULT_SETTLE
    marker: str = "READY"
    max_running: int = 1
    state: Path | None = None


def _q(value: object) -> str:
    """A YAML scalar that stays a string whatever it holds (a JSON string is valid YAML)."""
    return json.dumps(str(value))


def render(c: InitChoices) -> str:
    """The agent.yaml text: every value the user chose, with a comment saying what it does."""
    marker = "" if c.rule == "marker" else "# "
    state = f"state: {_q(c.state)}" if c.state else "# state: (default)"
    output = _q(c.output)
    return f"""\
# vip-agent configuration, written by `vip-agent init` on {time.strftime("%Y-%m-%d %H:%M")}.
# Every key is described in docs/agent-yaml.md. Check it with `vip-agent doctor`; run it with
# `vip-agent watch` (or as a service: `vip-agent install-service --user`).
# Relative paths are relative to this file's folder.

{state:<36}# journal and lock; the default is the per-user state folder
log_format: text                    # text | json (for a log collector)

defaults:                           # every drop folder below gets these (each may override)
  server: {_q(c.server):<26}# the VIP portal; its API key: `vip-agent login --server URL`
  max_running: {c.max_running:<21}# executions running at once on VIP (VIP caps each user)
  max_uploads: 2                    # datasets uploading at once
  max_downloads: 2                  # datasets downloading at once

drops:
  # Put one folder per dataset here, with a job.yaml in it or in the drop folder
  # (`vip-agent pipelines PIPELINE --job-yaml` writes one).
  - path: {_q(c.drop)}
    output: {output:<24}  # <output>/<dataset>/ receives the mirrored outputs
    readiness:
      rule: {c.rule:<24}# settle | marker | manifest: when a dataset counts as complete
      settle_seconds: {c.settle_seconds:<14g}# settle: no change for this long = complete
      {f"{marker}marker: {_q(c.marker)}":<30}# marker: the file the instrument writes last
      stale_after: 1d               # still incomplete after a day: reported (keeps waiting)
    after: keep                     # keep | archive | delete: what happens to a finished dataset
"""


def write_config(path: Path, text: str, *, force: bool = False) -> Path | None:
    """Write ``text`` to ``path`` after checking it loads; returns the backup of a replaced file.

    An existing file is never overwritten without ``force``; with it, the old file
    is kept as ``agent.yaml.bak-<time>``.
    """
    if path.exists() and not force:
        raise ConfigError(
            f"{path} already exists; nothing was changed. Edit it, or run "
            "`vip-agent init --force` to replace it (the old one is kept as a .bak file)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        load_config(Path(tmp))  # a config that does not load never lands
        backup = None
        if path.exists():
            backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, backup)
        os.replace(tmp, path)
        return backup
    finally:
        Path(tmp).unlink(missing_ok=True)
