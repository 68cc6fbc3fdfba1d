"""Values users write in agent.yaml and on the command line: durations, sizes, listen
addresses. One reader for each, shared by every section (drop folders, the page, DICOM)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["parse_duration", "parse_listen", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a text such as ``'30s'``, ``'5m'``, ``'2h'``, ``'1d'``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(value)
    if seconds < 0:
        raise ValueError(value)
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from a number or a text such as ``'500MB'``, ``'2 GB'``, ``'1GiB'``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)) and value >= 0:
        return int(value)
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(value)
    unit = (m.group(2) or "b").lower()
    power = "bkmgt".index(unit[0])
    base = 1024 if "i" in unit else 1000
    return int(float(m.group(1)) * base**power)


def parse_listen(value: Any) -> tuple[str, int]:
    """``[HOST:]PORT`` (``[::1]:PORT`` for IPv6) as (host, port); host defaults to 127.0.0.1."""
    text = str(value).strip()
    host = "127.0.0.1"
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(value)
        host, text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, text = text.rsplit(":", 1)
        host = host or "127.0.0.1"
        if host.isdigit():  # "1:30" is no host and port (YAML 1.1 even read it as 90)
            raise ValueError(value)
    if not text.isdigit() or not 0 <= int(text) <= 65535 or isinstance(value, bool):
        raise ValueError(value)
    return host, int(text)
