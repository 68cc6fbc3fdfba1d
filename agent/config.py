"""``agent.yaml``: the configuration of the ``vip-agent watch`` service.

One file lists one or more drop folders, each with its server, output root,
readiness rule, limits and what to do with a dataset afterwards. Every mistake
is reported as one :class:`~agent.errors.ConfigError` naming the file and the
key (exit code 2). The reference is ``docs/agent-yaml.md``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent import yamlread
from agent.bandwidth import BandwidthConfig, parse_bandwidth
from agent.dicom.config import DicomConfig, parse_dicom
from agent.errors import ConfigError
from agent.extract import MAX_MEMBER_RATIO, MAX_RATIO
from agent.jobfile import MAX_JOBS, MAX_RUNS
from agent.pacer import DEFAULT_MAX_TRANSFERS
from agent.paths import default_config_path as default_config_path  # re-exported
from agent.paths import default_state_dir
from agent.units import parse_duration, parse_listen, parse_size
from agent.vip.urls import normalise_server

#: the public VIP portal, used when a drop folder names no server
DEFAULT_SERVER = "https://vip.creatis.insa-lyon.fr"
#: quiet period of the ``settle`` rule for the service (``--settle`` overrides it)
DEFAULT_SETTLE = 30.0
#: a dataset not ready after this long is reported as stalled (it keeps waiting)
DEFAULT_STALE_AFTER = 86400.0
DEFAULT_POLL_INTERVAL = 10.0
DEFAULT_RESCAN_INTERVAL = 600.0
DEFAULT_MARKER = "READY"

RULES = ("settle", "marker", "manifest")
DATASET_KINDS = ("folders", "files")
OBSERVERS = ("auto", "native", "polling")
AFTER = ("keep", "archive", "delete")
LOG_FORMATS = ("text", "json")

#: free space on a drop folder's output below which ``disk_low`` is notified
DEFAULT_DISK_LOW = 1_000_000_000
#: what ``notify: - on: [...]`` accepts
NOTIFY_EVENTS = ("failed", "incomplete", "paused", "done", "disk_low")
#: port of the status page when ``http:`` names none
DEFAULT_HTTP_PORT = 8490



@dataclass(frozen=True)
class Readiness:
    """When a dataset counts as complete."""

    rule: str = "settle"
    settle_seconds: float = DEFAULT_SETTLE
    marker: str = DEFAULT_MARKER
    stale_after: float = DEFAULT_STALE_AFTER  # 0 = never report


@dataclass(frozen=True)
class Limits:
    """How much runs at once for one drop folder (``max_running`` is per server:
    see :meth:`AgentConfig.max_running`)."""

    max_uploads: int = 2
    max_downloads: int = 2
    max_running: int = 1
    #: datasets per server uploaded ahead of the running slot (inputs on VIP waiting to
    #: launch); the others wait locally, queued (per server: see AgentConfig.upload_ahead)
    upload_ahead: int = 2
    #: most ``runs`` and most VIP jobs one dataset may ask for (bigger jobs are refused)
    max_runs: int = MAX_RUNS
    max_jobs: int = MAX_JOBS
    #: result archives expanding more than this many times are refused (in total, per member)
    extract_max_ratio: int = int(MAX_RATIO)
    extract_max_member_ratio: int = int(MAX_MEMBER_RATIO)


@dataclass(frozen=True)
class EmailSettings:
    """``notify: - email: {...}``: SMTP with STARTTLS; the password is never in agent.yaml."""

    host: str
    to: tuple[str, ...]
    sender: str
    port: int = 587
    user: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    starttls: bool = True


@dataclass(frozen=True)
class NotifyRule:
    """One ``notify:`` entry: which events, and one way to tell someone."""

    on: frozenset[str]
    webhook: str | None = None
    command: tuple[str, ...] | None = None
    email: EmailSettings | None = None
    timeout: float = 60.0


@dataclass(frozen=True)
class HttpSettings:
    """``http:``: the status page, its JSON API and ``/metrics``."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    #: reads (page, API, metrics) need the token even from loopback
    read_token: bool = False
    #: extra names a browser or Prometheus may use in ``Host:`` (DNS-rebinding guard)
    allowed_hosts: tuple[str, ...] = ()
    #: seconds between two updates of an open page
    refresh: float = 1.0


