"""A target with per-process settings and VMA flags a restore must bring back.

    pstate_misc.py [--oom N] [--loginuid N] [--uffd]

It sets its oom_score_adj (default 500) and loginuid (default 4242: its own, unset until
then; -1 leaves it unset), registers every membarrier registration the kernel accepts, and maps:

    guarded    16 pages, every page written with its index + 1, then guard regions
               (MADV_GUARD_INSTALL) on pages 4-5 and 9
    droppable  4 pages of MAP_DROPPABLE memory, written ("dp")
    sealed     4 pages, written, then mseal ("sl")
    sealedro   4 pages, written, a guard on page 2, made read-only, sealed
    maybeguard 4 pages, a guard installed and removed: only "gu" stays; then written
    locked     4 pages, mlock2 MLOCK_ONFAULT ("lo lf"), the first written
    shared     4 pages of MAP_SHARED anonymous memory, written ("sh ms")
    sharedro   this script, MAP_SHARED from an O_RDONLY fd ("ms" without "sh" or "mw")

With --uffd, one more 4-page mapping is registered with a userfaultfd in missing mode
("um", a flag no restore can set). A mapping the kernel refuses is left out. It prints
one `region addr=<hex> name=<name>` line per mapping, then `ready`; on SIGUSR1 it prints
`membarrier=<mask>` (what MEMBARRIER_CMD_GET_REGISTRATIONS says now), on SIGUSR2 it
installs one more guard region, on page 12 of guarded, and prints `guarded 12`, and each
second it prints `alive n=<n>`.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import signal
import struct
import time
from types import FrameType

PAGE = 4096
NR_MEMBARRIER, NR_MLOCK2, NR_MSEAL = 324, 325, 462
GET_REGISTRATIONS = 1 << 9
REGISTER = (1 << 2, 1 << 4, 1 << 6, 1 << 8)  # GLOBAL, PRIVATE, SYNC_CORE, RSEQ (expedited)
MADV_GUARD_INSTALL, MADV_GUARD_REMOVE = 102, 103
MAP_PRIVATE_ANON, MAP_DROPPABLE_ANON, MAP_SHARED_ANON = 0x22, 0x28, 0x21
FAILED = ctypes.c_void_p(-1).value
NR_USERFAULTFD, UFFDIO_API, UFFDIO_REGISTER = 323, 0xC018AA3F, 0xC020AA00

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def sc(*args: int) -> int:
    return int(libc.syscall(*(ctypes.c_long(a) for a in args)))


def mmap(pages: int, flags: int = MAP_PRIVATE_ANON) -> int:
    addr = sc(9, 0, pages * PAGE, 3, flags, -1, 0)
    return 0 if addr in (-1, FAILED) else addr


def uffd_missing(addr: int, length: int) -> int:
    """A userfaultfd with [addr, addr + length) registered in missing mode; its fd."""
    fd = sc(NR_USERFAULTFD, 0o2004000 | 1)  # O_CLOEXEC | O_NONBLOCK | USER_MODE_ONLY
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", addr, length, 1, 0)))
    return fd


def on_usr1(signo: int, frame: FrameType | None) -> None:
    print(f"membarrier={sc(NR_MEMBARRIER, GET_REGISTRATIONS, 0, 0)}", flush=True)


def guard_more(guarded: int) -> None:
    def on_usr2(signo: int, frame: FrameType | None) -> None:
        if sc(28, guarded + 12 * PAGE, PAGE, MADV_GUARD_INSTALL) == 0:
            print("guarded 12", flush=True)

    signal.signal(signal.SIGUSR2, on_usr2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--oom", type=int, default=500)
    parser.add_argument("--loginuid", type=int, default=4242)
    parser.add_argument("--uffd", action="store_true")
    args = parser.parse_args()
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(args.oom))
    if args.loginuid >= 0:  # -1: left unset
        with open("/proc/self/loginuid", "w") as f:
            f.write(str(args.loginuid))
    for cmd in REGISTER:
        sc(NR_MEMBARRIER, cmd, 0, 0)
    regions: dict[str, int] = {}
    if guarded := mmap(16):
        for i in range(16):
            ctypes.memset(guarded + i * PAGE, i + 1, PAGE)
        if (sc(28, guarded + 4 * PAGE, 2 * PAGE, MADV_GUARD_INSTALL) == 0
                and sc(28, guarded + 9 * PAGE, PAGE, MADV_GUARD_INSTALL) == 0):
            regions["guarded"] = guarded
    if droppable := mmap(4, MAP_DROPPABLE_ANON):
        ctypes.memset(droppable, 0x5A, 4 * PAGE)
        regions["droppable"] = droppable
    if sealed := mmap(4):
        ctypes.memset(sealed, 0x5E, 4 * PAGE)
        if sc(NR_MSEAL, sealed, 4 * PAGE, 0) == 0:
            regions["sealed"] = sealed
    if sealedro := mmap(4):
        ctypes.memset(sealedro, 0x5D, 4 * PAGE)
        if (sc(28, sealedro + 2 * PAGE, PAGE, MADV_GUARD_INSTALL) == 0
                and sc(10, sealedro, 4 * PAGE, 1) == 0  # PROT_READ
                and sc(NR_MSEAL, sealedro, 4 * PAGE, 0) == 0):
            regions["sealedro"] = sealedro
    if (maybe := mmap(4)) and (sc(28, maybe, PAGE, MADV_GUARD_INSTALL) == 0
                               and sc(28, maybe, PAGE, MADV_GUARD_REMOVE) == 0):
        ctypes.memset(maybe, 0x6E, 4 * PAGE)
        regions["maybeguard"] = maybe
    if (locked := mmap(4)) and sc(NR_MLOCK2, locked, 4 * PAGE, 1) == 0:
        ctypes.memset(locked, 0x10, PAGE)
        regions["locked"] = locked
    if shared := mmap(4, MAP_SHARED_ANON):
        ctypes.memset(shared, 0x5B, 4 * PAGE)
        regions["shared"] = shared
    fd = os.open(__file__, os.O_RDONLY)
    at = sc(9, 0, PAGE, 1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
    os.close(fd)
    if at not in (-1, FAILED):
        regions["sharedro"] = at
    if args.uffd and (missing := mmap(4)):
        uffd_missing(missing, 4 * PAGE)
        regions["uffd"] = missing
    for name, addr in regions.items():
        print(f"region addr={addr:x} name={name}", flush=True)
    signal.signal(signal.SIGUSR1, on_usr1)
    if "guarded" in regions:
        guard_more(regions["guarded"])
    print("ready", flush=True)
    n = 0
    while True:
        time.sleep(1)
        n += 1
        print(f"alive n={n}", flush=True)


if __name__ == "__main__":
    main()
