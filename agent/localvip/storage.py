"""User storage: the ``/vip`` namespace mapped onto a real folder tree.

``/vip/Home`` of a user is ``<root>/<user folder>``; ``/vip/Trash`` is
``<root>/.localvip/trash/<user folder>``. A group folder ``/vip/<NAME> (group)`` is
``<root>/.localvip/groups/<NAME>``, readable and writable by its members only (VIP's
``LFCPermissionBusiness``); its top cannot be written or deleted. Everything else under
``/vip`` (other groups, ``/vip/Users``...) is forbidden (8013).

Deletes are asynchronous like VIP's: with a visibility delay the entry stays
visible to ``exists``/``list`` until a timer removes it; with no delay the delete
happens before the 204 so tests stay deterministic.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import posixpath
import shutil
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.localvip.codes import ApiFailure, coded

log = logging.getLogger("agent.localvip")


def forbidden(path: str) -> ApiFailure:
    return coded(8013, path)


def clean_filename(name: str) -> str:
    """VIP's ``getCleanFilename``: spaces to ``_``, accents decomposed, non-ASCII dropped."""
    name = name.replace(" ", "_")
    decomposed = unicodedata.normalize("NFKD", name)
    return decomposed.encode("ascii", "ignore").decode("ascii")


def normalize(path: str) -> str:
    """Normalise a request path: ``..`` resolved, trailing slashes dropped.

    VIP does not strip a trailing slash, but the official client's ``create_dir``
    sends one (``PUT /rest/path/vip/Home/x/``), so we accept it everywhere.
    """
    if not path.startswith("/"):
        path = "/" + path
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


@dataclass(frozen=True)
class Resolved:
    """A ``/vip`` path resolved for one user."""

    vip_path: str
    #: None for ``/vip`` itself
    local: Path | None
    #: True for ``/vip``, ``/vip/Home``, ``/vip/Trash``, ``/vip/<NAME> (group)`` (read-only roots)
    is_root: bool
    #: the requesting user's folder (``/vip`` lists that user's groups)
    folder: str = ""


def properties_missing(path: str) -> dict[str, Any]:
    return {
        "path": path,
        "lastModificationDate": None,
        "isDirectory": None,
        "exists": False,
        "size": None,
        "executionId": None,
        "mimeType": None,
    }


