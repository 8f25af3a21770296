"""A target under seccomp filters (start it under `setpriv --nnp ...`, or as root).

The process installs a filter making uname(2) fail with EOPNOTSUPP (95), then one making
prctl(2) fail with ENOLINK (67): ckpt injects prctl calls, so a dump or restore that did
not suspend the filters would fail (or, had the filter said kill, kill it). A second thread
installs one more filter, for itself only, making getppid(2) fail with ENOTTY (25) (the
raw syscall, so the thread's filters differ from the leader's). Every PERIOD seconds each
thread writes one line (one write(2) each):

    main <n> uname=<errno or 0> prctl=<errno or 0> uid=<ruid>
    worker <n> getppid=<errno or 0> uname=<errno or 0>

so a restore that dropped a filter shows up as `uname=0`, `prctl=0` or `getppid=0`. With
--undumpable it also makes itself not dumpable (PR_SET_DUMPABLE 0); a restore must keep
the flag either way (changing the euid resets it).
With --drop (started as root, without no_new_privs) the filters are installed while
privileged and then every thread gives up root: groups 65534,100, gid and uid 65534, no
capabilities. Reinstalling such filters needs CAP_SYS_ADMIN, which the restored process
no longer has: a restore must install them before it takes the process's identity.
usage: seccomp_filtered.py [--undumpable] [--drop] [PERIOD_SECONDS]   (default 0.05)
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import threading
import time

SECCOMP_SET_MODE_FILTER = 1
NR_SECCOMP = 317
NR_GETPPID = 110
NR_UNAME = 63
NR_PRCTL = 157
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
AUDIT_ARCH_X86_64 = 0xC000003E
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
RET_KILL_PROCESS = 0x80000000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def deny(nr: int, err: int) -> bytes:
    """cBPF: on x86-64, syscall ``nr`` returns -``err``; everything else is allowed."""
    insns = [
        (BPF_LD_W_ABS, 0, 0, 4),               # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (BPF_RET_K, 0, 0, RET_KILL_PROCESS),
        (BPF_LD_W_ABS, 0, 0, 0),               # seccomp_data.nr
        (BPF_JEQ_K, 0, 1, nr),
        (BPF_RET_K, 0, 0, RET_ERRNO | err),
        (BPF_RET_K, 0, 0, RET_ALLOW),
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns)


def install(prog: bytes) -> None:
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    arg = ctypes.create_string_buffer(fprog, len(fprog))
    if libc.syscall(ctypes.c_long(NR_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                    ctypes.c_long(0), ctypes.c_long(ctypes.addressof(arg))) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")


def errno_of(nr: int) -> int:
    buf = ctypes.create_string_buffer(390)  # struct utsname
    res = libc.syscall(ctypes.c_long(nr), ctypes.c_long(ctypes.addressof(buf)))
    return ctypes.get_errno() if res < 0 else 0


def worker(period: float, ready: threading.Event) -> None:
    install(deny(NR_GETPPID, 25))
    ready.set()
    n = 0
    while True:
        n += 1
        os.write(1, f"worker {n} getppid={errno_of(NR_GETPPID)} "
                    f"uname={errno_of(NR_UNAME)}\n".encode())
        time.sleep(period)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    period = float(args[0]) if args else 0.05
    if "--undumpable" in sys.argv and libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_DUMPABLE")
    install(deny(NR_UNAME, 95))
    install(deny(NR_PRCTL, 67))
    ready = threading.Event()
    threading.Thread(target=worker, args=(period, ready), daemon=True).start()
    ready.wait()
    if "--drop" in sys.argv:  # glibc applies these to every thread
        os.setgroups([65534, 100])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
    n = 0
    while True:
        n += 1
        res = libc.syscall(ctypes.c_long(NR_PRCTL), ctypes.c_long(PR_GET_DUMPABLE))
        prctl = ctypes.get_errno() if res < 0 else 0
        os.write(1, f"main {n} uname={errno_of(NR_UNAME)} prctl={prctl} "
                    f"uid={os.getuid()}\n".encode())
        time.sleep(period)


if __name__ == "__main__":
    main()
