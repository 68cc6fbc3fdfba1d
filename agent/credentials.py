"""Find the VIP API key without ever showing it.

Sources, first match wins:

1. the systemd credential ``$CREDENTIALS_DIRECTORY/vip-api-key``
   (``LoadCredential=`` / ``LoadCredentialEncrypted=`` in the unit);
2. a key file named in the configuration, accepted only when it belongs to the
   current user and gives no access to group or others (like ``~/.ssh``);
3. the ``VIP_API_KEY`` environment variable;
4. the OS keyring: service ``vip-agent``, username = the normalised server URL,
   one entry per server (``vip-agent login`` stores it there).

Keyring calls run in a daemon thread with a deadline (:data:`KEYRING_TIMEOUT`):
a Secret Service collection that is locked can sit on an unlock prompt that no
one will answer on a headless machine, and an unattended agent must fail with
a message instead of hanging. The thread is abandoned (not killed) when the
deadline passes; it dies with the process.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent.errors import CredentialError, scrub
from agent.paths import DEFAULT_SERVER
from agent.vip.urls import normalise_server

__all__ = [
    "DEFAULT_SERVER",
    "Credential",
    "KeyringUnavailable",
    "delete_api_key",
    "find_api_key",
    "keyring_backend_name",
    "keyring_problem",
    "normalise_server_url",
    "read_keyring",
    "redact",
    "scrub_env",
    "store_api_key",
]
#: name of the systemd credential (``LoadCredential=vip-api-key:...``)
SYSTEMD_CREDENTIAL = "vip-api-key"
#: the environment variable holding a key
ENV_VAR = "VIP_API_KEY"
#: keyring service name; the username is the normalised server URL
KEYRING_SERVICE = "vip-agent"
#: seconds a keyring call may take before we give up (locked collection, dead D-Bus)
KEYRING_TIMEOUT = 10.0

#: environment variables a child process never inherits (exact names)
SECRET_ENV_VARS = frozenset(
    {
        ENV_VAR,
        "VIP_APIKEY",
        "VIP_KEY",
        # the directory holding our systemd credentials: a child has no business there
        "CREDENTIALS_DIRECTORY",
        # children must not speak for the service to systemd
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    }
)
#: names that look like secrets, whoever set them
_SECRET_NAME = re.compile(r"API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

_T = TypeVar("_T")

_HEADLESS_HELP = (
    "No usable OS keyring here (typical of a server without a desktop session). Give the key "
    "another way:\n"
    "  - as a systemd credential (best for the service): store it with\n"
    "      sudo install -m 0600 -o root /dev/stdin /etc/vip-agent/api-key\n"
    "    and keep LoadCredential=vip-api-key:/etc/vip-agent/api-key in the unit, or encrypt it with\n"
    "      sudo systemd-creds encrypt --name=vip-api-key - /etc/vip-agent/api-key.cred\n"
    "    and use LoadCredentialEncrypted=vip-api-key:/etc/vip-agent/api-key.cred;\n"
    "  - as a key file readable only by you (chmod 600) named by key_file: in agent.yaml;\n"
    "  - or install a keyring backend: `pip install keyrings.alt` (a file backend) or run a "
    "Secret Service (gnome-keyring, KeePassXC) in your session."
)


class KeyringUnavailable(CredentialError):
    """The OS keyring has no usable backend, is locked, or does not answer."""


@dataclass(frozen=True)
class Credential:
    """An API key and where it came from. Its repr never shows the key."""

    key: str = field(repr=False)
    source: str

    def __repr__(self) -> str:
        return f"Credential(source={self.source!r})"

    __str__ = __repr__


def normalise_server_url(url: str) -> str:
    """The server URL as a keyring username: :func:`agent.vip.urls.normalise_server` (one
    canonical portal URL; a string that is no server URL is a ConfigError)."""
    return normalise_server(url)


def redact(text: str, *secrets: str) -> str:
    """``text`` with each secret replaced (defence in depth for messages built from
    third-party exception text); :func:`agent.errors.scrub`'s rule for short secrets."""
    for secret in secrets:
        text = scrub(text, secret)
    return text


