"""The records that decide whether a restore can bring a process back (:class:`Target`),
read from /proc and from the fd kinds' look at the live objects (:func:`read_target`).
ckpt.collect.restorable judges them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ckpt.collect import cgroups, deletedcwd, mappedfiles, proc, sched, shmem, sysvshm
from ckpt.collect.fdkinds import fown, kind_of
from ckpt.collect.fdkinds.base import FdFlags, FdKind, Peek
from ckpt.collect.fds import FdInfo, classify_fd, read_fds
from ckpt.collect.holders import Sharing, TreeView, shared_before
from ckpt.collect.timers import ProcTimer, read_timers
from ckpt.collect.vmas import VmaInfo, VmaKind, collect_vmas
from ckpt.errors import NoSuchProcess
from ckpt.kernel.timers import restore_ids_supported

DELETED = " (deleted)"
FILE_KINDS = frozenset({VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED})
#: Namespaces a restored process must share with ckpt (it is created in ckpt's); a mount
#: namespace may differ as long as the paths agree (Target.foreign), a network one too
#: (migration between network namespaces moves a process on purpose).
CHECKED_NS = ("pid", "user")


@dataclass(frozen=True)
class Target:
    """What decides whether a restore can bring a process back."""

    pid: int
    children: tuple[int, ...]
    cwd: str
    root: str  # /proc/PID/root
    own_root: str  # ckpt's: a restored process gets this one
    mnt_ns: str  # /proc/PID/ns/mnt
    own_mnt_ns: str  # ckpt's
    vmas: tuple[VmaInfo, ...]
    fds: tuple[FdInfo, ...]  # without ckpt's own (a tracker's userfaultfd)
    shell_job: bool  # a terminal on fds 0-2 is taken from the restoring shell
    # Paths (of fds, mapped files, the cwd) that name another file, or none, from ckpt's
    # mount namespace than from the target's; only looked for when the two differ.
    foreign: frozenset[str] = frozenset()
    thread_cwds: tuple[tuple[int, str], ...] = ()  # (tid, cwd) of every thread
    timers: tuple[ProcTimer, ...] = ()  # POSIX timers (timer_create)
    timer_ids_exact: bool = True  # the kernel creates a timer under a given id
    other_ns: tuple[tuple[str, str, str], ...] = ()  # (kind, its, ckpt's): CHECKED_NS differing
    groups: int = 0  # supplementary groups of the leader
    # fds an fd kind (ckpt.collect.fdkinds) claims: (fd, kind, what its inspect found);
    # judged by the kind's refuse under fd_flags, not by FD_RULES
    fd_kinds: tuple[tuple[int, FdKind, object], ...] = ()
    fd_flags: FdFlags = field(default_factory=FdFlags)
    # System V shared memory (ckpt.collect.sysvshm): the IPC namespace's segments, and
    # whether the target's IPC namespace is ckpt's
    shm_segments: tuple[sysvshm.Segment, ...] = ()
    same_ipc_ns: bool = True
    # a tree dump: the other members' attaches (VMAs) of those segments, by shmid
    shm_members: tuple[tuple[int, int], ...] = ()
    policies: tuple[tuple[int, int], ...] = ()  # (tid, scheduling policy): collect.sched
    # (tid, its cgroups) of every thread: ckpt.collect.cgroups
    thread_cgroups: tuple[tuple[int, tuple[cgroups.Membership, ...]], ...] = ()
    tracker: bool = False  # a userfaultfd of ckpt's own is in the process (its "uw")
    # (start, what was seen) of each VMA mapping a memfd or deleted file
    # (ckpt.collect.mappedfiles.inspect)
    mapped: tuple[tuple[int, mappedfiles.Seen], ...] = ()
    # (start, what was seen) of each VMA of anonymous shared memory (ckpt.collect.shmem)
    shmem: tuple[tuple[int, shmem.Seen], ...] = ()
    # a deleted cwd's parent (its "..") is the directory its path names (deletedcwd)
    cwd_parent_reachable: bool = True
    # (fd, pids): other processes holding the fd's object (its kind's FdKind.holders) or,
    # for a file reopened by path, its open file (ckpt.collect.holders); only fds with some
    holders: tuple[tuple[int, tuple[int, ...]], ...] = ()
    # fds whose open file has an owner (F_SETOWN: ckpt.collect.fdkinds.fown), and the
    # process group of the process
    fd_owners: tuple[tuple[int, fown.Fown], ...] = ()
    pgid: int = 0
    sid: int = 0
    # a tree dump: fds whose open file an earlier member holds (judged and saved with
    # it), and every member
    shared_fds: frozenset[int] = frozenset()
    tree: tuple[int, ...] = ()


#: fds reopened by path whose open file is compared with other processes' (kcmp)
SHARED_FILE_KINDS = ("regular", "directory")


def compares_open_file(info: FdInfo) -> bool:
    """Is this fd's open file one whose sharing a restore would lose (a file or directory
    reopened by path, not an O_PATH fd: it has no position, flags or locks)?"""
    return classify_fd(info) in SHARED_FILE_KINDS and not info.flags & os.O_PATH



def read_target(pid: int, shell_job: bool, hidden: set[int],
                vmas: list[VmaInfo] | None = None, flags: FdFlags | None = None,
                memo: dict[Any, Any] | None = None, tree: TreeView | None = None) -> Target:
    """The records :func:`refusals` needs, read from /proc (``vmas`` if already read) and
    from the fd kinds' look at their live objects; in a tree dump (``tree``), what the
    members hold is not another process's."""
    me = os.getpid()
    mnt_ns, own_mnt_ns = proc.read_ns(pid, "mnt"), proc.read_ns(me, "mnt")
    cwd = proc.read_cwd(pid)
    maps = collect_vmas(pid) if vmas is None else vmas
    fds = [i for i in read_fds(pid) if i.fd not in hidden]
    fd_kinds, fd_owners = [], []
    holders = []
    shared: set[int] = set()
    with Peek(pid, fds, memo, tree) as peek:
        for info in fds:
            if shared_before(pid, info, tree) is not None:
                shared.add(info.fd)  # an earlier member's open file: judged with it
                continue
            kind = kind_of(info, peek)
            if kind is not None:
                fd_kinds.append((info.fd, kind, kind.inspect(info, peek)))
            how = (kind.holders if kind is not None
                   else Sharing.OPEN_FILE if compares_open_file(info) else Sharing.OWN)
            others = peek.holders(info, how)
            if others:
                holders.append((info.fd, others))
            owner = fown.read_fown(info, peek)
            if owner.id:
                fd_owners.append((info.fd, owner))
    stat = proc.read_stat(pid)
    ns = {kind: (proc.read_ns(pid, kind), proc.read_ns(me, kind)) for kind in CHECKED_NS}
    foreign: frozenset[str] = frozenset()
    if mnt_ns != own_mnt_ns:
        cwd_id = file_identity(proc.proc_path("/proc", pid, "cwd"))
        seen: list[tuple[str, Identity | None]] = [(cwd, cwd_id)]
        seen += [(v.path, (None, v.inode)) for v in maps if v.kind in FILE_KINDS]
        seen += [(i.target, (i.st_dev, i.st_ino)) for i in fds]
        foreign = frozenset(p for p, there in seen if _is_foreign(p, there))
    tids = proc.list_tasks(pid)
    return Target(
        pid=pid, children=tuple(c for c in proc.list_children(pid)
                                if tree is None or not _member(c, tree)),
        cwd=cwd, root=proc.read_root(pid),
        own_root=proc.read_root(me), mnt_ns=mnt_ns, own_mnt_ns=own_mnt_ns,
        vmas=tuple(maps), fds=tuple(fds), shell_job=shell_job, foreign=foreign,
        thread_cwds=_thread_cwds(pid), timers=tuple(read_timers(pid)),
        timer_ids_exact=restore_ids_supported(),
        other_ns=tuple((kind, its, own) for kind, (its, own) in ns.items() if its != own),
        groups=len(proc.read_status(pid).groups), fd_kinds=tuple(fd_kinds),
        shm_segments=tuple(sysvshm.read_segments().values()) if sysvshm.attaches(maps)
        else (), same_ipc_ns=proc.read_ns(pid, "ipc") == proc.read_ns(me, "ipc"),
        shm_members=tuple(sysvshm.member_attaches(p for p in tree.pids if p != pid).items())
        if tree is not None and sysvshm.attaches(maps) else (),
        policies=tuple(sched.read_policies(tids)),
        mapped=mappedfiles.inspect(pid, maps, tree),
        shmem=shmem.inspect(pid, maps, tree.pids if tree else (pid,), memo),
        cwd_parent_reachable=not deletedcwd.is_deleted(cwd)
        or deletedcwd.parent_reachable(pid, cwd),
        thread_cgroups=tuple((tid, tuple(found)) for tid, found in
                             cgroups.read_thread_cgroups(pid, tids)),
        fd_flags=flags or FdFlags(shell_job=shell_job), tracker=bool(hidden),
        holders=tuple(holders), fd_owners=tuple(fd_owners), shared_fds=frozenset(shared),
        pgid=stat.pgrp, sid=stat.session, tree=tree.pids if tree else ())


