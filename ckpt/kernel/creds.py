"""Credentials and seccomp: constants, argument layouts and the ptrace requests that read a
task's seccomp filters. The syscalls that *set* credentials run inside the restored task
(injected through the stub); this module only says how to encode their arguments.

    PTRACE_SECCOMP_GET_FILTER(tid, index)   cBPF program of the filter ``index``; 0 is
                                            the *oldest* (kernel/seccomp.c get_nth_filter
                                            walks count - index back from the newest;
                                            verified here: a restore installing in index
                                            order dumps again identically)
    PTRACE_SECCOMP_GET_METADATA             its flags (only SECCOMP_FILTER_FLAG_LOG is
                                            reported)
    PTRACE_O_SUSPEND_SECCOMP                while traced, no filter (nor strict mode) acts
                                            on the tracee; the kernel drops the option at
                                            detach. Both need CAP_SYS_ADMIN and
                                            CONFIG_CHECKPOINT_RESTORE.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ckpt.errors import AccessDenied, CkptError, KernelError
from ckpt.kernel.ptrace import ptrace
from ckpt.kernel.sys import syscall

T = TypeVar("T")

PTRACE_O_SUSPEND_SECCOMP = 0x200000
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
BPF_INSN_SIZE = 8  # struct sock_filter {u16 code; u8 jt, jf; u32 k}
BPF_MAXINSNS = 4096  # per classic BPF program
MAX_FILTERS = 4096  # the kernel limits the total instructions to MAX_INSNS_PER_PATH (32768)

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_GET_SECUREBITS, PR_SET_SECUREBITS = 27, 28
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_KEEP_CAPS = 1 << 4
SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 1, 2
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_LOG = 1 << 1
CAPABILITY_VERSION_3 = 0x20080522
FULL_CAPS = (1 << 41) - 1  # CAP_CHOWN .. CAP_CHECKPOINT_RESTORE


def suspend_seccomp_refused(exc: AccessDenied | KernelError) -> str | None:
    """Why PTRACE_O_SUSPEND_SECCOMP was refused, in words; None for any other failure."""
    if isinstance(exc, AccessDenied):  # EPERM
        return "PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN and a ckpt not itself under seccomp"
    if exc.errno == errno.EINVAL:
        return "the kernel has no PTRACE_O_SUSPEND_SECCOMP (CONFIG_CHECKPOINT_RESTORE off)"
    return None


class SYS:
    """x86-64 numbers of the credential syscalls (injected into the restored task)."""

    getgroups = 115
    setgroups = 116
    setresuid = 117
    getresuid = 118
    setresgid = 119
    setfsuid = 122
    setfsgid = 123
    capget = 125
    unshare = 272
    capset = 126
    seccomp = 317


def seccomp_filters(tid: int) -> list[tuple[bytes, int]]:
    """Every seccomp filter of a traced, stopped task: (cBPF program, flags), oldest
    first (index order: the order to install them again)."""
    out: list[tuple[bytes, int]] = []
    for index in range(MAX_FILTERS):
        try:
            count = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
        except KernelError as exc:
            if exc.errno == errno.ENOENT:  # past the oldest filter
                break
            raise
        buf = ctypes.create_string_buffer(count * BPF_INSN_SIZE)
        ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        meta = ctypes.create_string_buffer(struct.pack("QQ", index, 0), 16)
        ptrace(PTRACE_SECCOMP_GET_METADATA, tid, 16, ctypes.addressof(meta))
        out.append((buf.raw, struct.unpack_from("QQ", meta.raw)[1]))
    return out


def sock_fprog(prog_addr: int, prog: bytes) -> bytes:
    """struct sock_fprog {unsigned short len; struct sock_filter *filter} (16 bytes)."""
    return struct.pack("HxxxxxxQ", len(prog) // BPF_INSN_SIZE, prog_addr)


def cap_header() -> bytes:
    """struct __user_cap_header_struct for capset on the calling task (pid 0)."""
    return struct.pack("Ii", CAPABILITY_VERSION_3, 0)


def cap_data(effective: int, permitted: int, inheritable: int) -> bytes:
    """Two struct __user_cap_data_struct: the low and the high 32 bits of each set."""
    low = struct.pack("III", effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF,
                      inheritable & 0xFFFFFFFF)
    return low + struct.pack("III", effective >> 32, permitted >> 32, inheritable >> 32)


def last_cap(proc_root: str = "/proc") -> int:
    with open(f"{proc_root}/sys/kernel/cap_last_cap") as f:
        return int(f.read())


WHY_ROOT = {
    "restore": "it gives the process its pids and its own credentials, which only root may "
               "hand out; as any other user it is refused",
    "dump": "reading seccomp filters and freezing with them suspended need CAP_SYS_ADMIN",
}


def require_root(action: str) -> None:
    """Refuse up front what needs root, in one line (not a PermissionError from deep
    inside, nor a process restored with the credentials of whoever ran ckpt)."""
    if os.geteuid() != 0:
        why = WHY_ROOT["restore" if action == "restore" else "dump"]
        raise CkptError(f"{action} needs root: {why}")


def assume_fs_identity(fsuid: int, fsgid: int, groups: tuple[int, ...], cap_eff: int) -> None:
    """Make the *calling thread* check file access as a task with these filesystem ids,
    groups and effective capabilities would (raw syscalls: per thread, unlike glibc's
    wrappers). Meant for a short-lived thread: ckpt's other threads keep root."""
    _set_groups(groups)
    syscall(SYS.setfsgid, fsgid, what="setfsgid")
    syscall(SYS.setfsuid, fsuid, what="setfsuid")
    if syscall(SYS.setfsuid, -1 & 0xFFFFFFFF, what="setfsuid") != fsuid:
        raise KernelError(errno.EPERM, f"setfsuid({fsuid})")
    head = ctypes.create_string_buffer(cap_header(), 8)
    got = ctypes.create_string_buffer(24)
    syscall(SYS.capget, ctypes.addressof(head), ctypes.addressof(got), what="capget")
    _, lo_p, lo_i, _, hi_p, hi_i = struct.unpack("6I", got.raw)
    permitted, inheritable = lo_p | hi_p << 32, lo_i | hi_i << 32
    data = ctypes.create_string_buffer(cap_data(cap_eff & permitted, permitted, inheritable),
                                       24)
    syscall(SYS.capset, ctypes.addressof(head), ctypes.addressof(data), what="capset")


