"""Files that are not plain paths come back with their state (examples/targets/fd_files.py):
memfds and deleted files (ckpt/collect/fdkinds/memfd.py), directories, O_PATH fds and
stateless devices (reopened by path: ckpt/restore/files.py)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import click
import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    our_children,
    run_ckpt,
)
from test_migrate import start_server

from ckpt.actions.migrate import compat_request
from ckpt.cli import parse_size
from ckpt.collect.fdkinds import memfd
from ckpt.collect.fdkinds.base import FdFlags
from ckpt.collect.fds import FdInfo
from ckpt.images.pb import core_pb2 as pb
from ckpt.restore.files import type_change


def files_target(harness: Harness, mode: str, *args: str) -> Asker:
    where = harness.tmp / "w"
    where.mkdir(exist_ok=True)
    return Asker(harness, "fd_files.py", mode, str(where), *args)


@needs_root
def test_directory_o_path_and_devices_survive(harness: Harness, tmp_path: Path) -> None:
    """A directory fd goes on reading its entries where it stopped (its getdents position)
    and opens files relative to it, O_PATH fds stay O_PATH (and usable as a base for
    openat), /dev/urandom, /dev/random, /dev/zero and /dev/full work as before."""
    target = files_target(harness, "dirs")
    before = target.ask()
    assert isinstance(before, dict)
    assert before["o_path"] == [True, True] and before["read_o_path"] == "EBADF"
    assert before["relative"] == ["file 1\n", "file 2\n"]
    assert before["urandom"] == 16 and before["random"] == 4
    assert before["zero"] == "00" * 8 and before["full"] == "ENOSPC"
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    seen = list(before["entries"])
    while True:
        after = target.ask()
        assert isinstance(after, dict)
        assert {k: v for k, v in after.items() if k != "entries"} == \
            {k: v for k, v in before.items() if k != "entries"}
        if not after["entries"]:
            break
        seen += after["entries"]
    # read on from where it was: every entry exactly once
    assert sorted(seen) == sorted([".", "..", *(f"f{i}" for i in range(40))])


@needs_root
def test_memfd_contents_seals_and_name_survive(harness: Harness, tmp_path: Path) -> None:
    """A sealed memfd comes back sealed (a write fails EPERM), both with their name,
    contents (the hole too), size, mode, position and cloexec flag; the memfd's second open
    file (reopened through /proc/self/fd, O_RDONLY) shares its inode again: it reads what
    the first one wrote after the restore."""
    target = files_target(harness, "memfd")
    before = target.ask()
    assert isinstance(before, dict)
    assert before["names"] == ["/memfd:ckpt sealed (deleted)", "/memfd:ckpt open (deleted)"]
    assert before["write_sealed"] == "EPERM" and before["grow_sealed"] == "EPERM"
    assert before["cloexec"] == [True, False, True] and before["second_reads"] == "st p+g"
    assert before["second_sees"] == "+" and before["owner"] == [65534, 65534]
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    after = target.ask()
    assert isinstance(after, dict)
    # one more byte written at the position, the second open file read on from its own
    assert after["open_pos"] == before["open_pos"] + 1 and after["open"] != before["open"]
    assert after["second_reads"] == "e....."
    assert after["sealed_mtime"][0] == before["sealed_mtime"][1]  # restored, not now
    same = ("names", "seals", "sealed", "sealed_size", "write_sealed", "grow_sealed",
            "open_size", "open_seals", "same_inode", "second_sees", "owner", "mode",
            "cloexec", "second_flags")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}


def assert_ghost_restores(harness: Harness, target: Asker, *dump_args: str) -> None:
    before = target.ask()
    assert isinstance(before, dict)
    assert before["read"] == ["5678", "2345"] and before["nlink"] == 0 and before["deleted"]
    assert before["flags"] == [oct(os.O_RDWR), oct(os.O_RDONLY), oct(os.O_WRONLY | os.O_APPEND)]
    images = harness.images()
    harness.dump_and_reap(target.proc, images, *dump_args)
    harness.restore_detached(images)
    after = target.ask()
    assert isinstance(after, dict)
    # each open file reads on from its own position; the byte appended through the
    # read-write one before the dump is there, the new one is seen by the read-only one
    assert after["read"] == ["9abc", "6789"]
    assert after["pos"] == [13, 10] and after["size"] == before["size"] + 1
    same = ("mode", "owner", "nlink", "same_inode", "deleted", "flags")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    again = target.ask()
    assert isinstance(again, dict) and again["read"] == ["def0", "abcd"]


@needs_root
def test_deleted_file_survives(harness: Harness, tmp_path: Path) -> None:
    """A deleted file still open comes back unlinked, with its contents, mode, and each of
    its three open files' position and flags (one write-only), all on one inode again."""
    assert_ghost_restores(harness, files_target(harness, "ghost"))


