"""Thin wrappers of the anon-inode fd syscalls ckpt makes in its own process: timerfd,
signalfd, inotify, file handles and kcmp(KCMP_EPOLL_TFD). Syscalls made in a restored
process go through its injector instead (ckpt.restore.stub) with the numbers of NR.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

from ckpt.errors import KernelError
from ckpt.kernel.sys import NR, errno_of, syscall

NSEC = 1_000_000_000
TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2
TFD_IOC_SET_TICKS = 0x40085400  # _IOW('T', 0, u64), CONFIG_CHECKPOINT_RESTORE
KCMP_EPOLL_TFD = 7
FIONREAD = 0x541B
IN_DONT_FOLLOW = 0x02000000
MAX_HANDLE_SZ = 128


def _itimerspec(value_ns: int, interval_ns: int) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(struct.pack(
        "4q", interval_ns // NSEC, interval_ns % NSEC, value_ns // NSEC, value_ns % NSEC))


def timerfd_create(clockid: int, flags: int) -> int:
    return syscall(NR.timerfd_create, clockid, flags, what=f"timerfd_create({clockid})")


def timerfd_settime(fd: int, flags: int, value_ns: int, interval_ns: int) -> None:
    """Arm (value_ns > 0) or disarm a timerfd; ``value_ns`` is absolute with
    TFD_TIMER_ABSTIME, else the time left."""
    spec = _itimerspec(value_ns, interval_ns)
    syscall(NR.timerfd_settime, fd, flags, ctypes.addressof(spec), 0, what="timerfd_settime")


def timerfd_gettime(fd: int) -> tuple[int, int]:
    """(time left, interval) in ns. For a periodic timer that expired this also counts
    the expirations missed since into its ticks, as a read would (fdinfo does not)."""
    out = ctypes.create_string_buffer(32)
    syscall(NR.timerfd_gettime, fd, ctypes.addressof(out), what="timerfd_gettime")
    isec, insec, vsec, vnsec = struct.unpack("4q", out.raw)
    return vsec * NSEC + vnsec, isec * NSEC + insec


def timerfd_set_ticks(fd: int, ticks: int) -> None:
    """Expirations a read of the timerfd returns (TFD_IOC_SET_TICKS, ticks > 0)."""
    try:
        fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("Q", ticks))
    except OSError as exc:  # ENOTTY: a kernel without CONFIG_CHECKPOINT_RESTORE
        raise KernelError(errno_of(exc), "timerfd ioctl TFD_IOC_SET_TICKS") from None


def signalfd4(mask: int, flags: int) -> int:
    """A new signalfd for the signals of ``mask`` (bit N-1: signal N)."""
    m = ctypes.c_uint64(mask)
    return syscall(NR.signalfd4, -1, ctypes.addressof(m), 8, flags, what="signalfd4")


def inotify_init1(flags: int) -> int:
    return syscall(NR.inotify_init1, flags, what="inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return syscall(NR.inotify_add_watch, fd, ctypes.addressof(raw), mask,
                   what=f"inotify_add_watch {path}")


def inotify_rm_watch(fd: int, wd: int) -> None:
    syscall(NR.inotify_rm_watch, fd, wd, what=f"inotify_rm_watch {wd}")


def queued_bytes(fd: int) -> int:
    """Bytes waiting to be read (FIONREAD): an inotify queue, a pipe, a socket."""
    try:
        buf = fcntl.ioctl(fd, FIONREAD, b"\0\0\0\0")
    except OSError as exc:
        raise KernelError(errno_of(exc), "ioctl FIONREAD") from None
    return int(struct.unpack("i", buf)[0])


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """Open the file a file handle names on the filesystem of ``mount_fd``."""
    fh = ctypes.create_string_buffer(struct.pack("Ii", len(handle), handle_type) + handle)
    return syscall(NR.open_by_handle_at, mount_fd, ctypes.addressof(fh), flags,
                   what="open_by_handle_at")


def kcmp_epoll_tfd(pid: int, fd: int, efd: int, tfd: int, toff: int) -> bool:
    """Is ``fd`` of ``pid`` the very file that epoll ``efd`` of ``pid`` registered under
    ``tfd`` (its ``toff``-th registration with that number)? False if it is another file,
    or the registration is gone, or ``fd`` is closed."""
    slot = ctypes.create_string_buffer(struct.pack("3I", efd, tfd, toff))
    try:
        return syscall(NR.kcmp, pid, pid, KCMP_EPOLL_TFD, fd, ctypes.addressof(slot),
                       what="kcmp(KCMP_EPOLL_TFD)") == 0
    except KernelError:
        return False
