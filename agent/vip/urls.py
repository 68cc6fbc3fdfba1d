"""One spelling of a VIP server: the portal URL every command, the journal and the keyring use.

Users write a server many ways (``vip.example.org``, ``vip.example.org:8443``,
``https://vip.example.org/``, ``https://vip.example.org/rest/``, the REST root copied from
the docs). :func:`normalise_server` turns each into one canonical portal URL, without
``/rest`` (the client appends it), so that ``--server https://host/rest/`` never asks for
``/rest/rest/...`` and the key stored for ``host`` is found for ``https://host/``.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit, urlunsplit

from agent.errors import ConfigError

#: an example for messages
EXAMPLE = "https://vip.creatis.insa-lyon.fr"
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")  # "_": container names have them
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _refuse(url: str, why: str) -> ConfigError:
    return ConfigError(
        f"{url!r} is not a VIP server URL: {why}. Give the portal's address, e.g. {EXAMPLE} "
        "(the agent adds /rest itself)",
        detail="server URL",
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalise_server(url: str) -> str:
    """The canonical portal URL of ``url``: ``scheme://host[:port][/path]``, lower-case scheme
    and host, no default port, no trailing ``/``, no ``/rest`` suffix.

    Without a scheme, ``https://`` is assumed (``http://`` for ``localhost`` and loopback
    addresses, where the local server listens). A bare word without a scheme, a dot or a port
    (``notaurl``) is refused, as are other schemes, credentials, queries and fragments: they
    are typing mistakes, not servers. Raises :class:`~agent.errors.ConfigError`.
    """
    if not isinstance(url, str):
        raise _refuse(str(url), "it is not text")
    raw = url.strip()
    if not raw:
        raise _refuse(url, "it is empty")
    if any(c.isspace() for c in raw):
        raise _refuse(url, "it contains spaces")
    explicit = "://" in raw
    try:
        parts = urlsplit(raw if explicit else "//" + raw)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError as err:  # a port that is not a number, a broken [IPv6] literal
        why = "its port is not a number from 1 to 65535" if "ort" in str(err) else str(err)
        raise _refuse(url, why) from None
    scheme = parts.scheme.lower() if explicit else ("http" if _is_loopback(host) else "https")
    if scheme not in ("http", "https"):
        raise _refuse(url, f"it starts with {parts.scheme}://, not http:// or https://")
    if not host:
        raise _refuse(url, "it names no host")
    if parts.username is not None or parts.password is not None:
        raise _refuse(url, "it holds a user name or password (the API key is given separately)")
    if parts.query or parts.fragment:
        raise _refuse(url, "it has a '?' or '#' part")
    if not _is_ip(host):
        labels = host.rstrip(".").split(".")
        if not all(_LABEL.match(label) for label in labels):
            raise _refuse(url, f"{host!r} is not a host name")
        if not explicit and len(labels) == 1 and port is None and host not in _LOOPBACK_NAMES:
            raise _refuse(url, "a server is a host name with a dot (or a port), or an http(s):// "
                               f"URL; write http://{host} if it really is a machine on your network")  # fmt: skip
        host = host.rstrip(".")
    shown = f"[{host}]" if ":" in host else host
    default_port = {"http": 80, "https": 443}[scheme]
    netloc = shown if port is None or port == default_port else f"{shown}:{port}"
    path = re.sub("/{2,}", "/", parts.path).rstrip("/")
    if path.endswith("/rest"):
        path = path[: -len("/rest")]
    return urlunsplit((scheme, netloc, path, "", ""))