@needs_root
def test_deleted_file_over_the_ghost_limit(harness: Harness, tmp_path: Path) -> None:
    """A deleted file above --ghost-limit is refused before the freeze, naming the file,
    its size and the flag (the target runs on untouched); a larger limit saves it."""
    target = files_target(harness, "ghost", str(2 << 20))
    for action in ("dump", "predump"):
        res = run_ckpt(action, "-t", str(target.proc.pid), "-D", harness.images(action))
        message = assert_one_error_line(res)
        assert f"{tmp_path}/w/gone.txt (deleted)" in message, message
        assert f"of {2 << 20} bytes, above --ghost-limit ({1 << 20} bytes)" in message, message
        assert_running_untraced(target.proc.pid)
    res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images("small"),
                   "--ghost-limit", "1500K")
    assert "--ghost-limit 2097152 or more" in assert_one_error_line(res)
    assert_ghost_restores(harness, target, "--ghost-limit", "3M")


# --------------------------------------------------------------------------- pure parts


def record(target: str) -> FdInfo:
    return FdInfo(fd=4, target=target, pos=0, flags=0o2, mnt_id=0, ino=None,
                  st_mode=stat.S_IFREG | 0o600, st_dev=1, st_ino=9, st_rdev=0, st_size=0)


def test_which_kind_claims_a_file() -> None:
    mem, gone = record("/memfd:a (deleted) (deleted)"), record("/tmp/x (deleted)")
    assert memfd.claims_memfd(mem, None) and not memfd.claims_ghost(mem, None)
    assert memfd.claims_ghost(gone, None) and not memfd.claims_memfd(gone, None)
    assert memfd.memfd_name(mem.target) == "a (deleted)"
    assert not memfd.claims_ghost(record("/tmp/x"), None)
    assert not memfd.claims_ghost(replace(gone, st_mode=stat.S_IFDIR | 0o700), None)


def test_ghost_and_memfd_refusals() -> None:
    gone, mem = record("/tmp/x (deleted)"), record("/memfd:m (deleted)")
    flags = FdFlags(ghost_limit=100)

    def found(size: int = 10, nlink: int = 0, huge: bool = False, there: bool = True,
              unreadable: str = "") -> memfd.Found:
        return memfd.Found(size, nlink, huge, there, unreadable)

    assert memfd.refuse_ghost(gone, found(100), flags) is None
    assert memfd.refuse_memfd(mem, found(100), flags) is None
    assert memfd.refuse_ghost(gone, found(101), flags) == (
        "a deleted file of 101 bytes, above --ghost-limit (100 bytes): --ghost-limit 101 or "
        "more saves its contents")
    assert "a memfd of 101 bytes" in str(memfd.refuse_memfd(mem, found(101), flags))
    assert "2 other link(s)" in str(memfd.refuse_ghost(gone, found(nlink=2), flags))
    assert "directory of deleted file /tmp/x is gone" in str(
        memfd.refuse_ghost(gone, found(there=False), flags))
    assert "MFD_HUGETLB" in str(memfd.refuse_memfd(mem, found(huge=True), flags))
    assert "cannot be read (Permission denied)" in str(
        memfd.refuse_ghost(gone, found(unreadable="Permission denied"), flags))


