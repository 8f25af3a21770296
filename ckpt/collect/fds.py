"""Open file descriptors of a process: /proc/PID/fd, /proc/PID/fdinfo, and kcmp(2).

:func:`read_fds` describes each fd; :func:`group_open_files` finds the fds that share one
open file description (dup(), ``2>&1``), which a restore must recreate with dup() rather
than a second open() so that they keep sharing the file position and status flags.
"""

from __future__ import annotations

import os
import stat as st
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ckpt.collect.proc import proc_errors, proc_path
from ckpt.errors import NoSuchProcess
from ckpt.kernel.sys import NR, syscall

O_CLOEXEC = 0o2000000
KCMP_FILE = 0

#: Character-device majors of terminals: 4 (tty, ttyS), 5 (/dev/tty, console, ptmx),
#: 136-143 (Unix98 pty slaves, /dev/pts/N).
TTY_MAJORS = frozenset({4, 5, *range(136, 144)})
DEV_NULL = os.makedev(1, 3)

StatFn = Callable[[str], os.stat_result]
SameFile = Callable[[int, int], bool]


@dataclass(frozen=True)
class FdInfo:
    """One fd: link target, /proc/PID/fdinfo/N fields and stat() of the open file."""

    fd: int
    target: str  # "/path", "pipe:[123]", "socket:[456]", "anon_inode:[eventfd]", ...
    pos: int
    flags: int  # open flags, O_CLOEXEC included
    mnt_id: int
    ino: int | None  # "ino:" of fdinfo (kernels >= 5.14)
    st_mode: int
    st_dev: int
    st_ino: int
    st_rdev: int
    st_size: int
    extra: tuple[tuple[str, str], ...] = ()  # other fdinfo lines (eventfd-count, lock, ...)
    st_mtime_ns: int = 0

    @property
    def cloexec(self) -> bool:
        return bool(self.flags & O_CLOEXEC)


def parse_fdinfo(text: str) -> tuple[int, int, int, int | None, tuple[tuple[str, str], ...]]:
    """Parse /proc/PID/fdinfo/N into (pos, flags, mnt_id, ino, other lines)."""
    pos, flags, mnt_id = 0, 0, -1
    ino: int | None = None
    extra: list[tuple[str, str]] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "pos":
            pos = int(value)
        elif key == "flags":
            flags = int(value, 8)
        elif key == "mnt_id":
            mnt_id = int(value)
        elif key == "ino":
            ino = int(value)
        else:
            extra.append((key, value))
    return pos, flags, mnt_id, ino, tuple(extra)


def read_fd(pid: int, fd: int, *, root: str = "/proc", stat: StatFn = os.stat) -> FdInfo:
    """Describe one fd of ``pid``; ``stat`` follows /proc/PID/fd/N to the open file."""
    link = proc_path(root, pid, "fd", str(fd))
    with proc_errors(pid, f"fd {fd}"):
        target = os.readlink(link)
        with open(proc_path(root, pid, "fdinfo", str(fd)), "rb") as f:
            info = f.read().decode("utf-8", "surrogateescape")
        s = stat(link)
    pos, flags, mnt_id, ino, extra = parse_fdinfo(info)
    return FdInfo(fd=fd, target=target, pos=pos, flags=flags, mnt_id=mnt_id, ino=ino,
                  st_mode=s.st_mode, st_dev=s.st_dev, st_ino=s.st_ino, st_rdev=s.st_rdev,
                  st_size=s.st_size, extra=extra, st_mtime_ns=s.st_mtime_ns)


def list_fds(pid: int, *, root: str = "/proc") -> list[int]:
    """Sorted fd numbers from /proc/PID/fd."""
    with proc_errors(pid, "fd"):
        return sorted(int(n) for n in os.listdir(proc_path(root, pid, "fd")) if n.isdigit())


