"""Typed client for VIP's REST API: see :class:`VipClient` and :mod:`agent.vip.errors`."""

from agent.vip.client import Progress, VipClient, encode_path, encode_pipeline_id
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
