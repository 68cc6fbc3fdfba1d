"""Safe, crash-safe extraction of result tarballs into a folder named after the archive.

``safe_extract(Path("out/job.tgz"))`` leaves ``out/job/`` and removes ``out/job.tgz``:

1. leftovers of a crashed extraction (``out/.job.extracting-<pid>`` of a dead process) are removed;
2. members are checked one by one *before* they are written (absolute names, ``..``, links
   leaving the folder, devices and fifos, member count, total bytes) and extracted into
   ``out/.job.extracting-<pid>``, with tarfile's ``data`` filter on top when Python has it;
3. symlinks are checked again once everything is on disk (a later member can change where an
   earlier link points);
4. a marker naming the archive is written, the temp folder is renamed to ``out/job`` and only
   then is the archive removed, then the marker.

A crash after step 4's rename leaves the archive and a folder carrying the marker: the next
call sees the marker matches the archive and only removes the archive. A folder that is not
ours is never touched: the archive goes to ``out/job (2)/`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

from agent.errors import AgentError

log = logging.getLogger(__name__)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CorruptArchiveError",
    "ExtractError",
    "UnsafeArchiveError",
    "folder_for",
    "is_archive",
    "safe_extract",
]

#: longest first, so ``.tar.gz`` wins over ``.gz``-less ``.tar``
ARCHIVE_SUFFIXES = (".tar.bz2", ".tar.gz", ".tar.xz", ".tbz2", ".tgz", ".txz", ".tar")
MARKER = ".vip-agent-extract.json"
_TEMP_INFIX = ".extracting-"
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


class ExtractError(AgentError):
    """An archive could not be extracted; the archive is left in place."""


class UnsafeArchiveError(ExtractError):
    """The archive tries to write outside its folder, holds devices, or is too big."""


class CorruptArchiveError(ExtractError):
    """The file is not a readable tar archive (truncated, wrong format)."""


def _suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a regular file with a tarball name (``.tgz``, ``.tar.gz``, ``.tar``, ...)."""
    path = Path(path)
    return _suffix(path.name) is not None and path.is_file()


