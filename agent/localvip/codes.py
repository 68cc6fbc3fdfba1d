"""VIP error codes, names and message templates, and the business-error exception.

The table follows VIP-portal 4.6's ``ApiException.ApiError`` (8xxx) and the
``ApplicationError`` enum of the development branch after it (2xxx, where 2003
ENGINE_SATURATED and 2004 LAUNCH_ERROR appeared). ``GET /rest/platform`` lists each
code with its raw template; a code without a template is listed, as VIP does, as
"The error message for '<name in lower case, spaces>' cannot be known in advance".
A raised error reads ``<formatted template> (Error code N)``; a code without a
template raises "VIP Internal error (Error code N)" (``VipException.formatMessage``).
"""

from __future__ import annotations

GENERIC = "An error has been encountered on the VIP API"

#: (code, enum name, raw template or None) in the enums' order
ERRORS: list[tuple[int, str, str | None]] = [
    (8000, "GENERIC_API_ERROR", GENERIC),
    (8001, "NOT_IMPLEMENTED", "The {} method is not implemented in the VIP API"),
    (8002, "BAD_CREDENTIALS", "Bad credentials"),
    (8003, "INSUFFICIENT_AUTH", None),
    (8004, "AUTHENTICATION_ERROR", None),
    (8005, "INVALID_PIPELINE_IDENTIFIER", "The {} pipeline identifier is not valid"),
    (8006, "APPLICATION_NOT_FOUND", None),
    (8007, "PIPELINE_NOT_FOUND", "The {} pipeline does not exists or cannot be used"),
    (8008, "NOT_ALLOWED_TO_USE_PIPELINE", "Not allowed to access pipeline {}"),
    (8009, "INPUT_FIELD_NOT_VALID", "Input field '{}' is not valid. Cause : {}"),
    (8010, "WRONG_DATE_FORMAT", "The date {} have a wrong format (needed : {})"),
    (8011, "WRONG_STAT_SERVICE", "The service {} is unknown, only 'vip' is possible"),
    (8012, "COUNTRY_UNKNOWN", "Country unknown : {}"),
    (8013, "UNAUTHORIZED_DATA_ACCESS", "Unauthorized data access to : {}"),
    (8014, "WRONG_OIDC_LOGIN", "The login process encountered an error"),
    (8015, "INVALID_EXECUTION_ID", "No execution available with this id : {}"),
    (8016, "INVALID_EXAMPLE_ID", "There is no example with the id : {}"),
    (8017, "NOT_COMPATIBLE_WITH_BOUTIQUES", "The pipeline is not compatible with boutiques : {}"),
    (8018, "INPUT_FIELD_MISSING", "Input field '{}' is missing"),
    (8019, "INVALID_EXECUTION_NAME", "The execution name is not valid : Cause {}"),
    (8020, "INVALID_EXECUTION_INIT", "The execution could not be submitted : Cause {}"),
    (2000, "PLATFORM_MAX_EXECS", "Max number of running executions reached on the platform."),
    (2001, "USER_MAX_EXECS", "Max number of running executions reached.<br />You already have {} running executions."),
    (2002, "WRONG_APPLICATION_DESCRIPTOR", "Error getting application descriptor for {}."),
    (2003, "ENGINE_SATURATED", "Engine is saturated!"),
    (2004, "LAUNCH_ERROR", "Error launching execution, contact admins!"),
]

_BY_CODE = {code: (name, template) for code, name, template in ERRORS}

#: the characters VIP accepts in an execution name (``EXEC_NAME_VALID_CHARS``)
EXEC_NAME_VALID_CHARS = "0-9A-Za-z-_ "


def listed_message(code: int) -> str:
    """The message ``/platform`` publishes for ``code`` (raw template, or VIP's placeholder)."""
    name, template = _BY_CODE[code]
    if template is not None:
        return template
    return f"The error message for '{name.replace('_', ' ').lower()}' cannot be known in advance"


def message(code: int, *params: object) -> str:
    """VIP's message for ``code`` formatted with ``params``, without the code suffix.

    ``<br />`` is removed as VIP's exception handler does before answering.
    """
    _name, template = _BY_CODE[code]
    if template is None:
        return "VIP Internal error"
    text = template
    for p in params:
        text = text.replace("{}", str(p), 1)
    return text.replace("<br />", "")


class ApiFailure(Exception):
    """A coded VIP error; ``http_status`` 400 unless the code defines one."""

    def __init__(self, code: int, message: str, http_status: int = 400, *, suffix: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.message = f"{message} (Error code {code})" if suffix else message


def coded(code: int, *params: object) -> ApiFailure:
    """The error VIP raises for ``code`` with ``params`` (e.g. ``coded(8015, exec_id)``)."""
    return ApiFailure(code, message(code, *params))


def generic(http_status: int = 400) -> ApiFailure:
    """Spring-internal error (404, 405, bad parameter, unreadable body): no suffix."""
    return ApiFailure(8000, GENERIC, http_status, suffix=False)


def uncoded() -> ApiFailure:
    """What VIP answers for an exception that carries no code (a timeout, an engine failure):
    its exception handler finds no code along the cause chain and answers the generic 8000."""
    return ApiFailure(8000, GENERIC)


def platform_errors() -> list[dict[str, object]]:
    return [{"errorCode": c, "errorMessage": listed_message(c)} for c, _n, _t in ERRORS]
