"""VIP error codes and message templates, and the business-error exception."""

from __future__ import annotations

GENERIC = "An error has been encountered on the VIP API"

#: (code, raw template) as published by GET /rest/platform
TEMPLATES: list[tuple[int, str]] = [
    (8000, GENERIC),
    (8001, "The action is not implemented yet : {}"),
    (8002, "Bad credentials"),
    (8003, "Insufficient authentication"),
    (8004, "Authentication error"),
    (8005, "The pipeline identifier {} is not valid"),
    (8006, "VIP Internal error"),
    (8007, "The pipeline {} does not exist or cannot be used"),
    (8008, "Not allowed to access pipeline {}"),
    (8009, "Input field '{}' is not valid. Cause : {}"),
    (8010, "The error message for 'INVALID_EXECUTION_ID' cannot be known in advance"),
    (8011, "The error message for 'UNAUTHORIZED_ACTION' cannot be known in advance"),
    (8012, "The error message for 'COMPUTING_RESOURCE_ERROR' cannot be known in advance"),
    (8013, "Unauthorized data access to {}"),
    (8014, "The error message for 'DATA_ACCESS_ERROR' cannot be known in advance"),
    (8015, "No execution available with this id"),
    (8016, "Not an example execution"),
    (8017, "The error message for 'WRONG_STAT_SERVICE' cannot be known in advance"),
    (8018, "The input {} is required and has no default value"),
    (8019, "The execution name '{}' contains invalid characters"),
    (8020, "The execution initialization failed : {}"),
    (2000, "Max number of running executions reached on the platform."),
    (2001, "Max number of running executions reached.You already have {} running executions."),
    (2002, "Wrong application descriptor: {}"),
]


class ApiFailure(Exception):
    """A coded VIP error; ``http_status`` 400 unless the code defines one."""

    def __init__(self, code: int, message: str, http_status: int = 400, *, suffix: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.message = f"{message} (Error code {code})" if suffix else message


def generic(http_status: int = 400) -> ApiFailure:
    """Spring-internal error (404, 405, bad parameter, unreadable body): no suffix."""
    return ApiFailure(8000, GENERIC, http_status, suffix=False)


def platform_errors() -> list[dict[str, object]]:
    return [{"errorCode": c, "errorMessage": t} for c, t in TEMPLATES]
