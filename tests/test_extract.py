"""Tests for agent.extract: real tarballs built on disk, real folders."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import extract as extract_mod
from agent.extract import (
    CorruptArchiveError,
    UnsafeArchiveError,
    folder_for,
    is_archive,
    safe_extract,
)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_link(tar: tarfile.TarFile, name: str, target: str, *, hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def _add_special(tar: tarfile.TarFile, name: str, kind: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    tar.addfile(info)


Build = Callable[[tarfile.TarFile], None]


def _make(path: Path, build: Build, mode: str = "w:gz") -> Path:
    opener: Any = tarfile.open  # mode is a runtime string; the stubs want literals
    with opener(path, mode) as tar:
        build(tar)
    return path


@pytest.fixture(params=[True, False], ids=["data-filter", "own-checks-only"])
def data_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run with tarfile's data filter and without it: our own checks must hold alone."""
    monkeypatch.setattr("agent.extract._HAS_DATA_FILTER", request.param)
    return bool(request.param)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _assert_untouched(parent: Path, archive: Path, before: set[str]) -> None:
    """Archive kept, no temp folder, nothing new anywhere in the parent."""
    assert archive.is_file()
    assert _listing(parent) == before


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        # the folder takes the archive's own name, as VipSession does
        ("job.tgz", "job.tgz"),
        ("job.tar.gz", "job.tar.gz"),
        ("JOB.TAR.GZ", "JOB.TAR.GZ"),
        ("a.b--c.tar", "a.b--c.tar"),
        ("x.tar.bz2", "x.tar.bz2"),
        ("x.tar.xz", "x.tar.xz"),
    ],
)
def test_folder_for_and_is_archive(tmp_path: Path, name: str, folder: str) -> None:
    archive = tmp_path / name
    assert not is_archive(archive)  # not there yet
    archive.write_bytes(b"x")
    assert is_archive(archive)
    assert folder_for(archive) == tmp_path / folder


