"""Signal-driven I/O of every open file, whatever its kind: its status flags, its owner
and its signal, collected and restored here once for all fds (not by each fd kind).

    state                      collected (frozen)          restored (injected fcntl in the
                                                           restored process)
    status flags O_APPEND,     fdinfo "flags"              F_SETFL of those its restorer
    O_ASYNC, O_NONBLOCK,       (OpenFile.flags)            left otherwise, once every fd is
    O_DIRECT, O_NOATIME                                    in place (restore_status)
    signal                     F_GETSIG on a copy of the   F_SETSIG, the same step
                               fd (Peek.getfd)
    owner: a tid, pid or       F_GETOWN_EX on the copy     F_SETOWN_EX once the threads are
    process group                                          cloned and the credentials set
                                                           (restore_owners): the dumped pid
                                                           and tids mapped to the restored
                                                           ones

A copy taken with pidfd_getfd(2) is the same open file: its owner and signal are the
process's. F_SETFL is what arms O_ASYNC (it calls the file's fasync) and, on a file
without fasync (a regular file, an eventfd), drops it; an open(2) with O_ASYNC sets the
flag without arming it. So a reopen by path (ckpt.restore.files) tries F_SETFL first and
opens with O_ASYNC only where F_SETFL drops it. An O_PATH fd has no owner (fcntl refuses
it) and no status flags to set.

Refused at dump (:func:`refusal`): an owner that is another process, a thread of another
process, or a process group other than the process's own: a restore brings back only the
process. Its own group comes back only with its session (setsid, for a session leader
restored without --shell-job); otherwise the restored process sits in the restoring
shell's group, whose other members the original's SIGIO never reached. The kernel records
the caller's uid and euid with the owner and checks them before each signal (a member of
the group they may not signal gets none): F_SETOWN_EX is injected in the leader after its
credentials are set, so they are the process's, not the restoring root's (the kernel
does not show them: whoever called F_SETOWN with other credentials, a thread or the
process before a setuid, is not told apart). An owner that has exited reads as none,
which it is to the kernel.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ckpt.collect.fdkinds.base import Peek, Remote
from ckpt.collect.fds import FdInfo
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import NR

F_GETFL, F_SETFL, F_SETSIG, F_GETSIG, F_SETOWN_EX, F_GETOWN_EX = 3, 4, 10, 11, 15, 16
F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP = 0, 1, 2
OWNER_NOUNS = {F_OWNER_TID: "thread", F_OWNER_PID: "process", F_OWNER_PGRP: "process group"}
#: the status flags F_SETFL changes (fs/fcntl.c SETFL_MASK)
SETFL_MASK = os.O_APPEND | os.O_ASYNC | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME
OWNER_EX = struct.Struct("ii")  # struct f_owner_ex {int type; pid_t pid;}
NOT_YET = "not supported yet"
#: the refusal as `ckpt check` prints it
REFUSED = ("an owner (F_SETOWN) that is another process or one of its threads, a process "
           "group other than the process's own, or its own unless it leads its session "
           "(and no --shell-job): a restore cannot bring it along")


@dataclass(frozen=True)
class Fown:
    """F_GETOWN_EX and F_GETSIG of one open file."""

    type: int = F_OWNER_TID  # F_OWNER_*
    id: int = 0  # 0: no owner
    signal: int = 0  # 0: SIGIO

    @property
    def noun(self) -> str:
        return OWNER_NOUNS.get(self.type, f"owner of type {self.type}")


NO_OWNER = Fown()


def read_fown(info: FdInfo, peek: Peek) -> Fown:
    """The owner and signal of ``info``'s open file, read on a copy of the fd."""
    if info.flags & os.O_PATH:
        return NO_OWNER
    with peek.getfd(info.fd) as fd:
        kind, who = OWNER_EX.unpack(fcntl.fcntl(fd, F_GETOWN_EX, bytes(OWNER_EX.size)))
        signal = fcntl.fcntl(fd, F_GETSIG)
    return Fown(kind, who, signal) if who else Fown(signal=signal)


