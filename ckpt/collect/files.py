"""Which open files a dump can carry, grouped by open file description.

Supported: regular files, directories and stateless character devices reopened by path
(offset and flags restored: a directory's offset is its getdents position, the
filesystem's own cookie, which lseek takes back; an O_PATH fd is reopened O_PATH),
/dev/null, with ``--shell-job`` a terminal on fds 0-2,
which restore takes from its own stdin/stdout/stderr, and every kind of
ckpt.collect.fdkinds (pipes, sockets, eventfds, ...), whose state is collected here.
Anything else (see ckpt.collect.restorable) stops the dump before the target is frozen,
naming the fd.

fds that share one open file description (``dup``, ``>out 2>&1``) are one ``OpenFile``
with several ``FdEntry``s, so after restore their offset moves together again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds import kind_of
from ckpt.collect.fdkinds.base import FdFlags, Peek
from ckpt.collect.fdkinds.fown import NO_OWNER, Fown, read_fown
from ckpt.collect.fdkinds.locks import collect_locks, refusal
from ckpt.collect.fds import (
    FdInfo,
    classify_fd,
    describe_fd,
    group_open_files,
    kcmp_same_file,
    read_fds,
)
from ckpt.collect.holders import TreeView, shared_before
from ckpt.collect.restorable import fd_refusal
from ckpt.errors import NotDumpable
from ckpt.images.pb import core_pb2 as pb

O_CLOEXEC = 0o2000000


@dataclass(frozen=True)
class FileRecord:
    """One open file description and the fds that refer to it."""

    id: int
    kind: str  # "path", "dev_null", "inherited" or a name of ckpt.collect.fdkinds.KINDS
    path: str
    flags: int  # without O_CLOEXEC
    pos: int
    mode: int
    size: int
    inherit_fd: int
    fds: tuple[tuple[int, bool], ...]  # (fd, cloexec)
    mtime_ns: int = 0
    dev: int = 0
    inode: int = 0
    # collected while frozen: an fd kind's OpenFile fields (type, payload) and the locks
    # held through the file (ckpt.collect.fdkinds.locks)
    payload: pb.OpenFile | None = None
    fown: Fown = NO_OWNER  # owner and signal (ckpt.collect.fdkinds.fown)


def file_kind(info: FdInfo, shell_job: bool) -> str:
    """How restore brings this fd back, for fds no fd kind claims; NotDumpable if it
    cannot (the reasons are ckpt.collect.restorable's table)."""
    why = fd_refusal(info, shell_job)
    if why:
        raise NotDumpable(why)
    kind = classify_fd(info)
    return "inherited" if kind == "tty" else "dev_null" if kind == "dev_null" else "path"


def collect_files(pid: int, shell_job: bool, hidden: set[int] | None = None,
                  root: str = "/proc", flags: FdFlags | None = None,
                  memo: dict[Any, Any] | None = None, tree: TreeView | None = None,
                  ) -> list[FileRecord]:
    """The open files of ``pid``, except ``hidden`` fds (ckpt's own, e.g. a tracker's).
    Call it while the process is frozen: fd kinds read their objects' state. In a tree
    dump (``tree``), an open file description a member before it holds too is recorded
    as that member's (OpenFile.shared_pid, shared_fd) with no state of its own: that
    member's record carries it, and a restore gives both the same description."""
    flags = flags or FdFlags(shell_job=shell_job)
    fds = {i.fd: i for i in read_fds(pid, root=root) if i.fd not in (hidden or set())}
    out = []
    with Peek(pid, list(fds.values()), memo, tree) as peek:
        claimed = {fd: kind_of(info, peek) for fd, info in fds.items()}
        for n, group in enumerate(group_open_files(list(fds.values()), kcmp_same_file(pid)),
                                  1):
            first = fds[group[0]]
            fdkind = claimed[group[0]]
            payload = None
            fown = read_fown(first, peek)
            shared = shared_before(pid, first, tree)
            if shared is not None:
                kind = fdkind.name if fdkind is not None else file_kind(first, shell_job)
                # POSIX locks are the process's own (the first holder's record has its
                # own, flock and OFD locks are the description's: taken with it)
                posix = [lk for lk in collect_locks(first, peek)
                         if lk.kind == pb.FileLock.POSIX]
                payload = pb.OpenFile(
                    type=fdkind.image_type if fdkind is not None  # type: ignore[arg-type]
                    else FILE_TYPES[kind], shared_pid=shared[0], shared_fd=shared[1],
                    locks=posix)
                fown = NO_OWNER  # the description's: set through the first holder
            elif fdkind is None:
                kind = file_kind(first, shell_job)  # refuses the locks it cannot take again
                locks = collect_locks(first, peek)
                payload = pb.OpenFile(locks=locks) if locks else None
            else:
                kind = fdkind.name
                details = fdkind.inspect(first, peek)
                why = refusal(first, reopened=False) or fdkind.refuse(first, details, flags)
                if why:
                    raise NotDumpable(f"{describe_fd(first)}: {why}")
                payload = pb.OpenFile(type=fdkind.image_type)  # type: ignore[arg-type]
                fdkind.collect(first, details, peek, payload)
            out.append(FileRecord(
                id=n, kind=kind, path=first.target, flags=first.flags & ~O_CLOEXEC,
                pos=first.pos, mode=first.st_mode, size=first.st_size,
                inherit_fd=first.fd if kind == "inherited" else -1,
                fds=tuple((fd, bool(fds[fd].flags & O_CLOEXEC)) for fd in group),
                mtime_ns=first.st_mtime_ns, dev=first.st_dev, inode=first.st_ino,
                payload=payload, fown=fown))
    return out


FILE_TYPES = {"path": pb.OpenFile.REGULAR, "dev_null": pb.OpenFile.DEV_NULL,
              "inherited": pb.OpenFile.INHERITED}
