"""File locks and leases held through an open file, from the "lock:" lines of
/proc/PID/fdinfo/N, taken again by the restored process before it runs.

    lock:	1: FLOCK  ADVISORY  WRITE 1234 fe:00:1311 0 EOF      flock(2)
    lock:	2: POSIX  ADVISORY  READ 1234 fe:00:1311 50 59        fcntl F_SETLK, bytes 50-59
    lock:	3: OFDLCK ADVISORY  READ -1 fe:00:1311 20 EOF         fcntl F_OFD_SETLK
    lock:	4: LEASE  ACTIVE    WRITE 1234 fe:00:1312 0 EOF       fcntl F_SETLEASE

An fd's fdinfo lists the locks of its inode that were set through its open file
description and are owned by it (flock, OFD, lease) or by the process (POSIX): each lock
shows on one open file (and its dups), never on two, so each is saved once, in the
``locks`` of that OpenFile. A POSIX lock belongs to the process and the inode, not to the
open file: any fd of the inode takes it again.

    kind   owner                    restore (injected into the restored process)
    FLOCK  open file description    flock(fd, LOCK_SH or LOCK_EX | LOCK_NB)
    OFD    open file description    fcntl(fd, F_OFD_SETLK, struct flock)
    POSIX  process (its fd table)   fcntl(fd, F_SETLK, struct flock)
    LEASE  open file description    fcntl(fd, F_SETSIG, signal) if the file had one, then
                                    fcntl(fd, F_SETLEASE, F_RDLCK or F_WRLCK): the stub is
                                    still root (CAP_LEASE); like the original call, it
                                    makes the process the file's owner (F_SETOWN), whom
                                    the lease break signals. Only if the process may
                                    hold it (:func:`lease_refusal`: it owns the file, or
                                    has CAP_LEASE), as the kernel asks of F_SETLEASE

:func:`restore_locks` runs once every fd is in place and the restore's own temporary fds
are closed (closing any fd of an inode drops the process's POSIX locks on it), before
the credentials are dropped and long before the process runs.

The gap: ``ckpt dump`` kills its target, which drops its locks; until the restore takes
them again, another process may take them (CRIU has the same window). A lock that cannot
be taken again (another process holds a conflicting one, or has a leased file open)
fails the restore in one line naming the file. An flock, OFD lock or lease whose open
file another process shares (inherited across fork(), passed over a unix socket) would
stay with that process after the dump: ckpt.collect.restorable refuses it before the
freeze (:func:`open_file_lock`, the holders found by ckpt.collect.holders). A lease's
owner comes back as the process itself, as F_SETLEASE made it (as root), then as dumped
with the process's credentials (ckpt.collect.fdkinds.fown, after the credentials: a
thread or the process group after an F_SETOWN).

Refused at dump (:func:`refusal`): a lock on an fd a restore does not reopen by path
(pipes, sockets, ... and terminals), a mandatory lock, a lease being broken, a
delegation or any line not understood. A process waiting for a lock (F_SETLKW, flock
without LOCK_NB: "->" lines of /proc/locks) shows nothing in fdinfo: the freeze
interrupts its wait and the restored process restarts the call (-ERESTARTSYS), waiting
again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckpt.collect.fdkinds.base import Peek, Remote
from ckpt.collect.fds import FdInfo
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import FsIdentity
from ckpt.kernel.sys import NR

F_SETLK, F_SETSIG, F_GETSIG, F_SETLEASE, F_OFD_SETLK = 6, 10, 11, 1024, 37
CAP_LEASE = 28
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
SEEK_SET = 0
#: struct flock on x86-64: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int)
FLOCK_STRUCT = struct.Struct("hhqqi4x")

KINDS = {"FLOCK": pb.FileLock.FLOCK, "POSIX": pb.FileLock.POSIX, "OFDLCK": pb.FileLock.OFD,
         "LEASE": pb.FileLock.LEASE}
#: what the second word of a line must be for each kind (another one is refused)
STATES = {"FLOCK": "ADVISORY", "POSIX": "ADVISORY", "OFDLCK": "ADVISORY", "LEASE": "ACTIVE"}
TYPES = {"READ": pb.FileLock.READ, "WRITE": pb.FileLock.WRITE}
NAMES = {pb.FileLock.FLOCK: "flock", pb.FileLock.POSIX: "POSIX", pb.FileLock.OFD: "OFD",
         pb.FileLock.LEASE: "lease"}
EOF = "EOF"


@dataclass(frozen=True)
class LockLine:
    """One "lock:" line of fdinfo, split into its words (see lock_get_status in
    fs/locks.c): ``1: POSIX  ADVISORY  WRITE 1234 fe:00:1311 0 EOF``."""

    kind: str  # FLOCK, POSIX, OFDLCK, LEASE, DELEG, ACCESS, ...
    state: str  # ADVISORY, MANDATORY; for leases ACTIVE, BREAKING, BREAKER
    type: str  # READ, WRITE, UNLCK
    start: int
    end: int | None  # last byte; None: to the end of the file

    @property
    def shown(self) -> str:
        return f"{self.kind} {self.state} {self.type}"


def parse_lock(value: str) -> LockLine | None:
    """A "lock:" line's value (after "lock:"), or None if it is not in the known format
    (a blocked request's "->", a line of another length, ...)."""
    words = value.split()
    if len(words) != 8 or not words[0].endswith(":") or words[1] == "->":
        return None
    _, kind, state, type_, _, _, start, end = words
    try:
        return LockLine(kind, state, type_, int(start), None if end == EOF else int(end))
    except ValueError:
        return None


def lock_values(info: FdInfo) -> list[str]:
    return [value for key, value in info.extra if key == "lock"]


#: how a refusal names a lock (``lock``: what :func:`refused_lock` says)
REFUSED = "holds {lock}, which a restore cannot take again: not supported yet"


def refused_lock(info: FdInfo, reopened: bool) -> str | None:
    """The first lock held through this fd that cannot be taken again, or None.
    ``reopened``: the restore opens this fd's file again by path (a regular file, a
    directory, a stateless device)."""
    for value in lock_values(info):
        line = parse_lock(value)
        if line is None:
            return f"a file lock ckpt does not understand ({value.strip()})"
        if not reopened:
            return f"a {line.kind} lock on a file a restore does not reopen by path"
        if line.kind not in KINDS:
            what = "a delegation" if line.kind == "DELEG" else f"a lock of kind {line.kind}"
            return f"{what} ({line.shown})"
        if line.state != STATES[line.kind]:
            what = ("a lease being broken by another process's open"
                    if line.kind == "LEASE" else f"a {line.state.lower()} lock")
            return f"{what} ({line.shown})"
        if line.type not in TYPES:
            return f"a {line.kind} lock of type {line.type}"
        if line.end is not None and line.end < line.start:
            return f"a {line.kind} lock on an empty range ({value.strip()})"
    return None


#: kinds of lock owned by the open file description: whoever shares it holds them too
OPEN_FILE_KINDS = ("FLOCK", "OFDLCK", "LEASE")


def open_file_lock(info: FdInfo) -> LockLine | None:
    """The first lock held through this fd that its open file owns (not the process):
    another process sharing the open file keeps it when this one dies."""
    for value in lock_values(info):
        line = parse_lock(value)
        if line is not None and line.kind in OPEN_FILE_KINDS:
            return line
    return None


def refusal(info: FdInfo, reopened: bool) -> str | None:
    """Why the locks held through this fd cannot be taken again, or None."""
    lock = refused_lock(info, reopened)
    return None if lock is None else REFUSED.format(lock=lock)


def collect_locks(info: FdInfo, peek: Peek | None = None) -> list[pb.FileLock]:
    """The locks held through this fd's open file (call :func:`refusal` first: lines it
    refuses are left out here); with ``peek``, a lease's signal (F_GETSIG)."""
    out = []
    for value in lock_values(info):
        line = parse_lock(value)
        if line is None or line.kind not in KINDS or line.type not in TYPES:
            continue
        lock = pb.FileLock(kind=KINDS[line.kind], type=TYPES[line.type])
        if line.kind in ("POSIX", "OFDLCK"):
            lock.start = line.start
            lock.length = 0 if line.end is None else line.end - line.start + 1
        if line.kind == "LEASE" and peek is not None:
            with peek.getfd(info.fd) as fd:
                lock.signal = fcntl.fcntl(fd, F_GETSIG)
        out.append(lock)
    return out


# --------------------------------------------------------------------------- restore


def _flock(remote: Remote, fd: int, lock: pb.FileLock) -> int:
    op = LOCK_EX if lock.type == pb.FileLock.WRITE else LOCK_SH
    return remote.sc(NR.flock, fd, op | LOCK_NB, check=False)


def _range_lock(cmd: int) -> Callable[[Remote, int, pb.FileLock], int]:
    def take(remote: Remote, fd: int, lock: pb.FileLock) -> int:
        arg = FLOCK_STRUCT.pack(int(lock.type), SEEK_SET, lock.start, lock.length, 0)
        return remote.sc(NR.fcntl, fd, cmd, remote.put(arg), check=False)
    return take


def _lease(remote: Remote, fd: int, lock: pb.FileLock) -> int:
    if lock.signal:
        res = remote.sc(NR.fcntl, fd, F_SETSIG, lock.signal, check=False)
        if res < 0:
            return res
    return remote.sc(NR.fcntl, fd, F_SETLEASE, int(lock.type), check=False)


#: kind -> how the restored process takes it again (raw result: negative errno)
TAKE: dict[int, Callable[[Remote, int, pb.FileLock], int]] = {
    pb.FileLock.FLOCK: _flock,
    pb.FileLock.OFD: _range_lock(F_OFD_SETLK),
    pb.FileLock.POSIX: _range_lock(F_SETLK),
    pb.FileLock.LEASE: _lease,
}


def describe_lock(lock: pb.FileLock) -> str:
    """"the POSIX WRITE lock on bytes 0-9": how an error names a lock."""
    type_ = pb.FileLock.Type.Name(lock.type)
    if lock.kind == pb.FileLock.LEASE:
        return f"the {type_} lease"
    where = ""
    if lock.kind in (pb.FileLock.POSIX, pb.FileLock.OFD):
        last = str(lock.start + lock.length - 1) if lock.length else EOF
        where = f" on bytes {lock.start}-{last}"
    return f"the {NAMES[lock.kind]} {type_} lock{where}"


def lease_refusal(who: FsIdentity, owner: int) -> str | None:
    """Why a process of filesystem identity ``who`` may not hold a lease on a file owned
    by uid ``owner`` (F_SETLEASE asks fsuid == the file's owner, or CAP_LEASE), or None."""
    if who.fsuid == owner or who.cap_eff >> CAP_LEASE & 1:
        return None
    return (f"the file is owned by uid {owner} now, and uid {who.fsuid} without CAP_LEASE "
            "may not lease it: the restored process would gain a lease; refused")


def restore_locks(remote: Remote, files: Iterable[pb.OpenFile], placed: dict[int, int],
                  who: FsIdentity, owner: Callable[[int], int] | None = None) -> None:
    """Take every lock of ``files`` again in the restored process, each through the fd
    its open file got (``placed``: OpenFile.id -> fd); a lease only if ``who`` (the
    process's filesystem identity) may hold it. ``owner``: the uid owning the file the
    process holds on an fd (default: a stat through /proc)."""
    owner_of = owner or (lambda fd: os.stat(f"/proc/{remote.pid}/fd/{fd}").st_uid)
    for f in files:
        if f.id not in placed:
            continue
        fd = placed[f.id]
        for lock in f.locks:
            if lock.kind == pb.FileLock.LEASE:
                why = lease_refusal(who, owner_of(fd))
                if why is not None:
                    raise RestoreError(f"fd {fd}: {describe_lock(lock)} on {f.path}: {why}")
            _take(remote, fd, lock, f.path)


def _take(remote: Remote, fd: int, lock: pb.FileLock, path: str) -> None:
    res = TAKE[lock.kind](remote, fd, lock)
    if res >= 0:
        return
    why = os.strerror(-res)
    if -res in (errno.EAGAIN, errno.EACCES):
        why = ("another process has the file open" if lock.kind == pb.FileLock.LEASE
               else "another process holds a conflicting lock")
    raise RestoreError(f"fd {fd}: cannot take {describe_lock(lock)} on {path} again: {why}")
