"""The one place raw syscalls are made: libc via ctypes, errno turned into typed errors.

Every argument goes through ``ctypes.c_long``: ``syscall(2)`` is variadic, and plain Python
ints would be passed as C ints and truncated.
"""

from __future__ import annotations

import array
import ctypes
import errno
import itertools
import os
import signal
import struct
from collections.abc import Sequence

from ckpt.errors import AccessDenied, KernelError, NoSuchProcess

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

PAGE_SIZE = 4096
WALL = 0x40000000  # waitpid __WALL: threads and clone children too
IOV_MAX = 1024


class NR:
    """x86-64 syscall numbers."""

    read = 0
    write = 1
    open = 2
    close = 3
    lseek = 8
    mmap = 9
    mprotect = 10
    munmap = 11
    brk = 12
    rt_sigaction = 13
    rt_sigprocmask = 14
    ioctl = 16
    mremap = 25
    madvise = 28
    shmget = 29
    shmat = 30
    shmctl = 31
    dup2 = 33
    getitimer = 36
    setitimer = 38
    getpid = 39
    socket = 41
    connect = 42
    listen = 50
    socketpair = 53
    wait4 = 61
    kill = 62
    shmdt = 67
    fcntl = 72
    flock = 73
    chdir = 80
    umask = 95
    setpgid = 109
    setsid = 112
    rt_sigtimedwait = 128
    rt_sigqueueinfo = 129
    sigaltstack = 131
    personality = 135
    prctl = 157
    arch_prctl = 158
    gettid = 186
    set_tid_address = 218
    timer_create = 222
    timer_settime = 223
    timer_gettime = 224
    timer_getoverrun = 225
    timer_delete = 226
    clock_gettime = 228
    exit_group = 231
    epoll_wait = 232
    epoll_ctl = 233
    tgkill = 234
    waitid = 247
    ioprio_set = 251
    ioprio_get = 252
    inotify_add_watch = 254
    inotify_rm_watch = 255
    set_robust_list = 273
    tee = 276
    get_robust_list = 274
    timerfd_create = 283
    timerfd_settime = 286
    timerfd_gettime = 287
    signalfd4 = 289
    epoll_create1 = 291
    dup3 = 292
    inotify_init1 = 294
    rt_tgsigqueueinfo = 297
    prlimit64 = 302
    open_by_handle_at = 304
    process_vm_readv = 310
    process_vm_writev = 311
    kcmp = 312
    userfaultfd = 323
    membarrier = 324
    mlock2 = 325
    rseq = 334
    pidfd_send_signal = 424
    pidfd_open = 434
    clone3 = 435
    close_range = 436
    pidfd_getfd = 438
    mseal = 462


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def raise_errno(err: int, what: str, pid: int | None = None) -> None:
    """Turn an errno into the typed error a caller can act on."""
    if pid is not None and err == errno.ESRCH:
        raise NoSuchProcess(pid, what)
    if pid is not None and err in (errno.EPERM, errno.EACCES):
        raise AccessDenied(pid, what)
    raise KernelError(err, what)


