"""Open files: every open file description is opened once and dup'ed onto each of its fds,
so fds that shared an offset (dup, `>out 2>&1`) share it again.

The stub starts with ckpt's fds. All but 0-2 are closed at once; 0-2 are parked above every
fd of the image so that INHERITED files (--shell-job) can take ckpt's terminal from them,
and closed at the end.

Once every fd is in place, each open file gets its status flags (O_ASYNC, ...) and signal
back, whatever its kind (ckpt.collect.fdkinds.fown); its owner waits for the threads and
the credentials (restore_owners, called once they are set). Once nothing more is closed,
the restored process takes the file locks and leases of its files again
(ckpt.collect.fdkinds.locks).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterable

from ckpt.collect.fdkinds import BY_TYPE, fown
from ckpt.collect.fdkinds.base import NOT_REOPENED, RestoreCtx, TreeScope, fs_identity
from ckpt.collect.fdkinds.locks import restore_locks
from ckpt.errors import CkptError, RestoreError
from ckpt.images.fields import NR_OPEN_MAX
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import NR, pidfd_getfd, pidfd_open
from ckpt.restore.stub import Stub
from ckpt.restore.taker import Taker

F_DUPFD, F_SETFD, FD_CLOEXEC, F_GETFL, F_SETFL = 0, 2, 1, 3, 4
O_CLOEXEC = 0o2000000
SEEK_SET = 0


def file_change(f: pb.OpenFile, st: os.stat_result | None) -> str | None:
    """How a regular file changed since the dump in a way its reopened fd would not
    survive, or None.

    Refused: a file missing, replaced (another inode on the same device), shrunk (the
    offset may lie past its end: the process writes NULs), or modified in place (another
    mtime at the same size). A file that grew is fine for an O_APPEND writer (an
    append-only log: it writes at the end anyway) and for a reader (it reads on, as it
    would have), and refused for any other writer, which would overwrite what was
    appended. Images of older versions (no inode recorded) are not checked.
    """
    if f.type != pb.OpenFile.REGULAR or not stat.S_ISREG(f.mode) or not f.inode:
        return None
    if st is None:
        return "is missing"
    if st.st_dev == f.dev and st.st_ino != f.inode:
        return f"was replaced (inode {f.inode} is now {st.st_ino})"
    if st.st_size < f.size:
        return f"shrank from {f.size} to {st.st_size} bytes"
    writer = f.flags & os.O_ACCMODE != os.O_RDONLY
    if st.st_size > f.size and writer and not f.flags & os.O_APPEND:
        return f"grew from {f.size} to {st.st_size} bytes (not opened O_APPEND)"
    if st.st_size == f.size and st.st_mtime_ns != f.mtime_ns:
        return "was modified (same size, another mtime)"
    return None


FILE_TYPE_NOUNS = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory",
                   stat.S_IFCHR: "character device"}


def type_change(then: int, now: int) -> str | None:
    """A file reopened by path whose type (st_mode) changed since the dump, or None: a
    regular file or directory now a FIFO would hang the restore (opened by root), a
    device would be set off."""
    was = stat.S_IFMT(then)
    if was not in FILE_TYPE_NOUNS or stat.S_IFMT(now) == was:
        return None
    return f"(a {FILE_TYPE_NOUNS[was]} at dump time) is not one now"


def check_files(entry: pb.ProcessEntry,
                stat_fn: Callable[[str], os.stat_result] = os.stat) -> None:
    """Refuse, before anything is built, files that changed since the dump (file_change),
    naming the fds and the path; ``ckpt restore --skip-file-check`` skips this."""
    for f in entry.files:
        try:
            st: os.stat_result | None = stat_fn(f.path)
        except OSError:
            st = None
        why = file_change(f, st)
        if why is not None:
            fds = ", ".join(str(fd.fd) for fd in entry.fds if fd.file_id == f.id)
            raise RestoreError(f"fd {fds}: {f.path} {why} since the dump; "
                               "--skip-file-check restores anyway")


INHERIT_FD = re.compile(r"fd\[(\d+)\]:(.+)")


def parse_inherit_fd(spec: str) -> tuple[str, int]:
    """``--inherit-fd fd[N]:NAME`` (CRIU's syntax) as (NAME, N); RestoreError if malformed
    or N is not an fd number the kernel could give."""
    m = INHERIT_FD.fullmatch(spec)
    if m is None:
        raise RestoreError(f"--inherit-fd {spec}: not fd[N]:OBJECT (e.g. fd[3]:pipe:[1234])")
    if len(m[1]) > len(str(NR_OPEN_MAX)) or int(m[1]) >= NR_OPEN_MAX:
        raise RestoreError(f"--inherit-fd {spec}: fd {m[1]} is out of range "
                           f"(0..{NR_OPEN_MAX - 1})")
    return m[2], int(m[1])


def parse_inherit_fds(specs: Iterable[str]) -> dict[str, int]:
    """Every ``--inherit-fd`` as {object: fd}; RestoreError if one is malformed or an
    object is named twice."""
    inherit: dict[str, int] = {}
    for spec in specs:
        name, fd = parse_inherit_fd(spec)
        if name in inherit:
            raise RestoreError(f"--inherit-fd: {name} is given twice "
                               f"(fd {inherit[name]} and fd {fd})")
        inherit[name] = fd
    return inherit


def inherit_problem(f: pb.OpenFile, inherit: dict[str, int],
                    getfl: Callable[[int], int]) -> str | None:
    """Why the external object of ``f`` cannot be taken from ``inherit``, or None.
    ``getfl``: F_GETFL of an fd of ckpt (OSError if it is not open)."""
    if not f.external:
        return None
    if f.external not in inherit:
        return (f"{f.external} is external (its peer was outside the dump): restore needs "
                f"--inherit-fd fd[N]:{f.external}, N an fd of ckpt standing for it")
    n = inherit[f.external]
    try:
        mode = getfl(n) & os.O_ACCMODE
    except OSError:
        return f"--inherit-fd fd[{n}]:{f.external}: ckpt has no fd {n}"
    want = f.flags & os.O_ACCMODE
    if mode != os.O_RDWR and mode != want:
        needs = {os.O_RDONLY: "reading", os.O_WRONLY: "writing"}.get(want, "reading and writing")
        return f"--inherit-fd fd[{n}]:{f.external}: fd {n} is not open for {needs}"
    return None


def check_inherit(entry: pb.ProcessEntry, inherit: dict[str, int],
                  getfl: Callable[[int], int] | None = None) -> None:
    """Before anything is built: every external object of the image has its --inherit-fd,
    open in the right mode, and every --inherit-fd names one."""
    getfl = getfl or (lambda fd: fcntl.fcntl(fd, fcntl.F_GETFL))
    for f in entry.files:
        why = inherit_problem(f, inherit, getfl)
        if why is not None:
            fds = ", ".join(str(fd.fd) for fd in entry.fds if fd.file_id == f.id)
            raise RestoreError(f"fd {fds}: {why}")
    unused = set(inherit) - {f.external for f in entry.files}
    if unused:
        name = sorted(unused)[0]
        raise RestoreError(f"--inherit-fd fd[{inherit[name]}]:{name}: the images hold no such "
                           "external object")


def close_stub_fds(stub: Stub) -> None:
    stub.sc(NR.close_range, 3, 0xFFFFFFFF, 0, what="close_range")


def restore_files(stub: Stub, entry: pb.ProcessEntry,
                  inherit: dict[str, int] | None = None,
                  objects: dict[tuple[str, int], int] | None = None,
                  tree: TreeScope | None = None) -> None:
    """Every fd of the image, numbered as it was; ``inherit`` (--inherit-fd) maps an
    external object's name to the fd of ckpt that stands for it; ``objects``: objects
    made before (RestoreCtx.objects: mapped memfds, ckpt.collect.mappedfiles). In a
    tree's restore, ``tree`` holds what the members share (closed by the caller once
    every member is restored), and an open file shared with a member restored before
    (OpenFile.shared_pid) is taken from it: one open file description again."""
    park = max([fd.fd for fd in entry.fds] + [2]) + 1
    for std in range(3):
        stub.sc(NR.fcntl, std, F_DUPFD, park + std, check=False)  # may be closed in ckpt
        stub.sc(NR.close, std, check=False)
    if tree is None:
        ctx = RestoreCtx(stub, entry, dict(inherit or {}), dict(objects or {}))
    else:
        tree.objects.update(objects or {})
        ctx = RestoreCtx(stub, entry, dict(inherit or {}), tree.objects, tree.keep,
                         tree_files=tree.files)
    taker = Taker(stub, park + 3)
    try:
        for f in entry.files:
            fds = [fd for fd in entry.fds if fd.file_id == f.id]
            if not fds:
                continue
            kind = BY_TYPE.get(f.type)
            taken = False  # by pidfd_getfd(2), which sets FD_CLOEXEC
            if f.shared_pid:
                if tree is None or f.shared_fd not in tree.restored.get(f.shared_pid, ()):
                    raise RestoreError(
                        f"fd {fds[0].fd}: the image takes it from fd {f.shared_fd} of "
                        f"process {f.shared_pid}, which is no member of this restore "
                        "restored before it")
                src = taker.take(ctx.hold(member_fd(f.shared_pid, f.shared_fd)),
                                 f"fd {f.shared_fd} of process {f.shared_pid}")
                taken = True
            elif f.type == pb.OpenFile.INHERITED:
                src = park + f.inherit_fd
            elif kind is not None:
                opened = kind.restore(ctx, f)
                taken = opened.in_ckpt
                src = taker.take(opened.fd, kind.name) if taken else opened.fd
            else:
                src = _open(stub, f)
            for fd in fds:
                if fd.fd != src:
                    stub.sc(NR.dup3, src, fd.fd, O_CLOEXEC if fd.cloexec else 0,
                            what=f"dup3 onto fd {fd.fd}")
                elif fd.cloexec or taken:
                    stub.sc(NR.fcntl, src, F_SETFD, FD_CLOEXEC if fd.cloexec else 0,
                            what=f"close-on-exec of fd {fd.fd}")
            if f.type != pb.OpenFile.INHERITED and src not in {fd.fd for fd in fds}:
                stub.sc(NR.close, src, what="close")
            ctx.placed[f.id] = min(fd.fd for fd in fds)
        mine = [f for f in entry.files if not f.shared_pid]  # others: set by their first holder
        for f in mine:  # once every fd is in place (an epoll set names other fds)
            kind = BY_TYPE.get(f.type)
            if kind is not None and kind.finish is not None and f.id in ctx.placed:
                kind.finish(ctx, f, ctx.placed[f.id])
        fown.restore_status(stub, mine, ctx.placed)
    finally:
        if tree is None:
            ctx.close()
        else:
            tree.restored[entry.pid] = frozenset(fd.fd for fd in entry.fds)
    stub.sc(NR.close_range, park, park + 3, 0, what="close_range")
    # after the last close: closing any fd of a file drops the process's POSIX locks on it
    restore_locks(stub, entry.files, ctx.placed, fs_identity(entry))


def member_fd(pid: int, fd: int) -> int:
    """A copy in ckpt of ``fd`` of ``pid``, a member of the tree restored before."""
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd, pid)
    except CkptError as exc:
        raise RestoreError(f"cannot take fd {fd} of restored process {pid}: {exc}") from None
    finally:
        os.close(pidfd)


def _open(stub: Stub, f: pb.OpenFile) -> int:
    if f.type not in (pb.OpenFile.REGULAR, pb.OpenFile.DEV_NULL):  # never opened by path
        raise RestoreError(f"file {f.path}: an open file of type "
                           f"{pb.OpenFile.Type.Name(f.type)}, which this ckpt does not restore")
    path = "/dev/null" if f.type == pb.OpenFile.DEV_NULL else f.path
    if f.type == pb.OpenFile.REGULAR:
        try:
            st = os.stat(path)
        except OSError:
            raise RestoreError(f"file {path} (open at dump time) is missing") from None
        why = type_change(f.mode, st.st_mode)
        if why:
            raise RestoreError(f"file {path} {why}")
    fd = _open_armed(stub, path, f.flags & ~NOT_REOPENED)
    if f.type == pb.OpenFile.REGULAR and f.pos:
        stub.sc(NR.lseek, fd, f.pos, SEEK_SET, what=f"lseek {path}")
    return fd


def _open_armed(stub: Stub, path: str, flags: int) -> int:
    """open(2) ``path`` with ``flags``. O_ASYNC as open(2) sets it is not armed (no
    fasync call: no SIGIO ever comes), so it is set with F_SETFL, which arms it; a file
    without fasync (a regular file) refuses it there, and then only open(2) can have set
    it: it opens again with it."""
    fd = stub.sc(NR.open, stub.put_str(path), flags & ~os.O_ASYNC, 0, what=f"open {path}")
    if flags & os.O_ASYNC:
        now = stub.sc(NR.fcntl, fd, F_GETFL)
        stub.sc(NR.fcntl, fd, F_SETFL, now | os.O_ASYNC, what=f"F_SETFL O_ASYNC of {path}")
        if not stub.sc(NR.fcntl, fd, F_GETFL) & os.O_ASYNC:
            stub.sc(NR.close, fd)
            fd = stub.sc(NR.open, stub.put_str(path), flags, 0, what=f"open {path}")
    return fd


def restore_owners(stub: Stub, entry: pb.ProcessEntry, tids: list[int],
                   members: tuple[int, ...] = ()) -> None:
    """The owner (F_SETOWN) of every open file that had one: the process, one of its
    threads (``tids``: restored, leader first), its process group, as restored, or in a
    tree another of its ``members`` (restored under its own pid)."""
    fown.restore_owners(stub, entry, tids, os.getpgid(stub.pid), members)
