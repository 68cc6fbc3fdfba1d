"""Logging for the service: one line per event, text or JSON, secrets redacted.

Text on a terminal carries a timestamp; under journald (``$JOURNAL_STREAM``) it
carries a ``<N>`` syslog priority prefix instead, because journald stamps time
and reads the level from that prefix. ``--log-format json`` writes one JSON
object per line (time, level, logger, message, and any ``extra`` fields).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

LOGGER_NAME = "vip_agent"
REDACTED = "***"

#: ``apikey: xyz`` / ``apikey=xyz`` as it could appear in a dumped header or URL
_KEY_FIELD = re.compile(r"(?i)(api[-_]?key[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&]+)")

_SYSLOG_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}
#: LogRecord attributes that are not ``extra=`` fields
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class RedactFilter(logging.Filter):
    """Replace API keys (the given ones, and any ``apikey=...`` field) in records."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        for s in secrets:
            self.add(s)

    def add(self, secret: str | None) -> None:
        """Redact this value from now on (values shorter than 6 characters are ignored)."""
        if secret and len(secret) >= 6:
            self._secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _KEY_FIELD.sub(lambda m: m.group(1) + REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        # Format once here so that arguments, exception text and extras are all covered.
        message = record.getMessage()
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self.redact(value))
        return True


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", " | ")


class TextFormatter(logging.Formatter):
    """``2024-05-01 12:00:00 WARNING message`` (or ``<4>message`` for journald)."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message} | {record.exc_text}"
        message = _one_line(message)
        if self.journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{message}"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname:<7} {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        return json.dumps(doc, ensure_ascii=False)


def under_journald(stream: IO[str]) -> bool:
    """True when ``stream`` is connected to journald (systemd sets ``$JOURNAL_STREAM``)."""
    spec = os.environ.get("JOURNAL_STREAM")
    if not spec:
        return False
    try:
        dev, ino = (int(x) for x in spec.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(
    log_format: str = "text",
    *,
    level: int = logging.INFO,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> RedactFilter:
    """Configure the ``vip_agent`` logger tree; returns the redaction filter (add keys to it).

    The filter sits on the handler, so records of every logger that reaches it
    (including ``requests``/``urllib3`` when propagated) are redacted.
    """
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(journald=under_journald(stream)))
    redact = RedactFilter(secrets)
    handler.addFilter(redact)
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        if getattr(old, "_vip_agent", False):
            logger.removeHandler(old)
    handler._vip_agent = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return redact


def get_logger(name: str = "") -> logging.Logger:
    """A logger under ``vip_agent`` (``get_logger("watch")`` -> ``vip_agent.watch``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
