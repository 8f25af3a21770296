"""What every fd kind provides, and what it is given.

An fd kind (a pipe, a unix socket, an eventfd, ...) is one module of this package holding
its collector and its restorer side by side, registered as one :class:`FdKind` row of
``ckpt.collect.fdkinds.KINDS``. Each stage calls one of its functions:

    stage                 function   sees                                 may
    dump preflight and    inspect    the fd's record, a :class:`Peek`     look at the live
    again while frozen                (a copy of the fd, every fd)         object, read only
                          refuse     the record, what inspect found,      nothing: pure
                                     the dump's :class:`FdFlags`
    dump, frozen          collect    the same, and the OpenFile message   fill its payload
    restore               restore    :class:`RestoreCtx`, the message     make the object
    restore, once every   finish     the same, and its lowest fd number   calls that need
    fd is in place                   in the restored process               other fds (epoll)

Most objects are made in ckpt's own process (``os.pipe2``, ``socket.socket``, ...), as
the process's ids and groups (``with ctx.as_owner():``, not as root), and then taken by
the restored process with pidfd_getfd(2): ``Opened(fd, in_ckpt=True)``. A
kind that must act as the restored process itself (an open() by path, a POSIX lock) runs
syscalls in it through ``ctx.remote`` and returns ``Opened(fd, in_ckpt=False)``.

Whether another process holds the same object (a socket, an eventfd, a memfd, ...) is
the framework's business, not inspect's: ``FdKind.holders`` says how to compare
(ckpt.collect.holders), :meth:`Peek.holders` finds them, ckpt.collect.restorable refuses
them. A kind that decides itself what other holders mean (a pipe: external) says OWN
and asks :meth:`Peek.holders` in its inspect.

The OpenFile messages are this package's image boundary: a collector writes its kind's
payload message (proto/core.proto, one per kind), a restorer reads it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import (
    Link,
    Mapped,
    Sharing,
    TreeView,
    holders_of,
    scan_links,
    scan_maps,
)
from ckpt.errors import NoSuchProcess
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import FsIdentity, made_as
from ckpt.kernel.sys import pidfd_getfd, pidfd_open


class Remote(Protocol):
    """The process being restored, driven by injected syscalls (ckpt.restore.stub.Stub)."""

    pid: int

    def sc(self, nr: int, *args: int, what: str = "", check: bool = True) -> int: ...

    def put(self, data: bytes, off: int = 0) -> int: ...

    def put_str(self, s: str, off: int = 0) -> int: ...


HOLDERS = "holders.links"  # Peek.memo: every other process's fds, by link text
HOLDERS_MAPS = "holders.maps"  # ... and their mappings of deleted files, by path
DELETED = " (deleted)"
GHOST_LIMIT = 1 << 20  # default --ghost-limit, bytes
#: open(2) flags that only meant something to the open that made the file: a reopen drops
#: them (O_TMPFILE without its O_DIRECTORY part, which a directory's fd keeps)
NOT_REOPENED = (os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY
                | os.O_TMPFILE & ~os.O_DIRECTORY)


@dataclass(frozen=True)
class FdFlags:
    """The dump's options that decide what an fd kind accepts."""

    shell_job: bool = False  # a terminal on fds 0-2 is taken from the restoring shell
    tcp_close: bool = False  # established TCP connections are restored closed
    ghost_limit: int = GHOST_LIMIT  # bytes: largest deleted file or memfd saved
    # objects held outside the process may be recorded as external (a restore takes them
    # from --inherit-fd); not where the restore is on another host (migrate)
    externals: bool = True
    # the restore is on another host (migrate): sockets of another network namespace are
    # taken into the destination's; System V shared memory, mapped memfds and deleted
    # files, a deleted working directory are refused (not carried yet by a warm restore)
    migrating: bool = False
    # ... and the destination restores cold, from the final dump's images (a tree's
    # migration): System V shared memory and mapped memfds and deleted files travel in
    # them as in a dump
    cold: bool = False

    @property
    def warm_migration(self) -> bool:
        """A migration whose destination maps memory pass by pass (one process)."""
        return self.migrating and not self.cold


