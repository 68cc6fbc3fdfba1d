"""One backend per server for a process that drives datasets (``watch``, ``cancel``).

The key is looked up again on demand (it may be fixed while the agent runs); a missing key
is an :class:`~agent.vip.errors.AuthError`, so the scheduler pauses instead of failing.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from agent.backend import open_backend
from agent.backend.errors import AuthError
from agent.credentials import find_api_key
from agent.errors import CredentialError
from agent.logs import RedactFilter

log = logging.getLogger("vip_agent.watch")

__all__ = ["ClientProvider", "MissingKey"]


class MissingKey(AuthError):
    """No API key anywhere (a refused key is a plain AuthError)."""


class ClientProvider:
    """``client_for(server)`` for the runner: one backend (``agent.backend.open_backend``) per
    server, key re-read on demand.

    The key is looked up with ``agent.credentials.find_api_key`` (systemd
    credential, key file, ``VIP_API_KEY``, keyring); only its source is logged.
    A missing key raises :class:`~agent.vip.errors.AuthError` so that the
    scheduler pauses instead of failing datasets.
    """

    def __init__(
        self,
        key_files: dict[str, Path | None],
        *,
        redact: RedactFilter | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.key_files = dict(key_files)
        self.redact = redact
        self.client_options = client_options or {}
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, Any]] = {}
        self._sources: dict[str, str] = {}

    def _load(self, server: str) -> Any:
        try:
            cred = find_api_key(server, key_file=self.key_files.get(server))
        except CredentialError as err:
            # an AuthError, so that a key lost at run time pauses instead of failing datasets
            raise MissingKey(err.message, err.detail) from None
        if self.redact is not None:
            self.redact.add(cred.key)
        current = self._clients.get(server)
        if current is not None and current[0] == cred.key:
            return current[1]
        if self._sources.get(server) != cred.source or current is not None:
            log.info("API key for %s: from %s", server, cred.source)
        self._sources[server] = cred.source
        client = open_backend(server, cred.key, **self.client_options)
        self._clients[server] = (cred.key, client)
        return client

    def __call__(self, server: str) -> Any:
        with self._lock:
            current = self._clients.get(server)
            if current is not None:
                return current[1]
            return self._load(server)

    def refresh(self, server: str) -> Any:
        """Look the key up again (it may have been fixed) and return the client."""
        with self._lock:
            return self._load(server)

    def probe(self, server: str) -> None:
        """Raise AuthError unless the server accepts the (re-read) key."""
        self.refresh(server).check_key()

    def forget(self) -> None:
        with self._lock:
            self._clients.clear()
