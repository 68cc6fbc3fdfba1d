"""Where the API key comes from, in which order, and what is said when it cannot be had.

The keyring is always a real backend class: an in-memory ``KeyringBackend``
subclass, keyrings.alt's ``PlaintextKeyring`` writing into tmp_path, or
keyring's own ``fail.Keyring`` (what a headless Linux without backends gets).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import pytest
from agenthelpers import MemoryKeyring
from keyrings.alt.file import PlaintextKeyring

from agent import credentials
from agent.credentials import (
    Credential,
    KeyringUnavailable,
    delete_api_key,
    find_api_key,
    normalise_server_url,
    scrub_env,
    store_api_key,
)
from agent.errors import CredentialError

SERVER = "https://vip.example.org"
KEY = "vipk-test-3f1c0b7e9a"


class HangingKeyring(MemoryKeyring):
    """A backend stuck like a locked Secret Service collection waiting for an unlock prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def get_password(self, service: str, username: str) -> str | None:
        self.release.wait(30)
        return None


@pytest.fixture
def use_backend() -> Iterator[list[keyring.backend.KeyringBackend]]:
    """Set a backend with ``use_backend.append(b)``; the previous one is restored after."""
    previous = keyring.get_keyring()
    chosen: list[keyring.backend.KeyringBackend] = []
    yield chosen
    keyring.set_keyring(previous)


@pytest.fixture
def memory_keyring(use_backend: list[keyring.backend.KeyringBackend]) -> MemoryKeyring:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    use_backend.append(backend)
    return backend


def _key_file(folder: Path, key: str, mode: int = 0o600) -> Path:
    path = folder / "api-key"
    path.write_text(key + "\n", encoding="utf-8")
    path.chmod(mode)
    return path


def _cred_dir(folder: Path, key: str) -> Path:
    d = folder / "creds"
    d.mkdir()
    (d / "vip-api-key").write_text(key, encoding="utf-8")
    (d / "vip-api-key").chmod(0o400)
    return d


# --------------------------------------------------------------------------- order


def test_systemd_credential_comes_first(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    store_api_key(SERVER, "from-keyring")
    env = {"CREDENTIALS_DIRECTORY": str(_cred_dir(tmp_path, "from-systemd")), "VIP_API_KEY": "from-env"}
    cred = find_api_key(SERVER, key_file=_key_file(tmp_path, "from-file"), env=env)
    assert cred.key == "from-systemd"
    assert cred.source == "systemd credential vip-api-key"


def test_key_file_beats_env_and_keyring(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    store_api_key(SERVER, "from-keyring")
    path = _key_file(tmp_path, "from-file")
    # a credentials directory without our credential is skipped, not an error
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "VIP_API_KEY": "from-env"}
    cred = find_api_key(SERVER, key_file=path, env=env)
    assert (cred.key, cred.source) == ("from-file", f"key file {path}")


def test_env_beats_keyring(memory_keyring: MemoryKeyring) -> None:
    store_api_key(SERVER, "from-keyring")
    cred = find_api_key(SERVER, env={"VIP_API_KEY": "  from-env \n"})
    assert (cred.key, cred.source) == ("from-env", "environment VIP_API_KEY")


def test_keyring_last_one_entry_per_normalised_server(memory_keyring: MemoryKeyring) -> None:
    store_api_key("HTTPS://VIP.Example.org:443/rest/", "key-a")
    store_api_key("http://127.0.0.1:8080/", "key-b")
    assert memory_keyring.entries == {
        ("vip-agent", "https://vip.example.org"): "key-a",
        ("vip-agent", "http://127.0.0.1:8080"): "key-b",
    }
    cred = find_api_key(SERVER, env={})
    assert (cred.key, cred.source) == ("key-a", "keyring vip-agent/https://vip.example.org")
    assert find_api_key("http://127.0.0.1:8080", env={}).key == "key-b"


def test_use_keyring_false_skips_it(memory_keyring: MemoryKeyring) -> None:
    store_api_key(SERVER, "from-keyring")
    with pytest.raises(CredentialError) as info:
        find_api_key(SERVER, env={}, use_keyring=False)
    assert "keyring: not used here" in info.value.message


def test_nothing_found_lists_every_source_and_what_to_do(memory_keyring: MemoryKeyring) -> None:
    with pytest.raises(CredentialError) as info:
        find_api_key(SERVER, env={})
    msg = info.value.message
    for tried in ("systemd credential vip-api-key", "key file", "environment VIP_API_KEY",
                  "keyring vip-agent/https://vip.example.org: no entry"):
        assert tried in msg
    assert "vip-agent login --server https://vip.example.org" in msg
    assert info.value.exit_code == 3


def test_plaintext_file_backend_store_find_delete(
    tmp_path: Path, use_backend: list[keyring.backend.KeyringBackend]
) -> None:
    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring" / "keyring_pass.cfg")
    keyring.set_keyring(backend)
    assert store_api_key(SERVER + "/", KEY) == "keyring vip-agent/https://vip.example.org"
    stored = Path(backend.file_path)
    assert stored.is_file() and (stored.stat().st_mode & 0o077) == 0
    # a fresh backend object reading the same file: it really went to disk
    again = PlaintextKeyring()
    again.file_path = str(stored)
    keyring.set_keyring(again)
    assert find_api_key(SERVER, env={}).key == KEY
    assert delete_api_key(SERVER) is True
    assert delete_api_key(SERVER) is False
    with pytest.raises(CredentialError):
        find_api_key(SERVER, env={})


# --------------------------------------------------------------------------- key file safety


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, KEY, mode)
    with pytest.raises(CredentialError) as info:
        find_api_key(SERVER, key_file=path, env={"VIP_API_KEY": "would-be-used"})
    assert f"chmod 600 {path}" in info.value.message
    assert KEY not in info.value.full()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="only root can give a file to another owner")