class Peek:
    """Read-only access to a live process's fds: its fd records, and a copy of any fd
    taken into ckpt with pidfd_getfd(2) (the same open file: what ckpt does to it, the
    process sees)."""

    def __init__(self, pid: int, fds: Sequence[FdInfo],
                 memo: dict[Any, Any] | None = None, tree: TreeView | None = None) -> None:
        self.pid = pid
        self.fds = {i.fd: i for i in fds}
        self.tree = tree or TreeView((pid,), {pid: fds})
        self._pidfd = -1
        # what a kind reads once for all the fds it inspects in this pass (one /proc scan,
        # a table of every socket), by a key of its own; a dump passes one memo to the
        # check and the collection it makes while frozen, which then read each once
        self.memo: dict[Any, Any] = {} if memo is None else memo

    def holders(self, info: FdInfo, how: Sharing) -> tuple[int, ...]:
        """The other processes (not this one, not ckpt) that hold the object of fd
        ``info``, compared ``how`` (ckpt.collect.holders). Every process's fd links are
        read once per Peek, for all the fds asked about."""
        if how is Sharing.OWN:
            return ()
        exclude = {self.pid, os.getpid(), *self.tree.pids}
        links: dict[str, list[Link]] | None = self.memo.get(HOLDERS)
        if links is None:
            wanted = {i.target for fds in self.tree.fds.values() for i in fds}
            wanted |= {i.target for i in self.fds.values()}
            links = self.memo[HOLDERS] = scan_links(wanted, exclude)
        mapped: dict[str, list[Mapped]] = {}
        if how is Sharing.INODE and info.target.endswith(DELETED):  # a memfd, a ghost
            mapped = self.memo.get(HOLDERS_MAPS, {})
            if HOLDERS_MAPS not in self.memo:
                wanted = {i.target for fds in self.tree.fds.values() for i in fds
                          if i.target.endswith(DELETED)}
                wanted |= {i.target for i in self.fds.values() if i.target.endswith(DELETED)}
                mapped = self.memo[HOLDERS_MAPS] = scan_maps(wanted, exclude)
        return holders_of(how, self.pid, info, links.get(info.target, []),
                          mapped=mapped.get(info.target, []))

    @contextlib.contextmanager
    def getfd(self, fd: int) -> Iterator[int]:
        """A copy of the process's ``fd`` in ckpt, closed on exit."""
        if self._pidfd < 0:
            self._pidfd = pidfd_open(self.pid)
        try:
            local = pidfd_getfd(self._pidfd, fd, self.pid)
        except OSError as exc:  # pragma: no cover - raced with close
            raise NoSuchProcess(self.pid, f"fd {fd}") from exc
        try:
            yield local
        finally:
            os.close(local)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __enter__(self) -> Peek:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Opened:
    """What a restorer made: ``fd`` in ckpt (to be taken by the restored process) or
    already in the restored process."""

    fd: int
    in_ckpt: bool = True


def fs_identity(entry: pb.ProcessEntry) -> FsIdentity:
    """Whose file access the restored process has: its leader's, as dumped."""
    c = entry.threads[0].creds
    return FsIdentity(c.fsuid, c.fsgid, tuple(c.groups), c.cap_eff)


