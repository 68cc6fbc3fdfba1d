"""The ``dicom:`` block of ``agent.yaml``: the DICOM node, its allow-list and its routes.

Parsed from the raw mapping by :func:`parse_dicom`, called by ``agent.config`` (this
module imports nothing from it, so there is no cycle). Every mistake is one
:class:`~agent.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.units import parse_duration, parse_listen, parse_size

DEFAULT_AE_TITLE = "VIPAGENT"
DEFAULT_PORT = 11112
DEFAULT_QUIET = 60.0
DEFAULT_DISK_LOW = 5_000_000_000
#: how long the originals of a handed-over study stay in the spool (``keep:``; None: forever)
DEFAULT_KEEP = 7 * 86400.0
#: Siemens CSA Non-Image Storage and Philips Private MR Spectrum Storage (spectroscopy)
DEFAULT_PRIVATE_SOP_CLASSES = ("1.3.12.2.1107.5.9.1", "1.3.46.670589.11.0.0.12.1")
LATE = ("new", "rerun", "ignore")
PER = ("study", "series")
DEIDENTIFY = ("basic", "none")
CONVERT = ("none", "nifti")
#: what ``match:`` may test (exact values: the first five; regular expressions: the rest)
MATCH_EXACT = ("CallingAE", "CalledAE", "Modality", "SOPClassUID", "ImageType")
MATCH_REGEX = ("SeriesDescription", "ProtocolName", "StudyDescription")
MATCH_KEYS = MATCH_EXACT + MATCH_REGEX

_TOP = ("ae_title", "listen", "allow", "quiet", "late", "disk_low", "private_sop_classes",
        "routes", "spool", "max_wait", "keep")  # fmt: skip
_ROUTE = ("match", "drop", "per", "deidentify", "convert", "require_series", "expect_counts",
          "allow_secondary_capture", "name")  # fmt: skip
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash


@dataclass(frozen=True)
class Allowed:
    """One allow-list entry: a calling AE title and/or a source address (None: any)."""

    ae: str | None = None
    host: str | None = None

    def admits(self, ae: str, host: str) -> bool:
        return (self.ae is None or self.ae == ae) and (self.host is None or self.host == host)


@dataclass(frozen=True)
class Route:
    """One routing rule: which series, to which drop folder, handed over how."""

    index: int
    match: tuple[tuple[str, tuple[str, ...]], ...]
    drop: Path
    per: str = "study"
    deidentify: str = "basic"
    convert: str = "none"
    #: every regex must match a series (SeriesDescription or ProtocolName) before handing over
    require_series: tuple[str, ...] = ()
    #: wait for the instance counts the data announces (NumberOf*RelatedInstances)
    expect_counts: bool = True
    #: secondary captures (possible burned-in text) are dropped by ``deidentify: basic`` unless true
    allow_secondary_capture: bool = False
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"routes[{self.index}]"


@dataclass(frozen=True)
class DicomConfig:
    """The whole ``dicom:`` block."""

    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow: tuple[Allowed, ...] = ()
    quiet: float = DEFAULT_QUIET
    late: str = "new"
    disk_low: int = DEFAULT_DISK_LOW
    private_sop_classes: tuple[str, ...] = DEFAULT_PRIVATE_SOP_CLASSES
    routes: tuple[Route, ...] = field(default_factory=tuple)
    #: spool folder (default: <state>/dicom/spool)
    spool: Path | None = None
    #: a study announcing more instances than it has waits at most this long after its quiet time
    max_wait: float = 3600.0
    #: seconds a handed-over study's originals stay in the spool (None: ``keep: forever``)
    keep: float | None = DEFAULT_KEEP

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Keys:
    """Errors that name ``dicom.<key>`` in the file."""

    def __init__(self, data: Mapping[str, Any], where: str, source: str) -> None:
        self.data, self.where, self.source = data, where, source

    def error(self, key: str, problem: str) -> ConfigError:
        name = f"{self.where}.{key}"
        return ConfigError(f"{self.source}: {name}: {problem}", detail=f"key {name}")

    def check(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(str(key), f"unknown setting{hint}; known: {', '.join(allowed)}")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.data.get(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def seconds(self, key: str, default: float) -> float:
        try:
            return parse_duration(self.data.get(key, default))
        except ValueError:
            raise self.error(key, f"must be a duration (60, '90s', '5m'), not {self.data.get(key)!r}") from None


def _ae_title(value: Any, keys: _Keys, key: str) -> str:
    if not isinstance(value, str) or not _AE.match(value.strip() or "\\"):
        raise keys.error(key, f"must be an AE title (1-16 characters, no backslash), not {value!r}")
    return value.strip()


def _allow(raw: Any, keys: _Keys) -> tuple[Allowed, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise keys.error("allow", "must be a list of {ae: TITLE, host: ADDRESS} entries")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not item or set(item) - {"ae", "host"}:
            raise keys.error(f"allow[{i}]", "must be a mapping with ae: and/or host:")
        ae = _ae_title(item["ae"], keys, f"allow[{i}].ae") if item.get("ae") is not None else None
        host = item.get("host")
        if host is not None:
            try:
                host = str(ipaddress.ip_address(str(host).strip()))
            except ValueError:
                raise keys.error(f"allow[{i}].host", f"must be an IP address, not {host!r}") from None
        out.append(Allowed(ae, host))
    return tuple(out)


def _match(raw: Any, keys: _Keys) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise keys.error("match", f"must be a mapping of {', '.join(MATCH_KEYS)}")
    sub = _Keys(raw, f"{keys.where}.match", keys.source)
    sub.check(MATCH_KEYS)
    out = []
    for key, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (str, int, float)) and str(v) for v in values):
            raise sub.error(key, "must be a value or a list of values")
        texts = tuple(str(v) for v in values)
        if key in MATCH_REGEX:
            for text in texts:
                try:
                    re.compile(text)
                except re.error as err:
                    raise sub.error(key, f"is not a valid regular expression ({err})") from None
        out.append((str(key), texts))
    return tuple(out)


def _route(i: int, raw: Any, source: str, base: Path, drops: Iterable[Path]) -> Route:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: dicom.routes[{i}]: must be a mapping (match:, drop:, ...)",
                          detail=f"key dicom.routes[{i}]")  # fmt: skip
    keys = _Keys(raw, f"dicom.routes[{i}]", source)
    keys.check(_ROUTE)
    drop_raw = raw.get("drop")
    if not isinstance(drop_raw, str) or not drop_raw.strip():
        raise keys.error("drop", "is required: the drop folder (of this agent.yaml) that receives the datasets")
    drop = (base / Path(os.path.expandvars(drop_raw)).expanduser()).resolve()
    known = [Path(d) for d in drops]
    if drop not in known:
        listed = ", ".join(str(d) for d in known) or "none"
        raise keys.error("drop", f"{drop} is not a drop folder of this agent.yaml (drops: {listed})")
    if "deidentify" not in raw:
        deidentify = "basic"
    else:
        deidentify = keys.choice("deidentify", "basic", DEIDENTIFY)
    required = raw.get("require_series") or []
    if isinstance(required, str):
        required = [required]
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise keys.error("require_series", "must be a list of regular expressions")
    for text in required:
        try:
            re.compile(text)
        except re.error as err:
            raise keys.error("require_series", f"{text!r} is not a valid regular expression ({err})") from None
    name = raw.get("name") or ""
    if not isinstance(name, str):
        raise keys.error("name", "must be a text")
    return Route(
        index=i,
        match=_match(raw.get("match"), keys),
        drop=drop,
        per=keys.choice("per", "study", PER),
        deidentify=deidentify,
        convert=keys.choice("convert", "none", CONVERT),
        require_series=tuple(required),
        expect_counts=keys.flag("expect_counts", True),
        allow_secondary_capture=keys.flag("allow_secondary_capture", False),
        name=name,
    )


def parse_dicom(data: Any, *, source: str, base: Path, drops: Iterable[Path]) -> DicomConfig | None:
    """The ``dicom:`` mapping as a :class:`DicomConfig` (None when absent or null).

    ``drops`` are the configured drop folders (resolved): each route must name one.
    """
    if data is None or data is False:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: dicom: must be a mapping (ae_title, listen, routes, ...)", detail="key dicom")
    keys = _Keys(data, "dicom", source)
    keys.check(_TOP)
    ae_title = _ae_title(data.get("ae_title", DEFAULT_AE_TITLE), keys, "ae_title")
    try:
        host, port = parse_listen(data.get("listen", f"127.0.0.1:{DEFAULT_PORT}"))
    except ValueError:
        raise keys.error("listen", f"must be [HOST:]PORT, e.g. 127.0.0.1:{DEFAULT_PORT} (0: a free port)") from None
    allow = _allow(data.get("allow"), keys)
    if not is_loopback(host) and not allow:
        raise keys.error("allow", f"is required when listen is not loopback ({host}): list the "
                                  "scanners and PACS that may send, e.g. [{ae: SCANNER1, host: 10.0.0.5}]")  # fmt: skip
    try:
        disk_low = parse_size(data.get("disk_low", DEFAULT_DISK_LOW))
    except ValueError:
        raise keys.error("disk_low", f"must be a size ('5GB', '500MB'), not {data.get('disk_low')!r}") from None
    private = data.get("private_sop_classes", list(DEFAULT_PRIVATE_SOP_CLASSES))
    if not isinstance(private, list) or not all(isinstance(u, str) and _UID.match(u) for u in private):
        raise keys.error("private_sop_classes", "must be a list of SOP class UIDs (digits and dots)")
    routes_raw = data.get("routes") or []
    if not isinstance(routes_raw, list):
        raise keys.error("routes", "must be a list of {match:, drop:, per:, deidentify:, convert:}")
    routes = tuple(_route(i, r, source, base, drops) for i, r in enumerate(routes_raw))
    spool = data.get("spool")
    if spool is not None and (not isinstance(spool, str) or not spool.strip()):
        raise keys.error("spool", "must be a folder path")
    quiet = keys.seconds("quiet", DEFAULT_QUIET)
    if quiet <= 0:
        raise keys.error("quiet", "must be more than 0 seconds")
    return DicomConfig(
        ae_title=ae_title,
        host=host,
        port=port,
        allow=allow,
        quiet=quiet,
        late=keys.choice("late", "new", LATE),
        disk_low=disk_low,
        private_sop_classes=tuple(private),
        routes=routes,
        spool=(base / Path(os.path.expandvars(spool)).expanduser()).resolve() if spool else None,
        max_wait=keys.seconds("max_wait", 3600.0),
        keep=_keep(data, keys),
    )


def _keep(data: Mapping[str, Any], keys: _Keys) -> float | None:
    raw = data.get("keep", DEFAULT_KEEP)
    if isinstance(raw, str) and raw.strip().lower() == "forever":
        return None
    try:
        return parse_duration(raw)
    except ValueError:
        raise keys.error("keep", f"must be a duration ('7d', '12h', '30m') or forever, not {raw!r}") from None


#: what the listening side is built from: a change restarts the node (the rest applies live)
NETWORK_SETTINGS = ("ae_title", "host", "port", "private_sop_classes", "spool")


def changed_settings(old: DicomConfig, new: DicomConfig) -> list[str]:
    """The names of the settings that differ between two ``dicom:`` blocks."""
    return [f.name for f in fields(DicomConfig) if getattr(old, f.name) != getattr(new, f.name)]