def refusal(own: Fown, pid: int, tids: Collection[int], pgid: int, sid: int,
            shell_job: bool, members: Collection[int] = ()) -> str | None:
    """Why a restore of process ``pid`` (threads ``tids``, process group ``pgid``, session
    ``sid``) could not give this open file its owner back, or None. A restore makes the
    process's group again only by making its session again (setsid: a session leader,
    without --shell-job); other groups it leaves as they are. In a tree dump, another
    of its ``members`` (a process, restored under its pid before any owner is set) may
    own it too."""
    if not own.id:
        return None
    if own.type == F_OWNER_PID and own.id in members:
        return None
    if own.type == F_OWNER_PGRP:
        if own.id != pgid:
            return (f"its SIGIO goes to process group {own.id} (F_SETOWN), not the "
                    f"process's own ({pgid}): a restore cannot bring that group along")
        if pgid != pid or sid != pid or shell_job:
            return (f"its SIGIO goes to its process group {pgid} (F_SETOWN), which a restore "
                    "makes again only for a session leader without --shell-job: " + NOT_YET)
        return None
    if own.id in tids or own.id == pid:
        return None
    return (f"its SIGIO goes to {own.noun} {own.id} (F_SETOWN), outside process {pid}: "
            "a restore cannot bring it along")


def to_pb(own: Fown, msg: pb.OpenFile) -> None:
    if own.id:
        msg.owner_type, msg.owner = own.type, own.id
    msg.signal = own.signal


def restore_status(remote: Remote, files: Iterable[pb.OpenFile], placed: dict[int, int]
                   ) -> None:
    """Give every placed open file (``placed``: OpenFile.id -> its lowest fd) the status
    flags it had where its restorer left others, and its signal."""
    for f in files:
        if f.id not in placed or f.flags & os.O_PATH:
            continue
        fd = placed[f.id]
        now = remote.sc(NR.fcntl, fd, F_GETFL, what=f"F_GETFL of fd {fd}")
        want = (now & ~SETFL_MASK) | (f.flags & SETFL_MASK)
        if want != now:
            _fcntl(remote, fd, F_SETFL, want, f"status flags {want & SETFL_MASK:#o}", f)
        if f.signal:
            _fcntl(remote, fd, F_SETSIG, f.signal, f"signal {f.signal} (F_SETSIG)", f)


def owner_map(entry: pb.ProcessEntry, tids: list[int], pgid: int) -> dict[tuple[int, int], int]:
    """(owner type, dumped id) -> restored id, for every owner an image may name: the
    process and its threads (``tids``: restored, in the order of entry.threads) and its
    process group (``pgid``: the restored process's)."""
    out = {(F_OWNER_PGRP, entry.pgid): pgid}
    for th, tid in zip(entry.threads, tids, strict=True):
        out[(F_OWNER_TID, th.tid)] = out[(F_OWNER_PID, th.tid)] = tid
    return out


def restore_owners(remote: Remote, entry: pb.ProcessEntry, tids: list[int], pgid: int,
                   members: Collection[int] = ()) -> None:
    """F_SETOWN_EX of every open file that had an owner, mapped by :func:`owner_map`;
    ``pgid``: the restored process's group, which must be its own as it was (refusal);
    ``members``: a tree's processes, restored under their own pids."""
    owners = owner_map(entry, tids, pgid if pgid == tids[0] else 0)
    owners.update({(F_OWNER_PID, m): m for m in members})
    for f in entry.files:
        fds = [fd.fd for fd in entry.fds if fd.file_id == f.id]
        if not f.owner or not fds:
            continue
        who = owners.get((f.owner_type, f.owner))
        if not who:  # images/validate.py lets no other owner through
            raise RestoreError(f"fd {min(fds)}: its owner, {OWNER_NOUNS.get(f.owner_type)} "
                               f"{f.owner}, is not the restored process or its own group")
        _fcntl(remote, min(fds), F_SETOWN_EX, remote.put(OWNER_EX.pack(f.owner_type, who)),
               f"owner {who} (F_SETOWN_EX)", f)


def _fcntl(remote: Remote, fd: int, cmd: int, arg: int, what: str, f: pb.OpenFile) -> None:
    res = remote.sc(NR.fcntl, fd, cmd, arg, check=False)
    if res < 0:
        raise RestoreError(f"fd {fd}: cannot set its {what} again ({f.path}): "
                           f"{os.strerror(-res)}")
