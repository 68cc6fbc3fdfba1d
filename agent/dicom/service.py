"""The DICOM node inside ``vip-agent watch``: started with the service, reloaded on SIGHUP.

A reloaded ``dicom:`` block is applied to the running node when only hand-over settings
changed (routes, quiet, late, max_wait, disk_low, keep, the allow-list: no association is
dropped); the node is stopped and started when its listening side changed (listen,
ae_title, private_sop_classes, spool), and started or stopped when the block was added or
removed. A block that cannot start (its port taken...) gives way to the previous one.
The node's module is imported only when a node runs (it needs the ``dicom`` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.dicom.config import DicomConfig

log = logging.getLogger("vip_agent.dicom")


def markers(config: AgentConfig) -> dict[Path, str | None]:
    """The readiness marker the node writes into each drop folder's datasets (None: no marker)."""
    return {d.path: d.readiness.marker if d.readiness.rule == "marker" else None for d in config.drops}


def start_node(config: AgentConfig, journal_path: Path, on_dataset: Callable[[Path, str], None]) -> Any:
    """A started DicomNode for ``config.dicom`` (None when there is no ``dicom:`` block)."""
    if config.dicom is None:
        return None
    try:
        from agent.dicom.node import DicomNode
    except ImportError as err:
        raise ConfigError("the 'dicom:' block needs the DICOM extra: pip install 'vip-agent[dicom]'",
                          detail=str(err)) from None  # fmt: skip
    node = DicomNode(config.dicom, config.state, journal_path, markers=markers(config), on_dataset=on_dataset)
    node.start()
    return node


def reload_node(node: Any, old: DicomConfig | None, config: AgentConfig, journal_path: Path,
                on_dataset: Callable[[Path, str], None]) -> tuple[Any, DicomConfig | None]:  # fmt: skip
    """Apply a reloaded configuration to the running ``node`` (None: none runs); the node now
    running and the ``dicom:`` block it runs with (the previous one if the new one cannot start)."""
    new = config.dicom
    if node is not None and new is not None and node.reconfigure(new, markers(config)) is not None:
        return node, new  # applied in place (it logs what changed)
    if node is None and new is None:
        return None, None
    if node is not None:
        if new is None:
            log.info("DICOM node: the dicom: block was removed: stopping")
        node.stop()
    try:
        return start_node(config, journal_path, on_dataset), new
    except (AgentError, OSError) as err:  # e.g. the new port is taken
        log.error("DICOM node: cannot start with the reloaded dicom: block (%s); starting the previous one", err)
    try:
        return start_node(replace(config, dicom=old), journal_path, on_dataset), old
    except (AgentError, OSError) as err:
        log.error("DICOM node: cannot start with the previous dicom: block either (%s); none runs", err)
        return None, None