def _member(child: int, tree: TreeView) -> bool:
    """Is ``child`` in the tree dump: a member, or a zombie (dumped as one)?"""
    if child in tree.pids:
        return True
    try:
        return proc.read_stat(child).state in ("Z", "X")
    except NoSuchProcess:
        return True  # gone meanwhile: nothing to lose


def _thread_cwds(pid: int) -> tuple[tuple[int, str], ...]:
    """(tid, cwd) of every thread of ``pid`` (a thread that just exited is left out)."""
    out = []
    for tid in proc.list_tasks(pid):
        try:
            out.append((tid, proc.read_task_cwd(pid, tid)))
        except NoSuchProcess:
            if not proc.pid_exists(pid):
                raise
    return tuple(out)


Identity = tuple[int | None, int]  # (st_dev or None: not compared, st_ino)


def file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file ``path`` names, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _deleted(path: str) -> bool:
    return path.endswith(DELETED)


def _is_foreign(path: str, there: Identity | None) -> bool:
    """Does ``path``, opened from ckpt's mount namespace, miss the file the target has?
    (Paths that are not paths, or deleted, are the table's business.)"""
    if there is None or not path.startswith("/") or _deleted(path):
        return False
    here = file_identity(path)
    return here is None or here[1] != there[1] or there[0] not in (None, here[0])