def syscall(nr: int, *args: int, what: str = "", pid: int | None = None) -> int:
    """Run syscall ``nr`` in this process; return its result or raise on -1."""
    res = int(libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))
    if res == -1:
        raise_errno(ctypes.get_errno(), what or f"syscall {nr}", pid)
    return res


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) in this process (ckpt's own settings); its result, or a typed error."""
    return syscall(NR.prctl, option, arg2, arg3, arg4, arg5, what=f"prctl({option})")


# struct clone_args (CLONE_ARGS_SIZE_VER2): flags, pidfd, child_tid, parent_tid,
# exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup
CLONE_ARGS = struct.Struct("11Q")


def clone_args(flags: int, exit_signal: int, set_tid: int = 0, set_tid_size: int = 0) -> bytes:
    """A clone3 argument: ``set_tid`` the address of ``set_tid_size`` pids to ask for."""
    return CLONE_ARGS.pack(flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid, set_tid_size, 0)


KCMP_FILE = 0


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """kcmp(pid1, pid2, KCMP_FILE, fd1, fd2): is ``fd1`` of ``pid1`` the very open file
    description that ``fd2`` of ``pid2`` is? A CkptError (NoSuchProcess, AccessDenied, ...)
    when it cannot tell: an fd closed, a process gone or not ours to look at."""
    return syscall(NR.kcmp, pid1, pid2, KCMP_FILE, fd1, fd2,
                   what=f"kcmp(KCMP_FILE, {fd1}, {fd2})", pid=pid2) == 0


KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND = 1, 2, 3, 4


def kcmp_same(pid1: int, pid2: int, what: int) -> bool:
    """kcmp(pid1, pid2, KCMP_VM/FILES/FS/SIGHAND): do the two processes share that
    kernel object (an address space, an fd table, a working directory and umask, signal
    handlers)? A CkptError when it cannot tell."""
    return syscall(NR.kcmp, pid1, pid2, what, 0, 0, what=f"kcmp({pid1}, {pid2}, {what})",
                   pid=pid2) == 0


def tgkill(pid: int, tid: int, sig: int) -> None:
    syscall(NR.tgkill, pid, tid, sig, what=f"tgkill({tid}, {sig})", pid=tid)


NSIG = 64
KSIGACTION_SIZE = 32  # struct k_sigaction on x86-64: handler, flags, restorer, mask (u64 each)


def default_all_sigactions() -> None:
    """Set every signal of this process but SIGKILL/SIGSTOP to SIG_DFL with no flags, mask
    or restorer, as a fresh exec would (which keeps SIG_IGN; this does not)."""
    zero = ctypes.create_string_buffer(KSIGACTION_SIZE)
    for sig in range(1, NSIG + 1):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            syscall(NR.rt_sigaction, sig, ctypes.addressof(zero), 0, 8, what="rt_sigaction")


def pidfd_open(pid: int) -> int:
    return syscall(NR.pidfd_open, pid, 0, what=f"pidfd_open({pid})", pid=pid)


def pidfd_send_signal(pidfd: int, sig: int) -> bool:
    """Send ``sig`` to the very process of ``pidfd``; False when it is gone (reaped: its
    pid may be another's by now, which is never hit)."""
    try:
        syscall(NR.pidfd_send_signal, pidfd, sig, 0, 0, what=f"pidfd_send_signal({sig})")
    except KernelError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True


def pidfd_getfd(pidfd: int, targetfd: int, pid: int | None = None) -> int:
    return syscall(NR.pidfd_getfd, pidfd, targetfd, 0, what="pidfd_getfd", pid=pid)


SPLICE_F_NONBLOCK = 2


def tee(fd_in: int, fd_out: int, n: int, flags: int = SPLICE_F_NONBLOCK) -> int:
    """tee(2): duplicate up to ``n`` bytes buffered in pipe ``fd_in`` into pipe ``fd_out``
    without consuming them; 0 when there is nothing to take (EAGAIN included)."""
    res = int(libc.syscall(ctypes.c_long(NR.tee), ctypes.c_long(fd_in), ctypes.c_long(fd_out),
                           ctypes.c_long(n), ctypes.c_long(flags)))
    if res < 0:
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            return 0
        raise_errno(err, "tee")
    return res


def _vm_rw(nr: int, pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]],
           ) -> int:
    n_l, n_r = len(local), len(remote)
    # struct iovec arrays built as flat u64 arrays: far cheaper than one ctypes object each
    liov = array.array("Q", itertools.chain.from_iterable(local))
    riov = array.array("Q", itertools.chain.from_iterable(remote))
    lptr, _ = liov.buffer_info()
    rptr, _ = riov.buffer_info()
    res = int(libc.syscall(ctypes.c_long(nr), ctypes.c_long(pid), ctypes.c_void_p(lptr),
                           ctypes.c_long(n_l), ctypes.c_void_p(rptr), ctypes.c_long(n_r),
                           ctypes.c_long(0)))
    if res < 0:
        name = "process_vm_readv" if nr == NR.process_vm_readv else "process_vm_writev"
        raise_errno(ctypes.get_errno(), f"{name} in {pid}", pid)
    return res


