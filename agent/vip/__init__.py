"""Typed client for VIP's REST API: see :class:`VipClient` and :mod:`agent.vip.errors`.

The client (and ``requests`` with it) is imported when first used, not with the package:
:mod:`agent.vip.urls`, :mod:`agent.vip.errors` and :mod:`agent.vip.models` are light, and
``agent.config`` (hence ``vip-agent status``) needs only :mod:`agent.vip.urls`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from agent.vip.errors import (
    AccessDeniedError,
    ApiError,
    AuthError,
    CapacityError,
    DeleteTimeout,
    EmptyFileError,
    InvalidNameError,
    LaunchUncertain,
    NotFoundError,
    RedirectError,
    SizeMismatch,
    TooLargeError,
    TransferTimeout,
    TransientError,
    VipError,
)
from agent.vip.models import PathInfo, start_seconds, to_seconds

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports them on first use
    from agent.vip.client import Progress, VipClient, encode_path, encode_pipeline_id

_CLIENT_NAMES = frozenset({"Progress", "VipClient", "encode_path", "encode_pipeline_id"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module("agent.vip.client"), name)
    raise AttributeError(f"module 'agent.vip' has no attribute {name!r}")

__all__ = [
    "AccessDeniedError",
    "ApiError",
    "AuthError",
    "CapacityError",
    "DeleteTimeout",
    "EmptyFileError",
    "InvalidNameError",
    "LaunchUncertain",
    "NotFoundError",
    "PathInfo",
    "Progress",
    "RedirectError",
    "SizeMismatch",
    "TooLargeError",
    "TransferTimeout",
    "TransientError",
    "VipClient",
    "VipError",
    "encode_path",
    "encode_pipeline_id",
    "start_seconds",
    "to_seconds",
]