#: secret variables taken out of ``os.environ`` by :func:`seal_secrets` (read via :func:`environ`)
_SEALED: dict[str, str] = {}


def _is_secret_name(name: str) -> bool:
    return name in (ENV_VAR, "VIP_APIKEY", "VIP_KEY") or bool(_SECRET_NAME.search(name))


def seal_secrets() -> None:
    """Move every secret variable (the API key, passwords, tokens) out of ``os.environ``.

    Called first thing by the CLI: from then on no child process of any kind (a library
    lookup that runs ``ldconfig``/``gcc``, a keyring helper, a notification command)
    can inherit the key, whoever starts it. The agent reads them with :func:`environ`.
    """
    for name in [n for n in os.environ if _is_secret_name(n)]:
        _SEALED[name] = os.environ.pop(name)


def environ() -> dict[str, str]:
    """``os.environ`` with the secret variables :func:`seal_secrets` took out of it."""
    return {**_SEALED, **os.environ}


def scrub_env(env: Mapping[str, str] | None = None, *, secrets: Iterable[str] = ()) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) fit for a child process: no
    API key variables, no systemd credential or notify variables, nothing named
    like a secret, and no variable whose value is one of ``secrets``."""
    source = os.environ if env is None else env
    values = {s for s in secrets if s}
    return {
        name: value
        for name, value in source.items()
        if name not in SECRET_ENV_VARS and not _SECRET_NAME.search(name) and value not in values
    }


# --------------------------------------------------------------------------- keyring


def _call_with_timeout(fn: Callable[[], _T], what: str, timeout: float | None) -> _T:
    """Run ``fn`` in a daemon thread; raise :class:`KeyringUnavailable` after ``timeout``."""
    limit = KEYRING_TIMEOUT if timeout is None else timeout
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="vip-agent-keyring", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise KeyringUnavailable(
            f"the OS keyring did not answer within {limit:g} s while {what}; it may be locked "
            "and waiting for an unlock prompt no one can see.\n" + _HEADLESS_HELP,
            detail="keyring call abandoned after timeout",
        )
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def keyring_backend_name() -> str:
    """Display name of the active keyring backend (``module.Class``)."""
    import keyring

    backend = keyring.get_keyring()
    return f"{type(backend).__module__}.{type(backend).__name__}"


def keyring_problem() -> str | None:
    """Why the keyring cannot be used, or None when a real backend is active."""
    try:
        import keyring
        import keyring.backends.fail
    except ImportError as exc:  # pragma: no cover - keyring is a dependency
        return f"the keyring package cannot be imported ({exc})"
    backend = keyring.get_keyring()
    if isinstance(backend, keyring.backends.fail.Keyring):
        return "no keyring backend is available (keyring.backends.fail.Keyring)"
    inner = getattr(backend, "backends", None)  # ChainerBackend with nothing to chain
    if inner is not None and not list(inner):
        return "the keyring chainer has no backend to use"
    return None


def _require_keyring(timeout: float | None = None) -> None:
    # choosing a backend may already talk to D-Bus: guarded like every other call
    problem = _call_with_timeout(keyring_problem, "looking for a keyring backend", timeout)
    if problem is not None:
        raise KeyringUnavailable(_HEADLESS_HELP, detail=problem)


def _keyring_failure(exc: BaseException, what: str, *secrets: str) -> KeyringUnavailable:
    import keyring.errors

    detail = redact(f"{type(exc).__name__}: {exc}", *secrets)
    if isinstance(exc, keyring.errors.NoKeyringError):
        return KeyringUnavailable(_HEADLESS_HELP, detail=detail)
    if isinstance(exc, keyring.errors.KeyringLocked):
        return KeyringUnavailable(
            f"the OS keyring is locked while {what}; unlock it in your desktop session, or "
            "give the key another way.\n" + _HEADLESS_HELP,
            detail=detail,
        )
    return KeyringUnavailable(f"the OS keyring failed while {what}.\n" + _HEADLESS_HELP, detail=detail)


def read_secret(service: str, user: str, *, timeout: float | None = None) -> str | None:
    """The keyring entry ``service``/``user``, or None. Raises :class:`KeyringUnavailable`."""
    import keyring
    import keyring.errors

    _require_keyring(timeout)
    try:
        value = _call_with_timeout(
            lambda: keyring.get_password(service, user), "reading the key", timeout
        )
    except KeyringUnavailable:
        raise
    except Exception as exc:  # any backend failure (D-Bus, files) means: unavailable
        raise _keyring_failure(exc, "reading the key") from None
    return value.strip() if value and value.strip() else None


def read_keyring(server_url: str, *, timeout: float | None = None) -> str | None:
    """The key stored for ``server_url``, or None. Raises :class:`KeyringUnavailable`."""
    return read_secret(KEYRING_SERVICE, normalise_server_url(server_url), timeout=timeout)


def store_api_key(server_url: str, key: str, *, timeout: float | None = None) -> str:
    """Store ``key`` for ``server_url`` in the OS keyring; return the entry's
    description (``keyring vip-agent/<url>``)."""
    import keyring
    import keyring.errors

    key = key.strip()
    if not key:
        raise CredentialError("refusing to store an empty API key")
    _require_keyring(timeout)
    user = normalise_server_url(server_url)
    try:
        _call_with_timeout(
            lambda: keyring.set_password(KEYRING_SERVICE, user, key), "storing the key", timeout
        )
    except KeyringUnavailable:
        raise
    except Exception as exc:  # any backend failure (D-Bus, files) means: unavailable
        raise _keyring_failure(exc, "storing the key", key) from None
    return f"keyring {KEYRING_SERVICE}/{user}"


def delete_api_key(server_url: str, *, timeout: float | None = None) -> bool:
    """Remove the key stored for ``server_url``; False when there was none."""
    import keyring
    import keyring.errors

    _require_keyring(timeout)
    user = normalise_server_url(server_url)

    def delete() -> bool:
        if keyring.get_password(KEYRING_SERVICE, user) is None:
            return False
        try:
            keyring.delete_password(KEYRING_SERVICE, user)
        except keyring.errors.PasswordDeleteError:
            return False
        return True

    try:
        return _call_with_timeout(delete, "removing the key", timeout)
    except KeyringUnavailable:
        raise
    except Exception as exc:  # any backend failure (D-Bus, files) means: unavailable
        raise _keyring_failure(exc, "removing the key") from None


# --------------------------------------------------------------------------- files


def _read_secret_file(path: Path, *, check_owner: bool) -> str:
    """Read a key file; with ``check_owner`` refuse one others can read or we do not own."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CredentialError(
            f"the key file {path} does not exist; create it (chmod 600) or remove key_file from the configuration",
            detail=str(path),
        ) from None
    except PermissionError:
        raise CredentialError(
            f"cannot read the key file {path}: permission denied for this user", detail=str(path)
        ) from None
    try:
        # fstat on the open descriptor: what we check is what we read
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"the key file {path} is not a regular file", detail=str(path))
        if check_owner and hasattr(os, "geteuid"):
            if st.st_mode & 0o077:
                raise CredentialError(
                    f"refusing the key file {path}: group or others can access it "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`",
                    detail=f"mode {stat.S_IMODE(st.st_mode):04o}",
                )
            if st.st_uid != os.geteuid():
                raise CredentialError(
                    f"refusing the key file {path}: it belongs to uid {st.st_uid}, not to the user "
                    f"running vip-agent (uid {os.geteuid()}); `chown` it to that user",
                    detail=f"owner uid {st.st_uid}",
                )
        with os.fdopen(fd, "r", encoding="utf-8", errors="strict") as handle:
            fd = -1
            text = handle.read(64 * 1024)
    except UnicodeDecodeError:
        raise CredentialError(f"the key file {path} is not text", detail=str(path)) from None
    finally:
        if fd >= 0:
            os.close(fd)
    key = text.strip()
    if not key:
        raise CredentialError(f"the key file {path} is empty", detail=str(path))
    if "\n" in key:
        raise CredentialError(
            f"the key file {path} holds more than one line; it must hold the API key alone",
            detail=str(path),
        )
    return key


# --------------------------------------------------------------------------- lookup


class SecretNotFound(CredentialError):
    """No source held the secret; ``tried`` says what each source answered."""

    def __init__(self, tried: list[str], keyring_trouble: KeyringUnavailable | None) -> None:
        super().__init__("not found: " + "; ".join(tried), detail="; ".join(tried))
        self.tried = tried
        self.keyring_trouble = keyring_trouble


def find_secret(
    *,
    credential: str,
    env_var: str,
    keyring_service: str,
    keyring_user: str,
    key_file: Path | None = None,
    file_key: str = "key_file",
    env: Mapping[str, str] | None = None,
    use_keyring: bool = True,
    keyring_timeout: float | None = None,
) -> Credential:
    """A secret from the first source that has it, in the order every secret of the agent uses.

    The systemd credential ``credential``, then ``key_file`` (named in the configuration
    as ``file_key``; 0600 and owned by the user), then ``env_var``, then the keyring
    entry ``keyring_service``/``keyring_user``. Raises :class:`SecretNotFound`.
    A file that is named but unsafe or unreadable is an error, not a skip: the
    operator asked for it.
    """
    source = environ() if env is None else env
    tried: list[str] = []

    cred_dir = source.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / credential
        if path.exists():
            # systemd owns this file and its mode; no ownership check
            return Credential(_read_secret_file(path, check_owner=False), f"systemd credential {credential}")
        tried.append(f"systemd credential {credential}: not in {cred_dir}")
    else:
        tried.append(f"systemd credential {credential}: not running with credentials")

    if key_file is not None:
        path = Path(key_file).expanduser()
        return Credential(_read_secret_file(path, check_owner=True), f"key file {path}")
    tried.append(f"key file: none named in the configuration ({file_key}:)")

    value = source.get(env_var, "").strip()
    if value:
        return Credential(value, f"environment {env_var}")
    tried.append(f"environment {env_var}: not set")

    keyring_trouble: KeyringUnavailable | None = None
    if use_keyring:
        entry = f"keyring {keyring_service}/{keyring_user}"
        try:
            stored = read_secret(keyring_service, keyring_user, timeout=keyring_timeout)
        except KeyringUnavailable as exc:
            keyring_trouble = exc
            tried.append(f"{entry}: {exc.detail or 'unavailable'}")
        else:
            if stored:
                return Credential(stored, entry)
            tried.append(f"{entry}: no entry")
    else:
        tried.append("keyring: not used here")
    raise SecretNotFound(tried, keyring_trouble)


def find_api_key(
    server_url: str,
    *,
    key_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    use_keyring: bool = True,
    keyring_timeout: float | None = None,
) -> Credential:
    """The API key for ``server_url`` from the first source that has one (:func:`find_secret`).

    Raises :class:`~agent.errors.CredentialError` listing every source tried.
    """
    server = normalise_server_url(server_url)
    try:
        return find_secret(
            credential=SYSTEMD_CREDENTIAL, env_var=ENV_VAR, keyring_service=KEYRING_SERVICE,
            keyring_user=server, key_file=key_file, env=env, use_keyring=use_keyring,
            keyring_timeout=keyring_timeout,
        )  # fmt: skip
    except SecretNotFound as missing:
        listing = "".join(f"\n  - {t}" for t in missing.tried)
        if missing.keyring_trouble is not None:
            todo = missing.keyring_trouble.message
        else:
            todo = (
                f"Run `vip-agent login --server {server}` to store a key in the OS keyring, "
                f"or set {ENV_VAR}, or name a key file (chmod 600) with key_file: in agent.yaml."
            )
        raise CredentialError(
            f"no API key found for {server}. Tried:{listing}\n{todo}", detail=missing.detail
        ) from None


def verify_key(server: str, key: str, *, timeout: float = 20) -> None:
    """One authenticated request; raises ``AuthError`` when VIP refuses the key,
    another ``VipError`` when the server cannot tell (outage, network)."""
    from agent.backend import open_backend

    client = open_backend(server, key, timeout=timeout, retries=1, backoff=0.5)
    try:
        client.check_key()
    finally:
        client.close()
