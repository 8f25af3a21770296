"""memfds and deleted files still open ("ghost" files, as CRIU calls them): files no path
reaches any more, so their contents travel in the image.

                 memfd                                  ghost (a deleted regular file)
    claimed      link "/memfd:NAME (deleted)"           link "PATH (deleted)"
    saved        NAME, seals (F_GET_SEALS)              the directory PATH was in
    both         contents (runs of data: holes stay holes), size, mode, owner, times;
                 each open file's flags and position (OpenFile)
    restored as  memfd_create(NAME, MFD_ALLOW_SEALING)  an unnamed file in PATH's directory
                 + contents, mode, owner, times, then   (O_TMPFILE: its link then reads
                 the seals (a sealed memfd refuses      "DIR/#INODE (deleted)")
                 writes again)                          + contents, mode, owner, times
    refused      MFD_HUGETLB; larger than --ghost-limit larger than --ghost-limit; still
                                                        linked under another name; its
                                                        directory deleted too

Contents are read through a reopened copy of the fd (/proc/self/fd of the pidfd_getfd copy,
O_RDONLY: the target's open file and its position are left alone, write-only and O_PATH
fds are read too) and stored inline in the image, so --ghost-limit (default 1 MiB)
bounds both kinds.

Open files of one inode (opened twice, or reopened through /proc/self/fd) are one object
(OpenFile.object, its inode): restore makes the file once (ctx.objects) and gives every
open file its own reopen of it with its flags and position. Mapped memfds and deleted
files are ckpt.collect.mappedfiles's: made before the memory is mapped, the same object
as the open files of the same inode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds.base import (
    NOT_REOPENED,
    FdFlags,
    FdKind,
    Opened,
    Peek,
    RestoreCtx,
)
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import Sharing
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import PAGE_SIZE

DELETED = " (deleted)"
MEMFD_PREFIX = "/memfd:"
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Found:
    """What inspect saw of the file (refuse decides on it)."""

    size: int
    nlink: int
    huge: bool  # on hugetlbfs (MFD_HUGETLB): its block size is a huge page
    directory_exists: bool  # a ghost's directory: restore makes the file there
    unreadable: str = ""  # why its contents cannot be read ("" if they can)


def claims_memfd(info: FdInfo, peek: Peek | None) -> bool:
    return info.target.startswith(MEMFD_PREFIX) and info.target.endswith(DELETED)


def claims_ghost(info: FdInfo, peek: Peek | None) -> bool:
    return (stat.S_ISREG(info.st_mode) and info.target.startswith("/")
            and info.target.endswith(DELETED) and not claims_memfd(info, peek))


def memfd_name(target: str) -> str:
    """"/memfd:NAME (deleted)" -> NAME (a name may hold spaces, even " (deleted)")."""
    return target.removeprefix(MEMFD_PREFIX).removesuffix(DELETED)


def ghost_path(target: str) -> str:
    return target.removesuffix(DELETED)


@contextlib.contextmanager
def reading(peek: Peek, fd: int) -> Iterator[int]:
    """An O_RDONLY open file of the same inode as the process's ``fd`` (the process's own
    open file, and its position, are not touched)."""
    with peek.getfd(fd) as local:
        copy = os.open(f"/proc/self/fd/{local}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield copy
    finally:
        os.close(copy)


def inspect(info: FdInfo, peek: Peek) -> Found:
    try:
        with reading(peek, info.fd) as fd:
            return examine(fd, info.target)
    except OSError as exc:
        return Found(info.st_size, 0, False, directory_exists(info.target),
                     exc.strerror or str(exc))


def examine(fd: int, target: str) -> Found:
    """What refuse needs of the memfd or deleted file ``target`` open on ``fd``."""
    st = os.fstat(fd)
    return Found(st.st_size, st.st_nlink, st.st_blksize > PAGE_SIZE, directory_exists(target))


def directory_exists(target: str) -> bool:
    """A memfd needs none; a deleted file is made again in its directory."""
    return target.startswith(MEMFD_PREFIX) or os.path.isdir(
        os.path.dirname(ghost_path(target)) or "/")


def too_large(what: str, found: Found, flags: FdFlags) -> str | None:
    if found.size <= flags.ghost_limit:
        return None
    return (f"{what} of {found.size} bytes, above --ghost-limit ({flags.ghost_limit} bytes): "
            f"--ghost-limit {found.size} or more saves its contents")


def refuse_memfd(info: FdInfo, found: Any, flags: FdFlags) -> str | None:
    assert isinstance(found, Found)
    return judge(info.target, found, flags)


def refuse_ghost(info: FdInfo, found: Any, flags: FdFlags) -> str | None:
    assert isinstance(found, Found)
    return judge(info.target, found, flags)


def judge(target: str, found: Found, flags: FdFlags) -> str | None:
    """Why the memfd or deleted file ``target`` (its link, or its mapped path) cannot be
    made again, or None; for open files and mappings alike (ckpt.collect.mappedfiles)."""
    if target.startswith(MEMFD_PREFIX):
        if found.unreadable:
            return f"a memfd whose contents cannot be read ({found.unreadable})"
        if found.huge:
            return "a memfd of huge pages (MFD_HUGETLB): not supported yet"
        return too_large("a memfd", found, flags)
    path = ghost_path(target)
    if found.unreadable:
        return f"a deleted file whose contents cannot be read ({found.unreadable})"
    if found.nlink > 0:
        return (f"{path} was deleted but the file has {found.nlink} other link(s), which a "
                "restore would not share: not supported yet")
    if not found.directory_exists:
        return (f"the directory of deleted file {path} is gone too: restore could not "
                "make the file there")
    return too_large("a deleted file", found, flags)


# --------------------------------------------------------------------------- collect


def data_runs(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of data in the first ``size`` bytes of a file; holes
    (SEEK_DATA / SEEK_HOLE) are left out. ``fd`` is an open file of ckpt's own: it moves."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after off
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        off = end


def read_contents(fd: int, size: int, out: pb.MemFd) -> None:
    for start, length in data_runs(fd, size):
        for off in range(start, start + length, READ_CHUNK):
            want = min(READ_CHUNK, start + length - off)
            data = os.pread(fd, want, off)
            if data:
                out.data.add(offset=off, data=data)


def collect(info: FdInfo, found: Any, peek: Peek, out: pb.OpenFile) -> None:
    with reading(peek, info.fd) as fd:
        save(fd, info.target, out)


def save(fd: int, target: str, out: pb.OpenFile) -> None:
    """The object (its inode), size, mode, times, owner, name and seals of a memfd, and
    the contents, read through ``fd`` (an open file of ckpt's own: it moves); ``target``
    is its link or mapped path."""
    st = os.fstat(fd)
    out.object = st.st_ino
    out.size, out.mode, out.mtime_ns = st.st_size, st.st_mode, st.st_mtime_ns
    m = out.memfd
    m.uid, m.gid, m.atime_ns = st.st_uid, st.st_gid, st.st_atime_ns
    if target.startswith(MEMFD_PREFIX):
        m.name = memfd_name(target)
        m.seals = fcntl.fcntl(fd, F_GET_SEALS)
    read_contents(fd, st.st_size, m)


# --------------------------------------------------------------------------- restore


def fill(fd: int, f: pb.OpenFile) -> None:
    """Contents, size, mode, owner and times of a fresh file (seals come after)."""
    for chunk in f.memfd.data:
        os.pwrite(fd, chunk.data, chunk.offset)
    os.ftruncate(fd, f.size)
    os.fchown(fd, f.memfd.uid, f.memfd.gid)  # before the mode: a chown clears S_ISUID
    os.fchmod(fd, stat.S_IMODE(f.mode))
    os.utime(fd, ns=(f.memfd.atime_ns, f.mtime_ns))


def make_memfd(f: pb.OpenFile, owner: contextlib.AbstractContextManager[None],
               seal: bool = True) -> int:
    """The memfd again, created in ``owner`` (as the process) and filled as ckpt (its
    owner may be one the process cannot give it: a memfd made before a setuid); sealed
    unless ``seal`` is False (a mapping must come first: ckpt.collect.mappedfiles)."""
    with owner:
        fd = os.memfd_create(f.memfd.name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        fill(fd, f)
        if seal and f.memfd.seals:
            fcntl.fcntl(fd, F_ADD_SEALS, f.memfd.seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_ghost(f: pb.OpenFile) -> int:
    path = ghost_path(f.path)
    directory = os.path.dirname(path) or "/"
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        raise RestoreError(f"deleted file {path}: its directory {directory} is gone; "
                           "cannot make the file again") from None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise RestoreError(f"deleted file {path}: cannot make a file in {directory}: "
                               f"{exc.strerror}") from None
        fd, name = tempfile.mkstemp(dir=directory)  # a filesystem without O_TMPFILE
        os.unlink(name)
    try:
        fill(fd, f)
    except BaseException:
        os.close(fd)
        raise
    return fd


def object_key(f: pb.OpenFile) -> tuple[str, int]:
    """Its key in RestoreCtx.objects: open files (and mappings) of one inode share it."""
    return ("memfd" if f.type == pb.OpenFile.MEMFD else f"ghost {f.dev}", f.object)


def make(f: pb.OpenFile, owner: contextlib.AbstractContextManager[None],
         seal: bool = True) -> int:
    """The memfd or deleted file of ``f`` made again, an fd of ckpt (O_RDWR); a memfd is
    made in ``owner`` (RestoreCtx.as_owner: as the process)."""
    try:
        return make_memfd(f, owner, seal) if f.type == pb.OpenFile.MEMFD else make_ghost(f)
    except OSError as exc:
        raise RestoreError(f"cannot make {f.path} again: {exc.strerror or exc}") from None


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    key = object_key(f)
    if key not in ctx.objects:  # a mapped one is made before the memory
        ctx.objects[key] = ctx.hold(make(f, ctx.as_owner()))
    fd = ctx.hold(os.open(f"/proc/self/fd/{ctx.objects[key]}",
                          (f.flags & ~NOT_REOPENED) | os.O_CLOEXEC))
    if f.pos and not f.flags & os.O_PATH:
        os.lseek(fd, f.pos, os.SEEK_SET)
    return Opened(fd)


# another process holding the file (a Wayland pool) would keep the old one: by inode
MEMFD = FdKind("memfd", pb.OpenFile.MEMFD, claims_memfd, collect, restore, inspect,
               refuse_memfd, holders=Sharing.INODE)
GHOST = FdKind("ghost", pb.OpenFile.GHOST, claims_ghost, collect, restore, inspect,
               refuse_ghost, holders=Sharing.INODE)
