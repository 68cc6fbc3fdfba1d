"""The composition root: where every command learns which agent.yaml, state folder, server
and key file it works with.

One order everywhere: **agent.yaml, then the environment, then the command's flags**.

* agent.yaml: ``--config PATH`` when given (it must exist), else the per-user file
  (:func:`agent.paths.default_config_path`) when there is one, else none;
* environment: ``VIP_AGENT_SERVER`` (a server) and ``VIP_AGENT_STATE`` (a state folder);
* flags: ``--server``, ``--state``.

The server of a command that talks to VIP (``run``, ``pipelines``, ``doctor``) is, first
match wins: ``--server``; ``VIP_AGENT_SERVER``; the drop folder of agent.yaml that holds
the dataset (``run``); the one server agent.yaml names; the public VIP. Its key file is
the ``key_file:`` of a drop folder on that server. Every server goes through
:func:`agent.vip.urls.normalise_server`. A dataset already in the journal keeps the server
it was started on (:func:`dataset_server`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig, DropConfig, load_config
from agent.errors import ConfigError
from agent.paths import DEFAULT_SERVER, default_config_path, default_state_dir
from agent.vip.urls import normalise_server

#: environment variables a user may set instead of flags
ENV_SERVER = "VIP_AGENT_SERVER"
ENV_STATE = "VIP_AGENT_STATE"


@dataclass(frozen=True)
class Settings:
    """What one command works with, resolved once."""

    #: the agent.yaml read (None: no file, built-in defaults)
    config: AgentConfig | None
    config_path: Path | None
    state: Path
    #: the canonical portal URL
    server: str
    #: where the server came from, for messages ("--server", "agent.yaml", ...)
    server_from: str
    key_file: Path | None = None
    #: the drop folder of agent.yaml holding the dataset a ``run`` is about (None: none)
    drop: DropConfig | None = None
    #: why ``server`` is only a guess (agent.yaml names several and no flag chose), or None
    ambiguity: str | None = None

    def require_server(self) -> str:
        """The server, or a ConfigError when agent.yaml names several and nothing chose one."""
        if self.ambiguity:
            raise ConfigError(self.ambiguity)
        return self.server

    def key_file_for(self, server: str) -> Path | None:
        """The ``key_file:`` agent.yaml gives for ``server`` (None if none)."""
        return key_file_for(self.config, server)


def find_config(explicit: Path | str | None) -> Path | None:
    """``explicit`` (which must exist), else the per-user agent.yaml if there is one."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{path}: no such configuration file"
                + (" (it is a folder)" if path.is_dir() else ""),
            )
        return path
    default = default_config_path()
    return default if default.is_file() else None


def load(config: Path | str | None = None) -> tuple[AgentConfig | None, Path | None]:
    """The agent.yaml of :func:`find_config`, loaded (ConfigError when it is not valid)."""
    path = find_config(config)
    return (load_config(path), path) if path is not None else (None, None)


def state_dir(state: Path | str | None = None, config: Path | str | None = None, *,
              env: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """The state folder: ``--state``, else ``VIP_AGENT_STATE``, else agent.yaml's ``state``
    (:func:`find_config`), else the per-user default."""
    environ = os.environ if env is None else env
    if state:
        return Path(state).expanduser().resolve()
    if environ.get(ENV_STATE):
        return Path(environ[ENV_STATE]).expanduser().resolve()
    loaded, _path = load(config)
    return loaded.state if loaded is not None else default_state_dir()


def key_file_for(config: AgentConfig | None, server: str) -> Path | None:
    """The first ``key_file:`` of a drop folder on ``server`` in ``config``."""
    if config is None:
        return None
    return next((d.key_file for d in config.drops if d.server == server and d.key_file), None)


def drop_of(config: AgentConfig | None, dataset: Path | None) -> DropConfig | None:
    """The drop folder of ``config`` that holds ``dataset`` (None: none does)."""
    if config is None or dataset is None:
        return None
    target = Path(dataset).resolve()
    return next((d for d in config.drops if d.path == target.parent or d.path in target.parents),
                None)  # fmt: skip


def _configured_server(config: AgentConfig, dataset: Path | None) -> tuple[str, str | None]:
    """The server agent.yaml gives (the dataset's drop folder's, or its only one), and why
    it is only a guess when the file names several."""
    drop = drop_of(config, dataset)
    if drop is not None:
        return drop.server, None
    servers = list(dict.fromkeys(d.server for d in config.drops))
    if len(servers) > 1:
        where = f" {config.source}" if config.source else ""
        return servers[0], (f"agent.yaml{where} names several servers ({', '.join(servers)}); "
                            "say which one with --server")  # fmt: skip
    return servers[0], None


def resolve(
    *,
    config: Path | str | None = None,
    server: str | None = None,
    state: Path | str | None = None,
    dataset: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve agent.yaml, then the environment, then the flags (``server``, ``state``).

    ``dataset``: the dataset a ``run`` is about; a drop folder of agent.yaml holding it
    gives its server. Raises ConfigError for an invalid agent.yaml or server URL, before
    anything is sent anywhere; when agent.yaml names several servers and nothing chose one,
    :meth:`Settings.require_server` raises (a dataset in the journal needs none: it keeps
    its own).
    """
    environ = os.environ if env is None else env
    loaded, path = load(config)
    ambiguity = None
    if server:
        chosen, origin = normalise_server(server), "--server"
    elif environ.get(ENV_SERVER):
        chosen, origin = normalise_server(environ[ENV_SERVER]), ENV_SERVER
    elif loaded is not None and loaded.drops:
        (chosen, ambiguity), origin = _configured_server(loaded, dataset), str(path)
    else:
        chosen, origin = normalise_server(DEFAULT_SERVER), "default"
    if state:
        folder = Path(state).expanduser().resolve()
    elif environ.get(ENV_STATE):
        folder = Path(environ[ENV_STATE]).expanduser().resolve()
    else:
        folder = loaded.state if loaded is not None else default_state_dir()
    return Settings(
        config=loaded, config_path=path, state=folder, server=chosen, server_from=origin,
        key_file=key_file_for(loaded, chosen), drop=drop_of(loaded, dataset), ambiguity=ambiguity,
    )


def dataset_server(recorded: str) -> str:
    """The server a dataset was started on, as the journal recorded it (canonical when the
    record is; a record older than the normalisation is used as written)."""
    try:
        return normalise_server(recorded)
    except ConfigError:
        return recorded