def test_is_archive_rejects_other_names_and_folders(tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(b"%PDF")
    (tmp_path / "d.tgz").mkdir()
    (tmp_path / ".tgz").write_bytes(b"x")
    assert not is_archive(tmp_path / "report.pdf")
    assert not is_archive(tmp_path / "d.tgz")
    assert not is_archive(tmp_path / ".tgz")


# ---------------------------------------------------------------- normal use


@pytest.mark.parametrize("mode,suffix", [("w:gz", ".tgz"), ("w", ".tar"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")])
def test_nested_archive_replaced_by_folder(
    tmp_path: Path, mode: str, suffix: str, data_filter: bool
) -> None:
    def build(tar: tarfile.TarFile) -> None:
        _add_dir(tar, "sub")
        _add_dir(tar, "sub/deeper")
        _add_file(tar, "sub/deeper/result.txt", b"hello")
        _add_file(tar, "top.csv", b"a,b\n1,2\n")
        _add_link(tar, "sub/link.txt", "deeper/result.txt")
        _add_link(tar, "hard.txt", "top.csv", hard=True)
        _add_file(tar, "script.sh", b"#!/bin/sh\n", mode=0o4755)  # setuid must not survive

    archive = _make(tmp_path / f"job{suffix}", build, mode)
    folder = safe_extract(archive)

    assert folder == tmp_path / f"job{suffix}"
    assert folder.is_dir()
    assert (folder / "sub/deeper/result.txt").read_bytes() == b"hello"
    assert (folder / "top.csv").read_bytes() == b"a,b\n1,2\n"
    assert (folder / "sub/link.txt").is_symlink()
    assert (folder / "sub/link.txt").read_bytes() == b"hello"
    assert (folder / "hard.txt").read_bytes() == b"a,b\n1,2\n"
    assert not (folder / "script.sh").stat().st_mode & 0o4000
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"job{suffix}"]  # no temp folder left


def test_exact_limits_are_allowed(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "a", b"12345")
        _add_file(tar, "b", b"12345")

    archive = _make(tmp_path / "ok.tgz", build)
    folder = safe_extract(archive, max_members=2, max_bytes=10)
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b"]


# ---------------------------------------------------------------- hostile archives


#: absolute member name used by ``_abs``; set per test under tmp_path so a failure stays contained
_ABS_TARGET: list[str] = []


def _abs(tar: tarfile.TarFile) -> None:
    _add_file(tar, "fine.txt", b"ok")
    _add_file(tar, _ABS_TARGET[0], b"evil")


def _dotdot(tar: tarfile.TarFile) -> None:
    _add_file(tar, "../evil.txt", b"evil")


def _dotdot_nested(tar: tarfile.TarFile) -> None:
    _add_dir(tar, "a")
    _add_file(tar, "a/../../evil.txt", b"evil")


def _symlink_abs(tar: tarfile.TarFile) -> None:
    _add_link(tar, "etc", "/etc")


def _symlink_out(tar: tarfile.TarFile) -> None:
    _add_link(tar, "up", "../")


def _symlink_then_write(tar: tarfile.TarFile) -> None:
    # a link inside the folder whose target leaves it only through another link
    _add_dir(tar, "sub")
    _add_link(tar, "sub/l", "..")  # -> the folder itself: fine on its own
    _add_link(tar, "x", "sub/l/..")  # lexically "sub", physically the parent: escape
    _add_file(tar, "x/evil.txt", b"evil")


def _symlink_redirected_later(tar: tarfile.TarFile) -> None:
    # x -> a/.. is inside while "a" is missing; a -> . then makes x point outside
    _add_link(tar, "x", "a/..")
    _add_link(tar, "a", ".")


def _hardlink_out(tar: tarfile.TarFile) -> None:
    _add_link(tar, "h", "../outside.txt", hard=True)


def _hardlink_abs(tar: tarfile.TarFile) -> None:
    _add_link(tar, "passwd", "/etc/passwd", hard=True)


def _char_device(tar: tarfile.TarFile) -> None:
    _add_special(tar, "null", tarfile.CHRTYPE)


def _block_device(tar: tarfile.TarFile) -> None:
    _add_special(tar, "disk", tarfile.BLKTYPE)


def _fifo(tar: tarfile.TarFile) -> None:
    _add_special(tar, "pipe", tarfile.FIFOTYPE)


@pytest.mark.parametrize(
    ("build", "bad_member"),
    [
        (_abs, "<abs>"),
        (_dotdot, "../evil.txt"),
        (_dotdot_nested, "a/../../evil.txt"),
        (_symlink_abs, "etc"),
        (_symlink_out, "up"),
        (_symlink_then_write, "x"),
        (_symlink_redirected_later, "x"),
        (_hardlink_out, "h"),
        (_hardlink_abs, "passwd"),
        (_char_device, "null"),
        (_block_device, "disk"),
        (_fifo, "pipe"),
    ],
)
def test_hostile_members_refused(
    tmp_path: Path, build: Build, bad_member: str, data_filter: bool
) -> None:
    work = tmp_path / "out"
    work.mkdir()
    (tmp_path / "outside.txt").write_text("precious")
    _ABS_TARGET[:] = [str(tmp_path / "abs-evil.txt")]
    if bad_member == "<abs>":
        bad_member = _ABS_TARGET[0]
    archive = _make(work / "job.tgz", build)
    before = _listing(tmp_path)

    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive)

    assert f"'{bad_member}'" in caught.value.message
    _assert_untouched(tmp_path, archive, before)
    assert (tmp_path / "outside.txt").read_text() == "precious"


def test_too_many_members(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        for i in range(5):
            _add_file(tar, f"f{i}", b"x")

    archive = _make(tmp_path / "many.tgz", build)
    before = _listing(tmp_path)
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, max_members=4)
    assert "'f4'" in caught.value.message and "4 members" in caught.value.message
    _assert_untouched(tmp_path, archive, before)


def test_too_big_is_refused_before_writing(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "small", b"x" * 600)
        _add_file(tar, "big", b"y" * 600)

    archive = _make(tmp_path / "big.tgz", build)
    before = _listing(tmp_path)
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, max_bytes=1000)
    assert "'big'" in caught.value.message and "1,000 bytes" in caught.value.message
    _assert_untouched(tmp_path, archive, before)


# ---------------------------------------------------------------- corrupt archives


def test_not_a_tarball(tmp_path: Path) -> None:
    archive = tmp_path / "junk.tgz"
    archive.write_bytes(os.urandom(4096))
    before = _listing(tmp_path)
    with pytest.raises(CorruptArchiveError):
        safe_extract(archive)
    _assert_untouched(tmp_path, archive, before)


def test_truncated_tarball(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "a.bin", os.urandom(200_000))
        _add_file(tar, "b.bin", os.urandom(200_000))

    archive = _make(tmp_path / "cut.tgz", build)
    archive.write_bytes(archive.read_bytes()[:150_000])
    before = _listing(tmp_path)
    with pytest.raises(CorruptArchiveError) as caught:
        safe_extract(archive)
    assert "cut.tgz" in caught.value.message
    _assert_untouched(tmp_path, archive, before)


# ---------------------------------------------------------------- crash recovery and name clashes


def _simple(tar: tarfile.TarFile) -> None:
    _add_file(tar, "r.txt", b"result")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_folder_of_dead_process_is_removed(tmp_path: Path) -> None:
    archive = _make(tmp_path / "job.tgz", _simple)
    dead = tmp_path / f".job.tgz.extracting-{_dead_pid()}"
    (dead / "half").mkdir(parents=True)
    (dead / "half" / "partial.bin").write_bytes(b"partial")
    alive = tmp_path / f".job.tgz.extracting-{os.getppid()}"  # a live process: not ours to touch
    alive.mkdir()

    folder = safe_extract(archive)

    assert (folder / "r.txt").read_bytes() == b"result"
    assert not dead.exists()
    assert alive.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "job.tgz"]