def test_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path, KEY)
    os.chown(path, 65534, -1)
    with pytest.raises(CredentialError) as info:
        find_api_key(SERVER, key_file=path, env={})
    assert "belongs to uid 65534" in info.value.message


def test_key_file_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="does not exist"):
        find_api_key(SERVER, key_file=tmp_path / "nope", env={})
    with pytest.raises(CredentialError, match="is empty"):
        find_api_key(SERVER, key_file=_key_file(tmp_path, "  "), env={})


def test_key_file_with_several_lines_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("one\ntwo\n")
    path.chmod(0o600)
    with pytest.raises(CredentialError, match="more than one line"):
        find_api_key(SERVER, key_file=path, env={})


# --------------------------------------------------------------------------- headless keyring


def test_no_backend_says_what_to_do_instead(use_backend: list[keyring.backend.KeyringBackend]) -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())
    with pytest.raises(CredentialError) as info:
        find_api_key(SERVER, env={})
    msg = info.value.message
    for hint in ("systemd-creds encrypt", "LoadCredentialEncrypted=", "LoadCredential=",
                 "chmod 600", "pip install keyrings.alt", "Secret Service"):
        assert hint in msg, hint
    with pytest.raises(KeyringUnavailable) as stored:
        store_api_key(SERVER, KEY)
    assert "systemd-creds encrypt" in stored.value.message
    assert KEY not in stored.value.full()
    with pytest.raises(KeyringUnavailable):
        delete_api_key(SERVER)


def test_no_backend_does_not_hide_other_sources(use_backend: list[keyring.backend.KeyringBackend]) -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())
    assert find_api_key(SERVER, env={"VIP_API_KEY": "x"}).source == "environment VIP_API_KEY"


def test_hanging_keyring_times_out(use_backend: list[keyring.backend.KeyringBackend]) -> None:
    backend = HangingKeyring()
    keyring.set_keyring(backend)
    try:
        start = time.monotonic()
        with pytest.raises(CredentialError) as info:
            find_api_key(SERVER, env={}, keyring_timeout=0.3)
        elapsed = time.monotonic() - start
    finally:
        backend.release.set()
    assert elapsed < 5
    assert "did not answer within 0.3 s" in info.value.message
    assert "systemd-creds" in info.value.message


# --------------------------------------------------------------------------- never shown


def test_credential_repr_hides_the_key() -> None:
    cred = Credential(KEY, "environment VIP_API_KEY")
    for text in (repr(cred), str(cred), f"{cred}", repr([cred]), repr({"c": cred})):
        assert KEY not in text
        assert "environment VIP_API_KEY" in text


def test_scrub_env_removes_keys_and_friends() -> None:
    env = {
        "PATH": "/usr/bin",
        "HOME": "/home/lab",
        "VIP_API_KEY": KEY,
        "CREDENTIALS_DIRECTORY": "/run/credentials/vip-agent.service",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "60000000",
        "GITHUB_TOKEN": "t",
        "some_api_key": "k",
        "DB_PASSWORD": "p",
        "INNOCENT_NAME": KEY,  # the key under another name still goes
    }
    child = scrub_env(env, secrets=[KEY])
    assert child == {"PATH": "/usr/bin", "HOME": "/home/lab"}
    assert env["VIP_API_KEY"] == KEY  # the input is not modified


def test_scrub_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIP_API_KEY", KEY)
    monkeypatch.setenv("VIP_AGENT_TEST_PLAIN", "stay")
    child = scrub_env()
    assert "VIP_API_KEY" not in child
    assert child["VIP_AGENT_TEST_PLAIN"] == "stay"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://vip.creatis.insa-lyon.fr", "https://vip.creatis.insa-lyon.fr"),
        ("https://VIP.creatis.insa-lyon.fr/", "https://vip.creatis.insa-lyon.fr"),
        ("https://vip.creatis.insa-lyon.fr:443/rest/", "https://vip.creatis.insa-lyon.fr"),
        ("vip.creatis.insa-lyon.fr", "https://vip.creatis.insa-lyon.fr"),
        ("http://127.0.0.1:43127", "http://127.0.0.1:43127"),
        ("http://localhost:80/vip/", "http://localhost/vip"),
    ],
)
def test_normalise_server_url(url: str, expected: str) -> None:
    assert normalise_server_url(url) == expected


def test_keyring_timeout_constant_is_documented() -> None:
    # the guard exists and is bounded: an unattended agent must not hang on a prompt
    assert 0 < credentials.KEYRING_TIMEOUT <= 30
    assert "KEYRING_TIMEOUT" in (credentials.__doc__ or "")
