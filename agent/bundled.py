"""The example datasets, sample agent.yaml and docs that ship with vip-agent.

In a source checkout (or an editable install) they are the repository's own
``examples/`` and ``docs/``. An installed wheel carries a copy of both as
``agent/_bundled/`` (made by setup.py at build time, never kept by hand).
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import AgentError

PACKAGE = Path(__file__).resolve().parent


class NotBundled(AgentError):
    """This installation lacks the shipped examples/docs (a broken or partial install)."""


def bundled(name: str) -> Path:
    """``examples`` or ``docs``: the checkout's folder when running from one, else the packaged copy."""
    checkout = PACKAGE.parent / name
    if checkout.is_dir() and (PACKAGE.parent / "pyproject.toml").is_file():
        return checkout
    packaged = PACKAGE / "_bundled" / name
    if packaged.is_dir():
        return packaged
    raise NotBundled(
        f"this vip-agent installation has no {name}/ folder",
        detail=f"looked in {checkout} and {packaged}; reinstall vip-agent from a wheel or a checkout",
    )


def examples_dir() -> Path:
    """``examples/``: ``drop/`` (the demo's datasets), ``failing/``, ``agent.yaml``."""
    return bundled("examples")


def docs_dir() -> Path:
    return bundled("docs")