def vm_transfer(write: bool, pid: int, pairs: Sequence[tuple[int, int, int]]) -> int:
    """Copy (local_addr, remote_addr, length) ranges to/from ``pid`` in IOV_MAX batches.

    Partial transfers (a range crossing into an unmapped or unreadable page) are resumed
    range by range, so the caller learns exactly which address failed.
    """
    nr = NR.process_vm_writev if write else NR.process_vm_readv
    total = 0
    for i in range(0, len(pairs), IOV_MAX):
        batch = pairs[i : i + IOV_MAX]
        want = sum(n for _, _, n in batch)
        got = _vm_rw(nr, pid, [(a, n) for a, _, n in batch], [(r, n) for _, r, n in batch])
        if got != want:
            skip = got
            for a, r, n in batch:
                if skip >= n:
                    skip -= n
                    continue
                done = skip
                skip = 0
                while done < n:
                    k = _vm_rw(nr, pid, [(a + done, n - done)], [(r + done, n - done)])
                    if k == 0:
                        raise KernelError(errno.EFAULT, f"process_vm at {r + done:#x} in {pid}")
                    done += k
        total += want
    return total


def errno_of(exc: OSError) -> int:
    return exc.errno if exc.errno is not None else errno.EIO


def strerror(err: int) -> str:
    return os.strerror(err)


def vm_read(pid: int, addr: int, n: int) -> bytes:
    """Read ``n`` bytes at ``addr`` of ``pid`` (small reads; bulk copies use vm_transfer)."""
    buf = ctypes.create_string_buffer(n)
    vm_transfer(False, pid, [(ctypes.addressof(buf), addr, n)])
    return buf.raw


def vm_write(pid: int, addr: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    vm_transfer(True, pid, [(ctypes.addressof(buf), addr, len(data))])


def kill_and_reap(pid: int, threads: Sequence[int] = (), pidfd: int = -1) -> None:
    """SIGKILL a child of ours (traced or not) and wait until it is gone. ``threads``:
    its other threads that we trace; each must be reaped first (__WALL), or the leader's
    exit is never reported. With ``pidfd`` (opened while it was surely ours) the signal
    reaches that very process or none: one that took its pid since is left alone."""
    try:
        if pidfd >= 0:
            if not pidfd_send_signal(pidfd, signal.SIGKILL):
                return
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for tid in [*(t for t in threads if t != pid), pid]:
        while True:
            try:
                _, status = os.waitpid(tid, WALL)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break


def current_cpu() -> int:
    """The CPU this thread runs on right now (sched_getcpu)."""
    cpu = int(libc.sched_getcpu())
    if cpu < 0:
        raise KernelError(ctypes.get_errno(), "sched_getcpu")
    return cpu


# Filesystems whose pages can vanish or fail under a mapping (a server, a FUSE daemon):
# mapped files there turn an I/O error into SIGBUS (linux/magic.h and fs sources).
REMOTE_FS = frozenset({
    0x6969,      # NFS
    0x517B,      # SMB
    0xFF534D42,  # CIFS
    0xFE534D42,  # SMB2
    0x65735546,  # FUSE
    0x01021997,  # 9p
    0x00C36400,  # Ceph
    0x6B414653,  # AFS
    0x01161970,  # GFS2
    0x7461636F,  # OCFS2
})


def fs_type(fd: int) -> int:
    """f_type of the filesystem holding open file ``fd`` (fstatfs)."""
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type comes first
    if libc.fstatfs(fd, buf) != 0:
        raise KernelError(ctypes.get_errno(), "fstatfs")
    return int.from_bytes(buf.raw[:8], "little")