@dataclass
class RestoreCtx:
    """Shared by the restorers of one process."""

    remote: Remote
    entry: pb.ProcessEntry
    # --inherit-fd: external object name ("pipe:[123]") -> fd of ckpt that stands for it
    inherit: dict[str, int] = field(default_factory=dict)
    # objects made once for several open files, by (kind, OpenFile.object): what the
    # first restorer made and the next ones use (a pipe's other end, a socketpair's peer)
    objects: dict[tuple[str, int], Any] = field(default_factory=dict)
    # fds of ckpt to close once the restore is done
    keep: list[int] = field(default_factory=list)
    # fd number in the restored process of each OpenFile, by id (lowest of its fds)
    placed: dict[int, int] = field(default_factory=dict)
    # a tree's restore: every member's open files (a pipe's bytes may be carried by
    # another member's end); ``objects`` and ``keep`` are then the tree's (TreeScope)
    tree_files: Sequence[pb.OpenFile] = ()

    @property
    def all_files(self) -> Sequence[pb.OpenFile]:
        """The open files of the dump: every member's in a tree, else the process's."""
        return self.tree_files or self.entry.files

    def as_owner(self, fsuid: int | None = None) -> contextlib.AbstractContextManager[None]:
        """A block in which ckpt's thread makes objects as the process would: its real
        uid, filesystem uid (``fsuid`` if given: a socket's owner) and gid and groups
        (ckpt.kernel.creds.made_as), so the object carries them, not root's."""
        return made_as_process(self.entry, fsuid)

    def hold(self, fd: int) -> int:
        """Keep ckpt's ``fd`` open until the restore ends; return it."""
        self.keep.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.keep.clear()


@dataclass
class TreeScope:
    """What the restorers of a tree's members share, alive until every member is
    restored: the objects made once for several members (a pipe between two of them),
    ckpt's fds kept for them, and every member's open files."""

    files: list[pb.OpenFile] = field(default_factory=list)
    objects: dict[tuple[str, int], Any] = field(default_factory=dict)
    keep: list[int] = field(default_factory=list)
    members: tuple[int, ...] = ()  # every member's pid (an fd's owner may be another's)
    # members whose fds are in place, and those fds: what a later member may take
    # (OpenFile.shared_pid, shared_fd); nothing else, whatever an image says
    restored: dict[int, frozenset[int]] = field(default_factory=dict)

    def close(self) -> None:
        for fd in self.keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.keep.clear()
        self.objects.clear()


def made_as_process(entry: pb.ProcessEntry, fsuid: int | None = None,
                    ) -> contextlib.AbstractContextManager[None]:
    """RestoreCtx.as_owner, for who makes objects before the RestoreCtx exists (mapped
    memfds: ckpt.collect.mappedfiles)."""
    if not entry.threads:
        return contextlib.nullcontext()
    c = entry.threads[0].creds
    return made_as(c.uid, c.fsuid if fsuid is None else fsuid, c.fsgid, tuple(c.groups))


Inspect = Callable[[FdInfo, Peek], Any]
Refuse = Callable[[FdInfo, Any, FdFlags], "str | None"]
Collect = Callable[[FdInfo, Any, Peek, pb.OpenFile], None]
Restore = Callable[[RestoreCtx, pb.OpenFile], Opened]
Finish = Callable[[RestoreCtx, pb.OpenFile, int], None]


def nothing(info: FdInfo, peek: Peek) -> None:
    """An ``inspect`` for kinds that need no more than the fd's record."""
    return None


def accept(info: FdInfo, details: Any, flags: FdFlags) -> str | None:
    """A ``refuse`` for kinds with no refused state."""
    return None


@dataclass(frozen=True)
class FdKind:
    """One row of the fd kind table: how to recognise, judge, save and rebuild a kind.

    ``claims`` is given the fd's record and, for kinds told apart only live (socket
    families), a Peek; it must not fail on records of other kinds.
    """

    name: str  # shown by `ckpt show` and in refusals
    image_type: int  # pb.OpenFile.Type
    claims: Callable[[FdInfo, Peek | None], bool]
    collect: Collect
    restore: Restore
    inspect: Inspect = nothing
    refuse: Refuse = accept
    finish: Finish | None = None
    # how other processes holding the same object are found; any is refused before the
    # freeze (ckpt.collect.restorable), but for OWN: the kind judges them in refuse
    holders: Sharing = Sharing.OPEN_FILE