def folder_for(archive: Path) -> Path:
    """The folder an archive extracts to: ``foo.tgz`` -> ``foo`` in the same parent."""
    archive = Path(archive)
    suffix = _suffix(archive.name)
    if suffix is None:
        raise ValueError(f"not a tarball name: {archive.name}")
    return archive.with_name(archive.name[: -len(suffix)])


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover (an earlier failure in this process); no one uses it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _clean_leftovers(parent: Path, base: str) -> None:
    """Remove temp folders of crashed extractions of ``base`` (never a live process's)."""
    prefix = f".{base}{_TEMP_INFIX}"
    try:
        entries = list(parent.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        log.info("removing leftover of an interrupted extraction: %s", entry)
        _remove_tree(entry)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _fingerprint(archive: Path) -> dict[str, Any]:
    st = archive.stat()
    return {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _ours(folder: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether ``folder`` is a finished extraction of this very archive (crash before cleanup)."""
    try:
        recorded = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in fingerprint.items())


def _finish(archive: Path, folder: Path) -> Path:
    """Remove the archive, then our marker (this order survives a crash at any point)."""
    archive.unlink(missing_ok=True)
    _fsync_dir(archive.parent)
    (folder / MARKER).unlink(missing_ok=True)
    return folder


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _unsafe(archive: Path, member: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{archive.name} was not extracted: member '{member}' {why}; the archive is kept as is",
        detail=f"archive {archive}",
    )


def _check_member(archive: Path, tmp_real: str, member: tarfile.TarInfo) -> None:
    """Our own checks, done before writing and independent of tarfile's filters."""
    name = member.name
    if not name or "\x00" in name:
        raise _unsafe(archive, name, "has an empty or invalid name")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _unsafe(archive, name, "has an absolute name")
    if ".." in name.replace("\\", "/").split("/"):
        raise _unsafe(archive, name, "contains '..'")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise _unsafe(archive, name, "is a device or fifo")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise _unsafe(archive, name, f"has an unsupported type ({member.type!r})")
    # where it would land, following links already on disk
    dest = os.path.realpath(os.path.join(tmp_real, name))
    if not _inside(tmp_real, dest):
        raise _unsafe(archive, name, "would be written outside the folder (through a link)")
    if member.issym():
        target = member.linkname
        if not target or target.startswith(("/", "\\")):
            raise _unsafe(archive, name, f"is a link to an absolute path ({target})")
        where = os.path.realpath(
            os.path.join(tmp_real, posixpath.dirname(name), target)
        )
        if not _inside(tmp_real, where):
            raise _unsafe(archive, name, f"is a link leaving the folder ({target})")
    elif member.islnk():
        target = member.linkname
        if not target or target.startswith(("/", "\\")) or ".." in target.split("/"):
            raise _unsafe(archive, name, f"is a hard link leaving the folder ({target})")
        where = os.path.realpath(os.path.join(tmp_real, target))
        if not _inside(tmp_real, where):
            raise _unsafe(archive, name, f"is a hard link leaving the folder ({target})")


def _fallback_filter(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """For Pythons without the data filter: no ownership, no special mode bits."""
    member.uid = member.gid = os.getuid() if hasattr(os, "getuid") else 0
    member.uname = member.gname = ""
    if member.isreg() or member.islnk():
        member.mode = (member.mode & 0o755) | 0o600
    elif member.isdir():
        member.mode = (member.mode & 0o755) | 0o700
    return member


def _check_links_after(archive: Path, tmp_real: str) -> None:
    """A later member can redirect an earlier link (``x -> a/..`` then ``a -> .``): recheck all."""
    for dirpath, dirnames, filenames in os.walk(tmp_real):
        for entry in dirnames + filenames:
            full = os.path.join(dirpath, entry)
            if os.path.islink(full) and not _inside(tmp_real, os.path.realpath(full)):
                rel = os.path.relpath(full, tmp_real)
                raise _unsafe(archive, rel, "is a link leaving the folder")


def _extract_into(archive: Path, tmp: Path, max_members: int, max_bytes: int) -> None:
    tmp_real = os.path.realpath(tmp)
    count = 0
    total = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                count += 1
                if count > max_members:
                    raise _unsafe(
                        archive, member.name, f"is beyond the limit of {max_members:,} members"
                    )
                if member.isreg():
                    total += member.size
                    if total > max_bytes:
                        raise _unsafe(
                            archive, member.name,
                            f"brings the content over the limit of {max_bytes:,} bytes",
                        )
                _check_member(archive, tmp_real, member)
                try:
                    if _HAS_DATA_FILTER:
                        tar.extract(member, tmp, set_attrs=True, filter="data")
                    else:  # pragma: no cover - Pythons before 3.10.12 / 3.11.4
                        tar.extract(_fallback_filter(member), tmp, set_attrs=True)
                except tarfile.FilterError as err:
                    raise _unsafe(archive, member.name, f"was refused by tarfile ({err})") from None
    except ExtractError:
        raise
    except (tarfile.TarError, EOFError) as err:
        raise CorruptArchiveError(
            f"{archive.name} is not a readable tar archive (damaged or incomplete download)",
            detail=f"{type(err).__name__}: {err}",
        ) from None
    except OSError as err:
        # gzip/bz2/lzma decoding errors are OSError or its subclasses; disk errors too
        if err.errno is None:
            raise CorruptArchiveError(
                f"{archive.name} is not a readable tar archive (damaged or incomplete download)",
                detail=f"{type(err).__name__}: {err}",
            ) from None
        raise ExtractError(
            f"could not extract {archive.name}: {err.strerror or err}",
            detail=f"{type(err).__name__}: {err}",
        ) from None
    except Exception as err:  # zlib.error, lzma.LZMAError, ValueError from damaged headers
        raise CorruptArchiveError(
            f"{archive.name} is not a readable tar archive (damaged or incomplete download)",
            detail=f"{type(err).__name__}: {err}",
        ) from None
    _check_links_after(archive, tmp_real)


def _free_name(base: Path, fingerprint: dict[str, Any]) -> tuple[Path, bool]:
    """First of ``base``, ``base (2)``, ... that is free, or ours (then True)."""
    n = 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name} ({n})")
        if not os.path.lexists(candidate):
            return candidate, False
        if candidate.is_dir() and not candidate.is_symlink() and _ours(candidate, fingerprint):
            return candidate, True
        n += 1


def safe_extract(
    archive: Path,
    *,
    max_members: int = 100_000,
    max_bytes: int = 50 * 2**30,
    folder_name: str | None = None,
) -> Path:
    """Replace tarball ``archive`` by a folder holding its content; returns the folder.

    The folder is ``foo`` for ``foo.tgz`` (``folder_name`` overrides it; pass ``archive.name``
    to get VipSession's layout, a folder named ``foo.tgz``). If that name is taken by something
    that is not an unfinished extraction of this archive, ``foo (2)`` and so on are used, and
    logged. Raises UnsafeArchiveError (naming the member) or CorruptArchiveError; on any error
    the archive stays and the temp folder is removed.
    """
    archive = Path(archive)
    parent = archive.parent
    base = folder_name or folder_for(archive).name
    if "/" in base or base in ("", ".", ".."):
        raise ValueError(f"bad folder name: {base!r}")
    _clean_leftovers(parent, base)
    if not archive.is_file():
        raise ExtractError(f"{archive.name} is not there to extract", detail=str(archive))
    fingerprint = _fingerprint(archive)
    wanted = parent / base
    target, ours = _free_name(wanted, fingerprint)
    if ours:
        log.info("finishing an interrupted extraction of %s into %s", archive.name, target.name)
        return _finish(archive, target)

    tmp = parent / f".{base}{_TEMP_INFIX}{os.getpid()}"
    _remove_tree(tmp)
    tmp.mkdir(mode=0o700)
    try:
        _extract_into(archive, tmp, max_members, max_bytes)
        (tmp / MARKER).write_text(json.dumps(fingerprint), encoding="utf-8")
        os.chmod(tmp, 0o755 & ~_umask())
        # the name may have been taken meanwhile; rename() would replace an empty folder
        target, ours = _free_name(wanted, fingerprint)
        if ours:  # another process finished first
            _remove_tree(tmp)
            return _finish(archive, target)
        os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        _remove_tree(tmp)
        raise
    if target != wanted:
        log.warning(
            "%s already exists and is not from this archive; extracted %s into %s instead",
            wanted.name, archive.name, target.name,
        )
    return _finish(archive, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
