"""userfaultfd write-protect tracking (async mode), the soft-dirty replacement.

Constants and structs follow include/uapi/linux/userfaultfd.h of Linux 6.18; they are
defined here because the installed headers (6.1) lack UFFD_FEATURE_WP_ASYNC.

Every function taking ``fd`` works on any userfaultfd descriptor, including one fetched
with ``pidfd_getfd`` from another process: the ioctls then act on that process's mm.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ckpt.kernel.sys import NR, libc, raise_errno, syscall

UFFD_API = 0xAA

# userfaultfd(2) creation flags.
UFFD_USER_MODE_ONLY = 1
UFFD_CREATE_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY

# UFFDIO_API features.
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

#: What ckpt asks for: writes resolved in the kernel, never-populated pages tracked too.
WP_ASYNC_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
COPY_STALLS = 100  # UFFDIO_COPY retries that copied nothing (EAGAIN) before giving up
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1


class uffdio_api(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [
        ("range", uffdio_range),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),  # out: bytes copied, or a negative errno
    ]


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


_IOC_WRITE = 1
_IOC_READ = 2

UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x3F, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0xAA, 0x01, ctypes.sizeof(uffdio_range))
UFFDIO_WRITEPROTECT = _ioc(
    _IOC_READ | _IOC_WRITE, 0xAA, 0x06, ctypes.sizeof(uffdio_writeprotect)
)
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x03, ctypes.sizeof(uffdio_copy))

assert UFFDIO_API == 0xC018AA3F
assert UFFDIO_REGISTER == 0xC020AA00
assert UFFDIO_UNREGISTER == 0x8010AA01
assert UFFDIO_WRITEPROTECT == 0xC018AA06
assert UFFDIO_COPY == 0xC028AA03


def _ioctl(fd: int, req: int, arg: ctypes.Structure, what: str) -> int:
    return syscall(NR.ioctl, fd, req, ctypes.addressof(arg), what=what)


def create_uffd_self(flags: int = UFFD_CREATE_FLAGS) -> int:
    """userfaultfd(2) in this process (probes and tests); returns the new fd."""
    return syscall(NR.userfaultfd, flags, what="userfaultfd")


def uffd_api(fd: int, features: int = WP_ASYNC_FEATURES) -> int:
    """UFFDIO_API handshake (once per fd); returns the features the kernel granted.

    The kernel fails with EINVAL if any requested feature is unsupported, so a success
    means every bit of ``features`` was granted.
    """
    arg = uffdio_api(api=UFFD_API, features=features, ioctls=0)
    _ioctl(fd, UFFDIO_API, arg, f"UFFDIO_API(features={features:#x})")
    return int(arg.features)


def uffd_register_wp(fd: int, start: int, length: int) -> None:
    """Register [start, start+length) for write-protect tracking (whole VMAs, page-aligned)."""
    uffd_register(fd, start, length, UFFDIO_REGISTER_MODE_WP)


def uffd_register(fd: int, start: int, length: int, mode: int) -> None:
    """Register [start, start+length) (whole VMAs, page-aligned) in ``mode``."""
    arg = uffdio_register(range=uffdio_range(start=start, len=length), mode=mode, ioctls=0)
    _ioctl(fd, UFFDIO_REGISTER, arg, f"UFFDIO_REGISTER({start:#x}+{length:#x})")


def uffd_copy(fd: int, dst: int, src: int, length: int) -> None:
    """UFFDIO_COPY: fill the missing pages [dst, dst+length) of the uffd's mm (registered
    MISSING) with ``length`` bytes at ``src`` in this process; all page-aligned. The kernel
    allocates each page and copies into it: no zeroing first, no fault per page. A copy
    cut short (EAGAIN: the mm is changing) goes on from where it stopped."""
    arg = uffdio_copy()
    stalls = 0
    while length:
        arg.dst, arg.src, arg.len, arg.mode, arg.copy = dst, src, length, 0, 0
        res = int(libc.syscall(ctypes.c_long(NR.ioctl), ctypes.c_long(fd),
                               ctypes.c_long(UFFDIO_COPY), ctypes.c_void_p(ctypes.addressof(arg))))
        err = ctypes.get_errno() if res == -1 else 0
        done = int(arg.copy) if res == -1 else length
        if done <= 0 and (err != errno.EAGAIN or stalls >= COPY_STALLS):
            raise_errno(err or -done, f"UFFDIO_COPY({dst:#x}+{length:#x})")
        stalls = stalls + 1 if done <= 0 else 0
        done = max(done, 0)
        dst, src, length = dst + done, src + done, length - done


def uffd_unregister(fd: int, start: int, length: int) -> None:
    """Drop the registration of [start, start+length)."""
    arg = uffdio_range(start=start, len=length)
    _ioctl(fd, UFFDIO_UNREGISTER, arg, f"UFFDIO_UNREGISTER({start:#x}+{length:#x})")


def uffd_writeprotect(fd: int, start: int, length: int, protect: bool = True) -> None:
    """Write-protect (or unprotect) a registered range; in async mode writes then mark
    pages WRITTEN for PAGEMAP_SCAN instead of faulting to a reader."""
    arg = uffdio_writeprotect(
        range=uffdio_range(start=start, len=length),
        mode=UFFDIO_WRITEPROTECT_MODE_WP if protect else 0,
    )
    verb = "protect" if protect else "unprotect"
    _ioctl(fd, UFFDIO_WRITEPROTECT, arg, f"UFFDIO_WRITEPROTECT {verb}({start:#x}+{length:#x})")