def test_contents_are_read_by_runs_of_data(tmp_path: Path) -> None:
    """Holes stay holes; a file's data past the size read is left out."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(1 << 20)
        f.write(b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        out = pb.MemFd()
        memfd.read_contents(fd, (1 << 20) + 4, out)
        assert [(c.offset, c.data.rstrip(b"\0")) for c in out.data] == \
            [(0, b"head"), (1 << 20, b"tail")]
        assert sum(len(c.data) for c in out.data) < 1 << 18  # the hole is not stored
        short = pb.MemFd()
        memfd.read_contents(fd, 2, short)
        assert [c.data for c in short.data] == [b"he"]
    finally:
        os.close(fd)


@pytest.mark.parametrize(("text", "size"), [("1M", 1 << 20), ("512k", 512 << 10),
                                            ("4096", 4096), ("2G", 2 << 30), ("3MB", 3 << 20)])
def test_ghost_limit_sizes(text: str, size: int) -> None:
    assert parse_size(None, None, text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5M", "-1", "1T"])
def test_bad_ghost_limit_is_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_size(None, None, text)


@needs_root
def test_memfd_through_predump_and_incremental_dump(harness: Harness, tmp_path: Path) -> None:
    """predump, then dump --incremental on it, then restore from the last pass: the memfd
    (its contents are in the final pass's core image, not in the page chain) comes back
    as it was at the final dump."""
    target = files_target(harness, "memfd")
    first = target.ask()
    assert isinstance(first, dict)
    ck = tmp_path / "ck"
    assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", ck / "1"))
    second = target.ask()  # written after the predump
    assert isinstance(second, dict)
    harness.dump_and_reap(target.proc, ck / "2", "--incremental", "--prev-images-dir", "../1")
    harness.restore_detached(ck / "2")
    after = target.ask()
    assert isinstance(after, dict)
    assert after["open_pos"] == second["open_pos"] + 1 and after["second_sees"] == "+"
    assert after["sealed"] == first["sealed"] and after["write_sealed"] == "EPERM"
    assert after["second_reads"] == "......"


@needs_root
def test_deleted_file_whose_directory_is_gone_at_restore(harness: Harness,
                                                         tmp_path: Path) -> None:
    """Restore makes a deleted file again in its directory: if that directory is gone by
    then, restore fails in one line naming both (and leaves no process behind)."""
    target = files_target(harness, "ghost")
    target.ask()
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    (tmp_path / "w").rmdir()
    res = run_ckpt("restore", "-D", images, "--restore-detached")
    message = assert_one_error_line(res)
    assert f"deleted file {tmp_path}/w/gone.txt: its directory {tmp_path}/w is gone" in message
    assert target.proc.pid not in our_children()


def test_a_file_reopened_by_path_keeps_its_type() -> None:
    assert type_change(stat.S_IFDIR | 0o755, stat.S_IFDIR | 0o700) is None
    assert type_change(stat.S_IFDIR | 0o755, stat.S_IFIFO | 0o600) == \
        "(a directory at dump time) is not one now"
    assert "regular file" in str(type_change(stat.S_IFREG, stat.S_IFCHR))
    assert "character device" in str(type_change(stat.S_IFCHR, stat.S_IFREG))
    assert type_change(0, stat.S_IFREG) is None  # not recorded


@needs_root
def test_migrate_carries_a_deleted_file_over_the_default_limit(harness: Harness,
                                                               tmp_path: Path) -> None:
    """migrate's --ghost-limit reaches its check, its rounds and its final dump: a 2 MiB
    deleted file is refused by default and migrates with --ghost-limit 3M."""
    token = tmp_path / "token"
    token.write_text("migrate-me\n")
    address = f"127.0.0.1:{start_server(tmp_path / 'dest')}"
    target = files_target(harness, "ghost", str(2 << 20))
    before = target.ask()
    assert isinstance(before, dict)
    argv = ("migrate", "-t", str(target.proc.pid), "--to", address, "--auth-token-file", token)
    assert "above --ghost-limit" in assert_one_error_line(run_ckpt(*argv))
    res = run_ckpt(*argv, "--ghost-limit", "3M", reap=target.proc)
    assert res.returncode == 0, res.describe()
    harness.track(int(re.search(r"as pid (\d+)", res.stdout)[1]))  # type: ignore[index]
    after = target.ask()
    assert isinstance(after, dict)
    assert after["read"] == ["9abc", "6789"] and after["size"] == before["size"] + 1


@needs_root
def test_migrate_compat_check_reads_only_paths(harness: Harness) -> None:
    """migrate's compatibility check runs while the target runs: it reads fd links, never
    an object's state (a deleted file's contents, a pipe's bytes), so a 2 MiB deleted file
    is neither read nor refused there (the preflight judged it, with --ghost-limit)."""
    target = files_target(harness, "ghost", str(2 << 20))
    files = list(compat_request(target.proc.pid, []).files)
    assert str(harness.tmp / "w") in files, files  # where the deleted file is made again


@pytest.mark.parametrize("bits", [stat.S_ISUID, stat.S_ISGID, stat.S_ISUID | stat.S_ISGID])
def test_fill_keeps_setuid_and_setgid_bits(bits: int) -> None:
    """The owner is set before the mode: a chown clears S_ISUID (and S_ISGID of a group
    executable file), so a chmod done first would be undone."""
    f = pb.OpenFile(size=3, mode=stat.S_IFREG | bits | 0o755)
    f.memfd.uid, f.memfd.gid = os.geteuid(), os.getegid()
    f.memfd.data.add(offset=0, data=b"abc")
    fd = os.memfd_create("setuid", os.MFD_CLOEXEC)
    try:
        memfd.fill(fd, f)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == bits | 0o755
    finally:
        os.close(fd)
