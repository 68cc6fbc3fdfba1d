"""Safe, crash-safe extraction of result tarballs into a folder named after the archive.

As the official ``VipSession`` does, ``out/job.tgz`` is replaced by a *folder* ``out/job.tgz/``
holding the archive's content (so ``VipSession`` sees the output as already downloaded):

1. leftovers of a crashed extraction (``out/.job.tgz.extracting-<pid>`` of a dead process) are removed;
2. members are checked one by one *before* they are written (absolute names, ``..``, links
   leaving the folder, devices and fifos, member count, total bytes, the ratio of expanded to
   compressed bytes in total and per member) and extracted into
   ``out/.job.tgz.extracting-<pid>``, with tarfile's ``data`` filter on top when Python has it;
3. symlinks are checked again once everything is on disk (a later member can change where an
   earlier link points);
4. the archive is set aside as ``out/.job.tgz.archive``, the temp folder is renamed to
   ``out/job.tgz``, and only then is the set-aside archive removed.

A crash at any point is finished by the next call: before step 4 the archive is still in place
(start over); between the two renames the set-aside archive is put back (start over); after the
second rename the folder is complete (remove the set-aside archive). Nothing outside the
archive's own name and its hidden temp names is ever touched.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tarfile
from pathlib import Path

from agent.errors import AgentError
from agent.fsutil import fsync_dir as _fsync_dir
from agent.procs import pid_alive

log = logging.getLogger(__name__)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CorruptArchiveError",
    "ExtractError",
    "UnsafeArchiveError",
    "folder_for",
    "has_archive_name",
    "is_archive",
    "safe_extract",
]

#: expanded bytes per archive byte beyond which an archive is refused as a bomb, in total
#: and for one member (compressed size measured while reading); both apply only beyond
#: :data:`RATIO_FLOOR` expanded bytes, so small, very compressible outputs always extract
MAX_RATIO = 200.0
MAX_MEMBER_RATIO = 500.0
RATIO_FLOOR = 64 * 2**20

#: longest first, so ``.tar.gz`` wins over ``.gz``-less ``.tar``
ARCHIVE_SUFFIXES = (".tar.bz2", ".tar.gz", ".tar.xz", ".tbz2", ".tgz", ".txz", ".tar")
_TEMP_INFIX = ".extracting-"
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
#: tarfile.FilterError does not exist on Pythons without filters; an empty tuple catches nothing
_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
)


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


def has_archive_name(path: Path | str) -> bool:
    """Whether the name is a tarball's (``.tgz``, ``.tar.gz``, ...), whatever is on disk."""
    return _suffix(Path(path).name) is not None


def folder_for(archive: Path) -> Path:
    """The folder an archive extracts to: the archive's own name (``foo.tgz`` -> ``foo.tgz/``)."""
    archive = Path(archive)
    if _suffix(archive.name) is None:
        raise ValueError(f"not a tarball name: {archive.name}")
    return archive


def _set_aside(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.archive")


def _pid_alive(pid: int) -> bool:
    # our own leftover (an earlier failure in this process): no one uses it
    return pid != os.getpid() and pid_alive(pid)


def _clean_leftovers(parent: Path, archive_name: str) -> None:
    """Remove temp folders of crashed extractions of this archive (never a live process's)."""
    prefix = f".{archive_name}{_TEMP_INFIX}"
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


def _extract_into(
    archive: Path, tmp: Path, max_members: int, max_bytes: int, max_ratio: float,
    max_member_ratio: float,
) -> None:  # fmt: skip
    tmp_real = os.path.realpath(tmp)
    count = 0
    total = 0
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            packed = max(1, os.fstat(raw.fileno()).st_size)
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
                    # refused before a byte of it is written: sizes are in the member headers
                    if total > RATIO_FLOOR and total > max_ratio * packed:
                        raise _unsafe(
                            archive, member.name,
                            f"brings the content to {total:,} bytes, more than {max_ratio:g} "
                            f"times the archive's {packed:,} bytes (a decompression bomb?)",
                        )
                _check_member(archive, tmp_real, member)
                before = raw.tell()
                try:
                    if _HAS_DATA_FILTER:
                        tar.extract(member, tmp, set_attrs=True, filter="data")
                    else:  # Pythons before 3.10.12 / 3.11.4
                        tar.extract(_fallback_filter(member), tmp, set_attrs=True)
                except _FILTER_ERRORS as err:
                    raise _unsafe(archive, member.name, f"was refused by tarfile ({err})") from None
                used = max(1, raw.tell() - before)  # compressed bytes read for it (roughly)
                if member.isreg() and member.size > RATIO_FLOOR and member.size > max_member_ratio * used:
                    raise _unsafe(
                        archive, member.name,
                        f"expands {member.size / used:,.0f} times ({used:,} compressed bytes to "
                        f"{member.size:,}), more than {max_member_ratio:g} (a decompression bomb?)",
                    )
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


def safe_extract(
    archive: Path,
    *,
    max_members: int = 100_000,
    max_bytes: int = 50 * 2**30,
    max_ratio: float | None = None,
    max_member_ratio: float | None = None,
) -> Path:
    """Replace tarball ``archive`` by a folder of the same name holding its content.

    Returns the folder. Idempotent: a folder already at that name (a finished
    extraction) is returned as it is. Raises UnsafeArchiveError (naming the member)
    or CorruptArchiveError; on any error the archive stays and the temp folder is removed.
    """
    archive = Path(archive)
    parent = archive.parent
    aside = _set_aside(archive)
    _clean_leftovers(parent, archive.name)
    if archive.is_dir() and not archive.is_symlink():
        aside.unlink(missing_ok=True)  # a crash after the folder took the archive's name
        return archive
    if not os.path.lexists(archive) and aside.is_file():
        log.info("resuming an interrupted extraction of %s", archive.name)
        os.rename(aside, archive)
    if not archive.is_file() or archive.is_symlink():
        raise ExtractError(f"{archive.name} is not there to extract", detail=str(archive))

    tmp = parent / f".{archive.name}{_TEMP_INFIX}{os.getpid()}"
    _remove_tree(tmp)
    tmp.mkdir()
    try:
        _extract_into(
            archive, tmp, max_members, max_bytes,
            MAX_RATIO if max_ratio is None else max_ratio,
            MAX_MEMBER_RATIO if max_member_ratio is None else max_member_ratio,
        )  # fmt: skip
        os.rename(archive, aside)
        try:
            os.rename(tmp, archive)
        except BaseException:
            os.rename(aside, archive)
            raise
        _fsync_dir(parent)
    except BaseException:
        _remove_tree(tmp)
        raise
    aside.unlink(missing_ok=True)
    _fsync_dir(parent)
    return archive