def read_fds(pid: int, *, root: str = "/proc", stat: StatFn = os.stat) -> list[FdInfo]:
    """Describe every fd of ``pid``, sorted by number.

    An fd closed while we look is skipped; the process vanishing raises NoSuchProcess.
    ``stat`` is replaceable for captured trees, whose fd links are plain symlinks that
    may dangle ("pipe:[123]").
    """
    out = []
    for fd in list_fds(pid, root=root):
        try:
            out.append(read_fd(pid, fd, root=root, stat=stat))
        except NoSuchProcess:
            if os.path.exists(proc_path(root, pid, "fd")) and not os.path.lexists(
                    proc_path(root, pid, "fd", str(fd))):
                continue  # this fd was closed; the process is still there
            raise
    return out


def _share_key(info: FdInfo) -> tuple[int, int, int, int, int]:
    # O_CLOEXEC belongs to the fd, not to the open file: dup2() clears it on the copy.
    return (info.st_dev, info.st_ino, info.mnt_id, info.pos, info.flags & ~O_CLOEXEC)


def group_open_files(fds: Sequence[FdInfo], same_file: SameFile) -> list[list[int]]:
    """Partition fds into groups sharing one open file description.

    Only fds with equal (st_dev, st_ino, mnt_id, pos, flags without O_CLOEXEC) can share a
    file; ``same_file(fd1, fd2)`` (kcmp in practice) decides among those.  Every fd is in
    exactly one group; groups are sorted, each by fd, so the first fd is the lowest.
    """
    buckets: dict[tuple[int, int, int, int, int], list[list[int]]] = {}
    groups: list[list[int]] = []
    for info in sorted(fds, key=lambda i: i.fd):
        candidates = buckets.setdefault(_share_key(info), [])
        for group in candidates:
            if same_file(group[0], info.fd):
                group.append(info.fd)
                break
        else:
            group = [info.fd]
            candidates.append(group)
            groups.append(group)
    return groups


def kcmp_same_file(pid: int) -> SameFile:
    """``same_file`` for :func:`group_open_files` using kcmp(pid, pid, KCMP_FILE, a, b)."""

    def same_file(fd1: int, fd2: int) -> bool:
        res = syscall(NR.kcmp, pid, pid, KCMP_FILE, fd1, fd2,
                      what=f"kcmp(KCMP_FILE, {fd1}, {fd2})", pid=pid)
        return res == 0

    return same_file


def open_file_groups(pid: int, *, root: str = "/proc") -> list[list[int]]:
    """Read the fds of a live ``pid`` and group them with kcmp(2)."""
    return group_open_files(read_fds(pid, root=root), kcmp_same_file(pid))


def classify_fd(info: FdInfo) -> str:
    """One of "regular", "dev_null", "tty", "pipe", "socket", "anon_inode", "directory",
    "chardev", "other"."""
    target, mode = info.target, info.st_mode
    if target.startswith("pipe:[") or st.S_ISFIFO(mode):
        return "pipe"
    if target.startswith("socket:[") or st.S_ISSOCK(mode):
        return "socket"
    if target.startswith("anon_inode:"):
        return "anon_inode"
    if st.S_ISCHR(mode):
        if info.st_rdev == DEV_NULL:
            return "dev_null"
        if os.major(info.st_rdev) in TTY_MAJORS:
            return "tty"
        return "chardev"
    if st.S_ISDIR(mode):
        return "directory"
    if st.S_ISREG(mode):
        return "regular"
    return "other"


#: How a refusal names each kind of classify_fd
FD_KIND_NOUNS = {"regular": "regular file", "dev_null": "/dev/null", "anon_inode": "anon inode",
                 "chardev": "character device", "other": "special file"}


def describe_fd(info: FdInfo) -> str:
    """"fd 5 is a socket (socket:[1234])": the start of a refusal message."""
    kind = classify_fd(info)
    noun = FD_KIND_NOUNS.get(kind, kind)
    article = "an" if noun[0] in "aeiou" else "a"
    return f"fd {info.fd} is {article} {noun} ({info.target})"