def test_crash_before_setting_aside_starts_over(tmp_path: Path) -> None:
    archive = _make(tmp_path / "job.tgz", _simple)
    # a crash while extracting: a dead process's temp folder, the archive still in place
    dead = tmp_path / f".job.tgz.extracting-{_dead_pid()}"
    dead.mkdir()
    (dead / "r.txt").write_bytes(b"half")

    folder = safe_extract(archive)

    assert (folder / "r.txt").read_bytes() == b"result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.tgz"]


def test_crash_between_the_two_renames_starts_over(tmp_path: Path) -> None:
    archive = _make(tmp_path / "job.tgz", _simple)
    # the archive was set aside, the folder had not taken its name yet
    dead = tmp_path / f".job.tgz.extracting-{_dead_pid()}"
    dead.mkdir()
    (dead / "r.txt").write_bytes(b"result")
    os.rename(archive, tmp_path / ".job.tgz.archive")

    folder = safe_extract(archive)

    assert folder == archive and folder.is_dir()
    assert (folder / "r.txt").read_bytes() == b"result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.tgz"]


def test_crash_after_the_folder_took_the_name_is_finished(tmp_path: Path) -> None:
    archive = _make(tmp_path / "job.tgz", _simple)
    data = archive.read_bytes()
    os.rename(archive, tmp_path / ".job.tgz.archive")
    archive.mkdir()
    (archive / "r.txt").write_bytes(b"already extracted")
    assert data

    assert safe_extract(archive) == archive

    assert (archive / "r.txt").read_bytes() == b"already extracted"  # not re-extracted over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.tgz"]


def test_failed_extraction_leaves_the_archive_and_nothing_else(tmp_path: Path) -> None:
    from agent.extract import UnsafeArchiveError

    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "ok.txt", b"fine")
        _add_file(tar, "../evil.txt", b"escape")

    archive = _make(tmp_path / "job.tgz", build)
    before = archive.read_bytes()
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive)
    assert archive.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.tgz"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_missing_archive_raises(tmp_path: Path) -> None:
    from agent.extract import ExtractError

    with pytest.raises(ExtractError):
        safe_extract(tmp_path / "gone.tgz")


# -- decompression bombs: the ratio of expanded to compressed bytes ----------------------


def _gz_with(tmp_path: Path, members: dict[str, bytes]) -> Path:
    archive = tmp_path / "out" / "bomb.tgz"
    archive.parent.mkdir(exist_ok=True)
    with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture
def small_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    # the real floor is 64 MiB; 1 MiB keeps the archives of these tests small
    monkeypatch.setattr(extract_mod, "RATIO_FLOOR", 1 << 20)


def test_bomb_refused_by_total_ratio_before_writing(tmp_path: Path, small_floor: None) -> None:
    archive = _gz_with(tmp_path, {"zeros.bin": bytes(24 << 20)})  # ~24 KB expanding 1000 times
    before = archive.read_bytes()
    with pytest.raises(UnsafeArchiveError, match="times the archive's"):
        safe_extract(archive)
    assert archive.read_bytes() == before  # kept as is, nothing else left
    assert sorted(p.name for p in archive.parent.iterdir()) == ["bomb.tgz"]


def test_bomb_member_refused_by_its_own_ratio(tmp_path: Path, small_floor: None) -> None:
    members = {"noise.bin": os.urandom(2 << 20), "zeros.bin": bytes(24 << 20)}  # total ratio ~12
    archive = _gz_with(tmp_path, members)
    with pytest.raises(UnsafeArchiveError, match=r"zeros\.bin.*expands"):
        safe_extract(archive)
    assert archive.is_file() and sorted(p.name for p in archive.parent.iterdir()) == ["bomb.tgz"]
    # the limits are settings: raised, the same archive extracts
    folder = safe_extract(archive, max_member_ratio=5000)
    assert (folder / "zeros.bin").stat().st_size == 24 << 20


def test_compressible_outputs_below_the_floor_extract(tmp_path: Path) -> None:
    archive = _gz_with(tmp_path, {"zeros.bin": bytes(8 << 20), "log.txt": b"ok\n" * 1000})
    assert (safe_extract(archive) / "zeros.bin").stat().st_size == 8 << 20