CLONE_FS = 0x200


def unshare_fs() -> None:
    """Give the calling thread its own working directory and umask (a chdir there then
    leaves ckpt's other threads where they are)."""
    syscall(SYS.unshare, CLONE_FS, what="unshare(CLONE_FS)")


def _get_ids(nr: int, what: str) -> tuple[int, int, int]:
    ids = (ctypes.c_uint32 * 3)()
    syscall(nr, *(ctypes.addressof(ids) + 4 * i for i in range(3)), what=what)
    return ids[0], ids[1], ids[2]


def thread_groups() -> tuple[int, ...]:
    """The calling thread's supplementary groups (raw getgroups: this thread's)."""
    n = syscall(SYS.getgroups, 0, 0, what="getgroups")
    arr = (ctypes.c_uint32 * max(n, 1))()
    n = syscall(SYS.getgroups, n, ctypes.addressof(arr), what="getgroups")
    return tuple(arr[:n])


def _set_groups(groups: Sequence[int]) -> None:
    arr = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    syscall(SYS.setgroups, len(groups), ctypes.addressof(arr), what="setgroups")


KEEP = 0xFFFFFFFF  # -1 as a uid_t: "leave it" to setresuid, "only read" to setfs[ug]id


@contextlib.contextmanager
def made_as(uid: int, fsuid: int, fsgid: int, groups: Sequence[int]) -> Iterator[None]:
    """Run the block with the calling thread's real uid (what per-user limits charge:
    pipe buffers, epoll watches), filesystem uid and gid (a new object's owner, and its
    file's f_cred: what xt_owner's --uid-owner, --gid-owner and --suppl-groups match;
    a socket's sk_uid) and supplementary groups set to a process's; its effective uid
    and capabilities stay ckpt's (less the filesystem ones while fsuid is not 0). Raw
    syscalls act on the calling thread only (glibc's setgroups and setresuid change every
    thread of ckpt, through its setxid broadcast); everything is put back after."""
    old_ruid = _get_ids(SYS.getresuid, "getresuid")[0]
    old_groups = thread_groups()
    old_fsuid = syscall(SYS.setfsuid, KEEP, what="setfsuid")
    old_fsgid = syscall(SYS.setfsgid, KEEP, what="setfsgid")
    try:
        _set_groups(groups)
        syscall(SYS.setresuid, uid, KEEP, KEEP, what="setresuid")  # fsuid = euid again
        syscall(SYS.setfsgid, fsgid, what="setfsgid")
        syscall(SYS.setfsuid, fsuid, what="setfsuid")
        if (syscall(SYS.setfsuid, KEEP, what="setfsuid"),
                syscall(SYS.setfsgid, KEEP, what="setfsgid")) != (fsuid, fsgid):
            raise KernelError(errno.EPERM, f"setfsuid({fsuid}) or setfsgid({fsgid})")
        yield
    finally:  # in reverse: a setfsuid back to 0 gives back the filesystem capabilities,
        # which a setresuid (setting fsuid to the euid) would not
        syscall(SYS.setfsuid, old_fsuid, what="setfsuid")
        syscall(SYS.setfsgid, old_fsgid, what="setfsgid")
        syscall(SYS.setresuid, old_ruid, KEEP, KEEP, what="setresuid")
        _set_groups(old_groups)


def call_as_creator(uid: int, gid: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread of ckpt whose effective uid and gid are ``uid`` and
    ``gid`` (raw setresgid/setresuid: that thread only; what it creates is theirs, e.g. a
    System V segment's creator), and return what it returned or raise what it raised."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            syscall(SYS.setresgid, -1, gid, -1, what="setresgid")
            syscall(SYS.setresuid, -1, uid, -1, what="setresuid")
            out.append(fn())
        except BaseException as exc:  # handed to the caller
            err.append(exc)

    thread = threading.Thread(target=run, name="ckpt-creator")
    thread.start()
    thread.join()  # the thread exits with its credentials: nothing to switch back
    if err:
        raise err[0]
    return out[0]


@dataclass(frozen=True)
class FsIdentity:
    """Whose file access a task has: what the kernel checks a path lookup, an open or an
    inotify watch against."""

    fsuid: int
    fsgid: int
    groups: tuple[int, ...]
    cap_eff: int

    @property
    def unrestricted(self) -> bool:
        return self.fsuid == 0 and self.cap_eff & FULL_CAPS == FULL_CAPS

    def run(self, work: Callable[[], T]) -> T:
        """``work()`` in a short-lived thread of ckpt that checks file access as this
        identity (with a working directory of its own: a chdir there moves no other
        thread); what it raises is raised here."""
        out: list[T] = []
        failure: list[BaseException] = []

        def thread() -> None:
            try:
                unshare_fs()
                assume_fs_identity(self.fsuid, self.fsgid, self.groups, self.cap_eff)
                out.append(work())
            except BaseException as exc:  # reported in the caller's thread
                failure.append(exc)

        worker = threading.Thread(target=thread, name=f"ckpt-as-uid-{self.fsuid}")
        worker.start()
        worker.join()
        if failure:
            raise failure[0]
        return out[0]
