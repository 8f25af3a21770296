"""inotify(7): every watch by the path of its inode, its mask and its watch descriptor.

/proc/PID/fdinfo/N holds one line per watch (numbers in hex):

    inotify wd:4 ino:3f7e8 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8
        fhandle-type:1 f_handle:e8f7030000000000

The inode is named by a file handle: ckpt opens it with open_by_handle_at(2) through a
mount of that device (from its own /proc/self/mountinfo: restore works in ckpt's mount
namespace) and takes the path from /proc/self/fd/N, checked to name that very inode.

The process knows its watches by their wd, so a restore must give each the same one. The
kernel hands wds out cyclically (1, 2, 3, ..., never the lowest free one), so restore
adds the watches in wd order, and fills each gap with a watch on a scratch directory of
its own, removed at once; the IN_IGNORED events those removals queue are read away before
the process takes the fd. The next wd the restored process gets is the one after its
highest (it would have been one after the highest it ever had). Each watch is added by a
thread of ckpt with the process's filesystem identity (FsIdentity.run): the process must
still be allowed to read the path, as inotify_add_watch(2) asks; root always is.

Refused before the freeze, naming the fd: events queued and not read yet (a restore
cannot queue them again), a watched inode without a path (deleted, or on no mount ckpt
sees), a wd above MAX_WD (that many filler watches).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds.base import FdKind, Opened, Peek, RestoreCtx, fs_identity
from ckpt.collect.fds import FdInfo
from ckpt.errors import KernelError, NotDumpable, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.anonfd import (
    IN_DONT_FOLLOW,
    inotify_add_watch,
    inotify_init1,
    inotify_rm_watch,
    open_by_handle_at,
    queued_bytes,
)
from ckpt.kernel.creds import FsIdentity

MAX_WD = 1 << 16
IN_ALL_EVENTS = 0xFFF
FIELD = re.compile(r"([a-z_-]+):([0-9a-f]+)")


@dataclass(frozen=True)
class Mark:
    """One watch line of an inotify fdinfo."""

    wd: int
    ino: int
    dev: int  # st_dev encoding (the line's sdev is the kernel's: major << 20 | minor)
    mask: int
    handle_type: int
    handle: bytes


def kernel_dev(sdev: int) -> int:
    """A kernel dev_t (fdinfo's sdev) as st_dev."""
    return os.makedev(sdev >> 20, sdev & 0xFFFFF)


def parse(info: FdInfo) -> list[Mark]:
    """The watches of an inotify fdinfo, by wd."""
    out = []
    for key, value in info.extra:
        if key != "inotify wd":
            continue
        fields = dict(FIELD.findall("wd:" + value))
        try:
            out.append(Mark(wd=int(fields["wd"], 16), ino=int(fields["ino"], 16),
                            dev=kernel_dev(int(fields["sdev"], 16)),
                            mask=int(fields["mask"], 16),
                            handle_type=int(fields.get("fhandle-type", "0"), 16),
                            handle=bytes.fromhex(fields.get("f_handle", ""))))
        except (KeyError, ValueError):
            raise NotDumpable(f"fd {info.fd}: unexpected inotify fdinfo line "
                              f"'inotify wd:{value}'") from None
    return sorted(out, key=lambda m: m.wd)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_points(mountinfo: str, dev: int) -> list[str]:
    """Mount points of device ``dev`` (st_dev) in a /proc/PID/mountinfo text."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        if os.makedev(int(major), int(minor)) == dev:
            out.append(_unescape(fields[4]))
    return out


def resolve(m: Mark, mountinfo: str) -> str | None:
    """The path (in ckpt's mount namespace) of the inode a watch is on, or None."""
    for point in mount_points(mountinfo, m.dev):
        with contextlib.ExitStack() as stack:
            try:
                mfd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)  # not O_PATH: EBADF
                stack.callback(os.close, mfd)
                fd = open_by_handle_at(mfd, m.handle_type, m.handle, os.O_PATH)
                stack.callback(os.close, fd)
                path = os.readlink(f"/proc/self/fd/{fd}")
                st = os.stat(path, follow_symlinks=False)
            except (OSError, KernelError):
                continue
            if (st.st_dev, st.st_ino) == (m.dev, m.ino):
                return path
    return None


@dataclass(frozen=True)
class Found:
    """What inspect saw: the watches with their paths (None: none found), bytes queued."""

    marks: tuple[tuple[Mark, str | None], ...]
    queued: int


def claims(info: FdInfo, peek: Peek | None) -> bool:
    return info.target == "anon_inode:inotify"


def inspect(info: FdInfo, peek: Peek) -> Found:
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    with peek.getfd(info.fd) as local:
        queued = queued_bytes(local)
    return Found(tuple((m, resolve(m, mountinfo)) for m in parse(info)), queued)


def refuse(info: FdInfo, details: Found, flags: Any) -> str | None:
    if details.queued:
        return (f"{details.queued} bytes of inotify events are queued, not read yet: a "
                "restore cannot queue them again")
    for m, path in details.marks:
        if path is None:
            return (f"its watch {m.wd} is on inode {m.ino} of device "
                    f"{os.major(m.dev)}:{os.minor(m.dev)}, which has no path ckpt can see "
                    "(deleted, or on no mount of ckpt's)")
        if m.wd > MAX_WD:
            return f"its watch descriptor {m.wd} is above {MAX_WD}, the most a restore makes"
    return None


def collect(info: FdInfo, details: Found, peek: Peek, out: pb.OpenFile) -> None:
    for m, path in details.marks:
        out.inotify.watches.add(wd=m.wd, mask=m.mask, path=path or "", dev=m.dev,
                                inode=m.ino)


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    with ctx.as_owner():
        fd = ctx.hold(inotify_init1(f.flags & os.O_NONBLOCK))
    who = fs_identity(ctx.entry)
    filler = tempfile.mkdtemp(prefix="ckpt-inotify-")
    try:
        wd = 0
        for w in sorted(f.inotify.watches, key=lambda w: w.wd):
            while wd + 1 < w.wd:
                wd = inotify_add_watch(fd, filler, IN_ALL_EVENTS)
                inotify_rm_watch(fd, wd)
            _check_same(w)
            wd = _watch(fd, w, who)
            if wd != w.wd:
                raise RestoreError(f"inotify watch of {w.path} got wd {wd}, not {w.wd}")
        queued = queued_bytes(fd)  # the fillers' IN_IGNORED
        while queued:
            queued -= len(os.read(fd, queued))
    finally:
        shutil.rmtree(filler, ignore_errors=True)
    return Opened(fd)


def _watch(fd: int, w: pb.InotifyWatch, who: FsIdentity) -> int:
    """Add the watch ``w`` as the restored process itself would (a thread of ckpt with its
    filesystem identity): inotify_add_watch(2) needs read permission on the path, which
    root, unlike the process, always has."""
    def add() -> int:
        return inotify_add_watch(fd, w.path, w.mask | IN_DONT_FOLLOW)

    try:
        return add() if who.unrestricted else who.run(add)
    except KernelError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise RestoreError(f"inotify watch {w.wd}: uid {who.fsuid} may not read "
                               f"{w.path}, so may not watch it: the restored process would "
                               "gain access; refused") from None
        raise RestoreError(f"inotify watch {w.wd} on {w.path}: {exc}") from None


def _check_same(w: pb.InotifyWatch) -> None:
    try:
        st = os.stat(w.path, follow_symlinks=False)
    except OSError:
        raise RestoreError(f"inotify watch {w.wd}: {w.path} is missing") from None
    if st.st_dev == w.dev and st.st_ino != w.inode:  # another device: another host's
        raise RestoreError(f"inotify watch {w.wd}: {w.path} is another file than at the dump "
                           f"(inode {st.st_ino}, was {w.inode})")


KIND = FdKind("inotify", pb.OpenFile.INOTIFY, claims, collect, restore, inspect, refuse)