@dataclass(frozen=True)
class DropConfig:
    """One drop folder."""

    path: Path
    server: str
    output: Path
    readiness: Readiness = field(default_factory=Readiness)
    datasets: str = "folders"
    pattern: str = "*"
    observer: str = "auto"
    poll_interval: float = DEFAULT_POLL_INTERVAL
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL
    limits: Limits = field(default_factory=Limits)
    after: str = "keep"
    archive_dir: Path | None = None
    failed_dir: Path | None = None
    key_file: Path | None = None
    keep_remote: bool = False
    notify: tuple[NotifyRule, ...] = ()
    disk_low: int = DEFAULT_DISK_LOW
    #: seconds an execution may read ``Unknown`` before it is killed (None: the runner's default)
    unknown_limit: float | None = None
    #: polling of a running execution: first interval and ceiling, seconds (None: defaults)
    poll_min: float | None = None
    poll_max: float | None = None
    #: parallel connections per dataset transfer (None: the runner's default)
    transfer_parallelism: int | None = None
    #: ``bandwidth:`` limits of this drop folder's server (agent.bandwidth; None: none)
    bandwidth: BandwidthConfig | None = None
    #: concurrent transfers with this drop folder's server, all datasets together (agent.pacer)
    max_transfers_per_server: int = DEFAULT_MAX_TRANSFERS

    @property
    def template(self) -> Path:
        """The drop folder's ``job.yaml`` (template of every dataset; may not exist)."""
        return self.path / "job.yaml"

    def own_folders(self) -> list[Path]:
        """The agent's folders that may lie inside the drop folder (never datasets)."""
        return [p for p in (self.output, self.archive_dir, self.failed_dir) if p is not None]


@dataclass(frozen=True)
class AgentConfig:
    """The whole ``agent.yaml``."""

    drops: tuple[DropConfig, ...]
    state: Path
    log_format: str = "text"
    source: Path | None = None  # the file it came from (None: command-line arguments)
    http: HttpSettings | None = None  # None: no status page
    dicom: DicomConfig | None = None  # None: no DICOM node (``dicom:``, docs/dicom.md)

    def max_running(self, server: str) -> int:
        """The running-executions cap of ``server``: the one place it is decided.

        ``max_running`` is set per drop folder but counts per server: when several drop
        folders share a server, the smallest of their values applies to all of them.
        """
        caps = [d.limits.max_running for d in self.drops if d.server == server]
        return min(caps) if caps else Limits().max_running

    def upload_ahead(self, server: str) -> int:
        """Datasets of ``server`` that may be uploaded and wait for a running slot: the
        smallest ``upload_ahead`` of its drop folders (the default when none uses it)."""
        caps = [d.limits.upload_ahead for d in self.drops if d.server == server]
        return min(caps) if caps else Limits().upload_ahead

    def max_transfers(self, server: str) -> int:
        """Concurrent transfers with ``server``: the smallest ``max_transfers_per_server`` of
        its drop folders (the default when none uses it)."""
        caps = [d.max_transfers_per_server for d in self.drops if d.server == server]
        return min(caps) if caps else DEFAULT_MAX_TRANSFERS

    def transfer_limits(self) -> dict[str, int]:
        """Server -> :meth:`max_transfers`, for every server of the drop folders."""
        return {d.server: self.max_transfers(d.server) for d in self.drops}

    def drop_for(self, path: str | Path | None) -> DropConfig | None:
        """The drop folder a dataset recorded with ``drop_dir=path`` belongs to."""
        if path is None:
            return None
        target = Path(path)
        return next((d for d in self.drops if d.path == target), None)


