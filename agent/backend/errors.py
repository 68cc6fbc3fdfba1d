"""The port's error vocabulary: what a platform's storage and engine raise to the runner.

Every backend raises these types (the VIP backend's client defines them, the in-memory backend
raises the same), so the runner reads a refusal, a capacity wait or a lost file without knowing
which platform it talks to. ``check_server_path`` is the port's rule for a path a server names:
absolute, no ``.``/``..``, inside the folder it was asked about.
"""

from __future__ import annotations

from agent.vip.errors import (
    ApiError,
    AuthError,
    CapacityError,
    LaunchUncertain,
    NotFoundError,
    SourceChanged,
    TooLargeError,
    TransientError,
    UnsafePathError,
    VipError,
)
from agent.vip.models import check_server_path

#: the base of every platform error (VIP's name for it, kept for the existing handlers)
PlatformError = VipError

__all__ = [
    "ApiError",
    "AuthError",
    "CapacityError",
    "LaunchUncertain",
    "NotFoundError",
    "PlatformError",
    "SourceChanged",
    "TooLargeError",
    "TransientError",
    "UnsafePathError",
    "VipError",
    "check_server_path",
]