def _mime(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


class Storage:
    """Maps ``/vip`` paths to folders and performs file operations."""

    def __init__(self, root: Path, private: Path) -> None:
        self.root = root
        self.private = private
        self.trash_root = private / "trash"
        self.tmp = private / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._pending: dict[Path, threading.Timer] = {}
        self._pending_lock = threading.Lock()
        #: group name -> folders of its members
        self.groups: dict[str, frozenset[str]] = {}

    # -- groups ------------------------------------------------------------------
    def add_group(self, name: str, member_folders: list[str]) -> Path:
        """Create ``/vip/<name> (group)`` for these members; its local folder."""
        if not name or "/" in name or name in (".", "..") or name != name.strip():
            raise ValueError(f"invalid group name {name!r}")
        self.groups[name] = frozenset(member_folders)
        local = self.group_dir(name)
        local.mkdir(parents=True, exist_ok=True)
        return local

    def group_dir(self, name: str) -> Path:
        return self.private / "groups" / name

    def user_groups(self, folder: str) -> list[str]:
        return sorted(g for g, members in self.groups.items() if folder in members)

    # -- namespace ---------------------------------------------------------------
    def home(self, folder: str) -> Path:
        home = self.root / folder
        home.mkdir(parents=True, exist_ok=True)
        return home

    def trash(self, folder: str) -> Path:
        trash = self.trash_root / folder
        trash.mkdir(parents=True, exist_ok=True)
        return trash

    def resolve(self, folder: str, raw: str) -> Resolved:
        """Resolve ``raw`` for the user owning ``folder``; 8013 when forbidden."""
        path = normalize(raw)
        if path == "/vip":
            return Resolved(path, None, True, folder)
        for top, base in (("/vip/Home", self.home), ("/vip/Trash", self.trash)):
            if path == top:
                return Resolved(path, base(folder), True, folder)
            if path.startswith(top + "/"):
                rel = path[len(top) + 1 :]
                return Resolved(path, base(folder).joinpath(*rel.split("/")), False, folder)
        if self.groups and path.startswith("/vip/"):
            top_name, _, rel = path[len("/vip/"):].partition("/")
            if top_name.endswith(" (group)"):
                group = top_name[: -len(" (group)")]
                if folder in self.groups.get(group, ()):
                    local = self.group_dir(group)
                    if not rel:
                        return Resolved(path, local, True, folder)
                    return Resolved(path, local.joinpath(*rel.split("/")), False, folder)
        raise forbidden(path)

    def to_vip(self, folder: str, local: Path) -> str:
        """Translate a local path in the user's home back to ``/vip/Home/...``."""
        rel = local.relative_to(self.home(folder))
        return "/vip/Home" + ("/" + rel.as_posix() if rel.parts else "")

    # -- reads ---------------------------------------------------------------------
    def root_entries(self, folder: str = "") -> list[dict[str, Any]]:
        tops = ["/vip/Home", "/vip/Trash"] + [f"/vip/{g} (group)" for g in self.user_groups(folder)]
        return [
            {
                "path": p,
                "lastModificationDate": None,
                "isDirectory": True,
                "exists": True,
                "size": None,
                "executionId": None,
                "mimeType": "text/directory",
            }
            for p in tops
        ]

    def properties(self, res: Resolved) -> dict[str, Any]:
        if res.local is None:
            return {
                "path": res.vip_path,
                "lastModificationDate": None,
                "isDirectory": True,
                "exists": True,
                "size": len(self.root_entries(res.folder)),
                "executionId": None,
                "mimeType": "text/directory",
            }
        try:
            st = res.local.stat()
        except OSError:
            return properties_missing(res.vip_path)
        if res.local.is_dir():
            try:
                count = sum(1 for _ in os.scandir(res.local))
            except OSError:
                count = 0
            return {
                "path": res.vip_path,
                "lastModificationDate": int(st.st_mtime),
                "isDirectory": True,
                "exists": True,
                "size": count,
                "executionId": None,
                "mimeType": "text/directory",
            }
        return {
            "path": res.vip_path,
            "lastModificationDate": None,
            "isDirectory": False,
            "exists": True,
            "size": st.st_size,
            "executionId": None,
            "mimeType": _mime(res.local.name),
        }

    def exists(self, res: Resolved) -> bool:
        return res.local is None or res.local.exists()

    def list(self, res: Resolved) -> list[dict[str, Any]]:
        if res.local is None:
            return self.root_entries(res.folder)
        if not res.local.is_dir():
            raise ApiFailure(8000, f"The path '{res.vip_path}' does not exist or is not a directory")
        out: list[dict[str, Any]] = []
        with os.scandir(res.local) as it:
            for entry in it:
                child = res.vip_path + "/" + entry.name
                try:
                    is_dir = entry.is_dir()
                    size = 0 if is_dir else entry.stat().st_size
                except OSError:
                    continue
                out.append(
                    {
                        "path": child,
                        "lastModificationDate": None,
                        "isDirectory": is_dir,
                        "exists": True,
                        "size": size,
                        "executionId": None,
                        "mimeType": "text/directory" if is_dir else _mime(entry.name),
                    }
                )
        return out

    # -- writes --------------------------------------------------------------------
    def upload_target(self, res: Resolved) -> Path:
        """Where a PUT lands (sanitised name); checks 8013 and parent existence."""
        if res.is_root or res.local is None:
            raise forbidden(res.vip_path)
        parent = res.local.parent
        if not parent.is_dir():
            raise ApiFailure(8000, f"The parent directory of '{res.vip_path}' does not exist")
        name = clean_filename(res.local.name)
        if not name or name in (".", ".."):
            raise ApiFailure(8000, f"Invalid file name in '{res.vip_path}'")
        return parent / name

    def mkdir(self, target: Path, vip_path: str) -> None:
        if target.is_dir():
            return  # like the GRIDA local backend: silently fine
        if target.exists():
            raise ApiFailure(8000, f"'{vip_path}' already exists")
        try:
            target.mkdir()
        except OSError as err:
            raise ApiFailure(8000, f"Cannot create directory '{vip_path}': {err.strerror}") from None

    def land(self, tmp: Path, target: Path, vip_path: str, *, make_parents: bool = False) -> None:
        """Move an uploaded temp file into place, never overwriting.

        ``make_parents``: recreate missing folders first, as a storage operation that was
        queued before its folder was deleted does when it finally runs (a late landing).
        """
        if make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise ApiFailure(8000, f"File '{vip_path}' already exists") from None
        except OSError:
            # no hard links here (odd filesystem): check, then replace
            if target.exists():
                raise ApiFailure(8000, f"File '{vip_path}' already exists") from None
            os.replace(tmp, target)
            return
        finally:
            if tmp.exists():
                tmp.unlink()

    def new_tmp(self) -> Path:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="upload-", dir=self.tmp)
        os.close(fd)
        return Path(name)

    def delete(self, res: Resolved, delay: float) -> None:
        """Recursive delete, visible to readers only after ``delay`` seconds."""
        if res.is_root or res.local is None:
            raise forbidden(res.vip_path)
        if not (res.local.exists() or res.local.is_symlink()):
            raise ApiFailure(8000, f"The path '{res.vip_path}' does not exist")
        if delay <= 0:
            _remove(res.local)
            return
        with self._pending_lock:
            if res.local in self._pending:
                return  # already queued, like a second GRIDA pool entry
            timer = threading.Timer(delay, self._run_pending, args=(res.local,))
            timer.daemon = True
            self._pending[res.local] = timer
        timer.start()

    def _run_pending(self, local: Path) -> None:
        with self._pending_lock:
            self._pending.pop(local, None)
        _remove(local)

    def flush_pending(self) -> None:
        """Perform every queued delete now (server stop)."""
        with self._pending_lock:
            pending = list(self._pending.items())
            self._pending.clear()
        for local, timer in pending:
            timer.cancel()
            _remove(local)


def _remove(local: Path) -> None:
    try:
        if local.is_dir() and not local.is_symlink():
            shutil.rmtree(local)
        else:
            local.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:  # GRIDA drops failed deletes silently; we log them
        log.warning("localvip: delete of %s failed: %s", local, err)