# -- parsing -----------------------------------------------------------------------

_TOP_KEYS = ("drops", "state", "log_format", "defaults", "http", "dicom")
_DROP_KEYS = (
    "path", "server", "output", "readiness", "datasets", "pattern", "observer",
    "poll_interval", "rescan_interval", "max_uploads", "max_downloads", "max_running",
    "after", "archive_dir", "failed_dir", "key_file", "keep_remote", "poll",
    "transfer_parallelism", "notify", "disk_low", "max_runs", "max_jobs",
    "extract_max_ratio", "extract_max_member_ratio", "unknown_limit", "bandwidth",
    "max_transfers_per_server", "upload_ahead",
)  # fmt: skip
_READINESS_KEYS = ("rule", "settle_seconds", "marker", "stale_after")


class _Reader:
    """Typed access to one mapping of the file, with errors that name the key."""

    def __init__(self, data: Mapping[str, Any], where: str, source: str, base: Path) -> None:
        self.data, self.where, self.source, self.base = data, where, source, base

    def error(self, key: str, problem: str) -> ConfigError:
        name = f"{self.where}.{key}" if self.where else key
        return ConfigError(f"{self.source}: {name}: {problem}", detail=f"key {name}")

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(str(key), f"unknown setting{hint}; known: {', '.join(allowed)}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.data.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty text, not {value!r}{yamlread.text_hint(value)}")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value.strip()

    def path(self, key: str, default: Path | None = None) -> Path | None:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a folder path, not {value!r}")
        p = Path(os.path.expandvars(value)).expanduser()
        return (self.base / p).resolve()

    def seconds(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        try:
            return parse_duration(value)
        except ValueError:
            raise self.error(
                key, f"must be a duration in seconds (30, 2.5, '10s', '5m', '2h', '1d'), not {value!r}"
            ) from None

    def whole(self, key: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be a whole number >= {minimum}, not {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, not {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        flag = yamlread.as_flag(value)  # yes/no/on/off are words YAML 1.2 leaves as text
        if flag is None:
            raise self.error(key, f"must be true or false, not {value!r}")
        return flag

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            raise self.error(key, "must be a mapping of settings")
        return value


def _http(data: Any, source: str, base: Path) -> HttpSettings | None:
    if isinstance(data, str) and yamlread.as_flag(data) is not None:
        data = yamlread.as_flag(data)  # http: on / off
    if data is None or data is False:
        return None
    if data is True:
        return HttpSettings()
    if isinstance(data, (int, str)):
        data = {"listen": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: http: must be [HOST:]PORT or a mapping (listen, read_token, allowed_hosts)",
                          detail="key http")  # fmt: skip
    r = _Reader(data, "http", source, base)
    r.check_keys(("listen", "read_token", "allowed_hosts", "refresh"))
    try:
        host, port = parse_listen(data.get("listen", DEFAULT_HTTP_PORT))
    except ValueError:
        raise r.error("listen", f"must be [HOST:]PORT, e.g. 127.0.0.1:{DEFAULT_HTTP_PORT}") from None
    hosts = data.get("allowed_hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise r.error("allowed_hosts", "must be a list of host names (as typed in the browser)")
    refresh = r.seconds("refresh", 1.0)
    if not 0.1 <= refresh <= 600:
        raise r.error("refresh", "must be between 0.1 and 600 seconds")
    return HttpSettings(host, port, r.flag("read_token", False), tuple(h.strip() for h in hosts), refresh)


def _email(r: _Reader) -> EmailSettings:
    r.check_keys(("host", "port", "to", "from", "user", "password_file", "ca_file", "starttls"))
    to = r.data.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to or not all(isinstance(t, str) and "@" in t for t in to):
        raise r.error("to", "must be one address or a list of addresses")
    user = r.data.get("user")
    if user is not None and (not isinstance(user, str) or not user.strip()):
        raise r.error("user", "must be the SMTP login name")
    starttls = r.flag("starttls", True)
    if user and not starttls:
        raise r.error("starttls", "must stay true when a password is sent (user: is set)")
    return EmailSettings(
        host=r.text("host"),
        to=tuple(t.strip() for t in to),
        sender=r.text("from", user if user and "@" in user else "vip-agent@localhost"),
        port=r.whole("port", 587),
        user=user.strip() if user else None,
        password_file=r.path("password_file"),
        ca_file=r.path("ca_file"),
        starttls=starttls,
    )


def _notify(r: _Reader) -> tuple[NotifyRule, ...]:
    raw = r.data.get("notify")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise r.error("notify", "must be a list of {on: [...], webhook: URL | command: [...] | email: {...}}")
    rules = []
    for i, item in enumerate(raw):
        where = f"{r.where}.notify[{i}]"
        if not isinstance(item, Mapping):
            raise r.error(f"notify[{i}]", "must be a mapping such as {on: [failed], webhook: URL}")
        n = _Reader(item, where, r.source, r.base)
        n.check_keys(("on", "webhook", "command", "email", "timeout"))
        on = item.get("on", ["failed", "incomplete", "paused", "disk_low"])
        if isinstance(on, str):
            on = [on]
        bad = [x for x in on if x not in NOTIFY_EVENTS] if isinstance(on, list) else [on]
        if bad or not on:
            raise n.error("on", f"must list events among {', '.join(NOTIFY_EVENTS)}, not {bad or on!r}")
        ways = [k for k in ("webhook", "command", "email") if item.get(k) is not None]
        if len(ways) != 1:
            raise n.error("webhook", "give exactly one of webhook: URL, command: [argv...], email: {...}")
        webhook = command = email = None
        if ways[0] == "webhook":
            webhook = n.text("webhook")
            if not re.match(r"^https?://[^/\s]+", webhook):
                raise n.error("webhook", "must be an http:// or https:// URL")
        elif ways[0] == "command":
            argv = item["command"]
            if isinstance(argv, str) or not isinstance(argv, list) or not argv or not all(
                isinstance(a, str) for a in argv
            ):
                raise n.error("command", "must be a list [program, arg, ...] (run without a shell)")
            command = tuple(argv)
        else:
            email = _email(_Reader(n.mapping("email"), f"{where}.email", r.source, r.base))
        timeout = n.seconds("timeout", 60.0)
        rules.append(NotifyRule(frozenset(on), webhook, command, email, timeout or 60.0))
    return tuple(rules)


def parse_poll(value: Any) -> tuple[float, float | None]:
    """``poll`` as (min, max) seconds: ``2``, ``'2:60'``, ``'2s:5m'``, or ``{min: 2, max: 60}``.

    Raises ValueError on anything else, on a minimum of 0, or on a maximum below the minimum.
    """
    if isinstance(value, Mapping):
        extra = set(value) - {"min", "max"}
        if extra or "min" not in value:
            raise ValueError(value)
        low, high = parse_duration(value["min"]), value.get("max")
        top = parse_duration(high) if high is not None else None
    elif isinstance(value, str) and ":" in value:
        a, _, b = value.partition(":")
        low, top = parse_duration(a), parse_duration(b)
    else:
        low, top = parse_duration(value), None
    if low <= 0 or (top is not None and top < low):
        raise ValueError(value)
    return low, top


def _poll(r: _Reader) -> dict[str, float | None]:
    if not r.has("poll"):
        return {}
    try:
        low, high = parse_poll(r.data["poll"])
    except ValueError:
        raise r.error(
            "poll", "must be the polling interval of a running execution: "
            f"{{min: 2, max: 60}} or '2:60' (seconds, min > 0, max >= min), not {r.data['poll']!r}",
        ) from None
    return {"poll_min": low, "poll_max": high}


def _server(r: _Reader, default: str | None) -> str:
    server = r.text("server", default)
    try:
        return normalise_server(server)  # one spelling: the journal and the keyring compare it
    except ConfigError as err:
        raise r.error("server", f"must be the portal URL, e.g. {DEFAULT_SERVER}: {err.message}") from None


def _drop(r: _Reader, settle: float | None) -> DropConfig:
    r.check_keys(_DROP_KEYS)
    path = r.path("path")
    if path is None:
        raise r.error("path", "is required (the drop folder to watch)")
    output = r.path("output")
    if output is None:
        raise r.error("output", "is required (the folder that receives the results)")
    rr = _Reader(r.mapping("readiness"), f"{r.where}.readiness", r.source, r.base)
    rr.check_keys(_READINESS_KEYS)
    readiness = Readiness(
        rule=rr.text("rule", "settle", RULES),
        settle_seconds=settle if settle is not None else rr.seconds("settle_seconds", DEFAULT_SETTLE),
        marker=rr.text("marker", DEFAULT_MARKER),
        stale_after=rr.seconds("stale_after", DEFAULT_STALE_AFTER),
    )
    if "/" in readiness.marker or "\\" in readiness.marker:
        raise rr.error("marker", "must be a file name, not a path")
    datasets = r.text("datasets", "folders", DATASET_KINDS)
    if readiness.rule == "manifest" and datasets != "folders":
        raise rr.error("rule", "'manifest' needs 'datasets: folders' (a job.yaml per dataset)")
    after = r.text("after", "keep", AFTER)
    archive_dir = r.path("archive_dir", path / "_archive" if after == "archive" else None)
    failed_dir = r.path("failed_dir", path / "_failed" if after != "keep" else None)
    poll = r.seconds("poll_interval", DEFAULT_POLL_INTERVAL)
    if poll <= 0:
        raise r.error("poll_interval", "must be more than 0 seconds")
    drop = DropConfig(
        path=path,
        server=_server(r, DEFAULT_SERVER),
        output=output,
        readiness=readiness,
        datasets=datasets,
        pattern=r.text("pattern", "*"),
        observer=r.text("observer", "auto", OBSERVERS),
        poll_interval=poll,
        rescan_interval=r.seconds("rescan_interval", DEFAULT_RESCAN_INTERVAL),
        limits=Limits(
            max_uploads=r.whole("max_uploads", 2),
            max_downloads=r.whole("max_downloads", 2),
            max_running=r.whole("max_running", 1),
            upload_ahead=r.whole("upload_ahead", 2, maximum=10_000),
            max_runs=r.whole("max_runs", MAX_RUNS),
            max_jobs=r.whole("max_jobs", MAX_JOBS),
            extract_max_ratio=r.whole("extract_max_ratio", int(MAX_RATIO)),
            extract_max_member_ratio=r.whole("extract_max_member_ratio", int(MAX_MEMBER_RATIO)),
        ),
        after=after,
        archive_dir=archive_dir,
        failed_dir=failed_dir,
        key_file=r.path("key_file"),
        keep_remote=r.flag("keep_remote", False),
        notify=_notify(r),
        disk_low=_size(r, "disk_low", DEFAULT_DISK_LOW),
        unknown_limit=r.seconds("unknown_limit", 0) or None,
        transfer_parallelism=(
            r.whole("transfer_parallelism", 1, maximum=64) if r.has("transfer_parallelism") else None
        ),
        bandwidth=parse_bandwidth(r.data.get("bandwidth"), r.error),
        max_transfers_per_server=r.whole("max_transfers_per_server", DEFAULT_MAX_TRANSFERS, maximum=64),
        **_poll(r),
    )
    if path in (output, archive_dir, failed_dir):
        raise r.error("output", "the output, archive and failed folders must differ from the drop folder")
    return drop


def _size(r: _Reader, key: str, default: int) -> int:
    try:
        return parse_size(r.data.get(key, default))
    except ValueError:
        raise r.error(key, f"must be a size (5000000000, '500MB', '5GB', '2GiB'), not {r.data.get(key)!r}") from None


def _check_drops(drops: list[DropConfig], source: str) -> None:
    for i, a in enumerate(drops):
        for j, b in enumerate(drops):
            if i < j and (a.path == b.path or a.path in b.path.parents or b.path in a.path.parents):
                raise ConfigError(
                    f"{source}: drops[{j}].path: {b.path} overlaps drops[{i}].path {a.path}; "
                    "a folder can belong to one drop folder only",
                    detail=f"key drops[{j}].path",
                )


def parse_config(data: Any, *, source: str = "agent.yaml", base: Path | None = None,
                 settle: float | None = None) -> AgentConfig:  # fmt: skip
    """Build an :class:`AgentConfig` from the loaded YAML document."""
    base = base or Path.cwd()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the file must be a mapping with a 'drops:' list", detail="top level")
    top = _Reader(data, "", source, base)
    top.check_keys(_TOP_KEYS)
    defaults = top.mapping("defaults")
    _Reader(defaults, "defaults", source, base).check_keys(
        tuple(k for k in _DROP_KEYS if k not in ("path",))
    )
    raw = data.get("drops")
    if not isinstance(raw, list) or not raw:
        raise top.error("drops", "must be a list of at least one drop folder (each with path, output)")
    drops = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise top.error(f"drops[{i}]", "must be a mapping (path:, server:, output: ...)")
        merged = {**defaults, **item}
        if "readiness" in defaults and "readiness" in item:
            merged["readiness"] = {**(defaults["readiness"] or {}), **(item["readiness"] or {})}
        drops.append(_drop(_Reader(merged, f"drops[{i}]", source, base), settle))
    _check_drops(drops, source)
    state = top.path("state", default_state_dir())
    assert state is not None
    return AgentConfig(
        drops=tuple(drops),
        state=state,
        log_format=top.text("log_format", "text", LOG_FORMATS),
        source=None,
        http=_http(data.get("http"), source, base),
        dicom=parse_dicom(data.get("dicom"), source=source, base=base, drops=[d.path for d in drops]),
    )


def load_config(path: str | Path, *, settle: float | None = None) -> AgentConfig:
    """Read ``agent.yaml``; relative paths in it are relative to the file's folder."""
    path = Path(path).expanduser()
    # the reader job files use too: bounded, duplicate keys refused, no YAML 1.1 guessing
    data = yamlread.load(path, "configuration file")
    config = parse_config(data, source=str(path), base=path.parent.resolve(), settle=settle)
    return replace(config, source=path.resolve())


def config_from_args(
    drop: str | Path | Sequence[str | Path],
    *,
    server: str | None = None,
    output: str | Path | None = None,
    state: str | Path | None = None,
    settle: float | None = None,
    rule: str | None = None,
    marker: str | None = None,
    observer: str | None = None,
    datasets: str | None = None,
    pattern: str | None = None,
    log_format: str = "text",
) -> AgentConfig:
    """The configuration of ``vip-agent watch DROP [DROP ...] --server --output ...`` (no file).

    Every drop folder gets the same settings; without ``output``, each its own
    ``<drop>/_results``.
    """
    drops = [drop] if isinstance(drop, (str, Path)) else list(drop)
    items: list[dict[str, Any]] = []
    for one in drops:
        item: dict[str, Any] = {"path": str(one), "server": server or DEFAULT_SERVER}
        item["output"] = str(output) if output is not None else str(Path(one) / "_results")
        readiness: dict[str, Any] = {}
        if rule:
            readiness["rule"] = rule
        if marker:
            readiness["marker"] = marker
        if readiness:
            item["readiness"] = readiness
        for key, value in (("observer", observer), ("datasets", datasets), ("pattern", pattern)):
            if value is not None:
                item[key] = value
        items.append(item)
    data: dict[str, Any] = {"drops": items, "log_format": log_format}
    if state is not None:
        data["state"] = str(state)
    return parse_config(data, source="command line", base=Path.cwd(), settle=settle)
