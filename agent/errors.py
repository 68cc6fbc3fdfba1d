"""Error types shared across vip-agent.

Every error carries a ``message`` a lab user understands and an optional
``detail`` for the operator (codes, URLs, exception text). ``str(err)`` is the
message; logs show both.
"""

from __future__ import annotations

import re


def one_line(text: str | None) -> str:
    """A multi-line message (a heading and its ``- problem`` list) on one line, for tables and logs."""
    if not text:
        return ""
    parts = [line.strip().removeprefix("- ").strip() for line in text.splitlines()]
    parts = [p for p in parts if p]
    if len(parts) > 1 and parts[0].endswith(":"):
        return parts[0] + " " + "; ".join(parts[1:])
    return " ".join(parts)


#: a secret at least this long is replaced wherever it appears; a shorter one (a test key
#: such as "e") only where it stands alone: "/rest/executions" stays readable
SCRUB_ANYWHERE = 8


def scrub(text: str, secret: str, mark: str = "***") -> str:
    """``text`` without ``secret`` (the one rule for every message that could echo a key)."""
    if not secret:
        return text
    if len(secret) >= SCRUB_ANYWHERE:
        return text.replace(secret, mark)
    return re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", lambda _m: mark, text)


class AgentError(Exception):
    """Base of every error vip-agent raises on purpose."""

    #: process exit code when this error ends a command
    exit_code = 1

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message

    def full(self) -> str:
        """Message plus operator detail, for logs."""
        return f"{self.message} ({self.detail})" if self.detail else self.message


class ConfigError(AgentError):
    """A configuration or job file is wrong; nothing was sent."""

    exit_code = 2


class StateFolderError(ConfigError):
    """The state folder (journal, lock) is missing, read-only or of a newer release."""


class ValidationError(AgentError):
    """A dataset does not fit its pipeline; every problem is listed."""

    exit_code = 2

    def __init__(self, problems: list[str], detail: str | None = None) -> None:
        self.problems = list(problems)
        head = "the dataset cannot be run:" if len(problems) != 1 else "the dataset cannot be run:"
        super().__init__(head + "".join(f"\n  - {p}" for p in problems), detail)


class CredentialError(AgentError):
    """No usable API key, or the key was refused."""

    exit_code = 3
