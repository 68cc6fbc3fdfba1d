"""Inputs that name files already on the platform (``/vip/...``) and a group ``vip_root``:
checked to exist and be readable before anything is sent (``run --dry-run`` too), because VIP
would fail the execution only after its jobs queued."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from agent.jobfile import JobSpec, is_remote
from agent.validate import ValidationReport, pipeline_params
from agent.vip.errors import AccessDeniedError, NotFoundError

__all__ = ["GROUP_FOLDER_RE", "PathProbe", "check_platform_paths", "probe_with"]

#: a platform path's check: None when it exists and this key may read it, else the problem
PathProbe = Callable[[str], str | None]
#: the top folder of a VIP group (``/vip/<name> (group)``) at the start of a path
GROUP_FOLDER_RE = re.compile(r"^/vip/[^/]+ \(group\)")


def probe_with(exists: Callable[[str], bool]) -> PathProbe:
    """A :data:`PathProbe` over a platform's ``exists`` (``VipClient.exists``,
    ``Storage.exists``): a path missing, or refused to this key (8013), is a problem."""

    def probe(path: str) -> str | None:
        try:
            return None if exists(path) else (
                "does not exist on VIP; check the path (case and spaces matter) or put the "
                "file there first"
            )
        except AccessDeniedError as err:
            return f"cannot be read with this API key (VIP: {err.message})"
        except NotFoundError:
            return "does not exist on VIP; check the path (case and spaces matter)"

    return probe


def check_platform_paths(
    report: ValidationReport, job: JobSpec, pipeline: Mapping[str, Any], probe: PathProbe,
    *, vip_root: str | None = None,
) -> None:  # fmt: skip
    """Every platform path (``/vip/...``) given to a File or List input, and a group
    ``vip_root``'s group folder, must exist and be readable: VIP would otherwise fail the
    execution only after its jobs queued. Problems go into ``report`` (one per path and
    input, each path asked once); nothing is sent for a dataset that has one."""
    params = pipeline_params(pipeline)
    many = len(job.variants) > 0
    asked: dict[str, str | None] = {}

    def problem(path: str) -> str | None:
        if path not in asked:
            asked[path] = probe(path)
        return asked[path]

    for vname, variant in (report.resolved.variants if report.resolved else {}).items():
        in_v = f" (variant '{vname}')" if many else ""
        for name, value in variant.inputs.items():
            if str((params.get(name) or {}).get("type") or "") not in ("File", "List"):
                continue
            for item in value.items:
                if isinstance(item, str) and is_remote(item):
                    why = problem(item)
                    if why:
                        report.error(f"input '{name}'{in_v}: {item} {why}")
    root = vip_root or job.vip_root
    group = GROUP_FOLDER_RE.match(root or "")
    if group:
        why = problem(group.group(0))
        if why:
            report.error(f"vip_root '{root}': the group folder {group.group(0)} {why}")
