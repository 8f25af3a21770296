"""A target holding one thing a restore may not bring back, chosen by MODE.

Prints `ready <detail>` once set up, then `tick=N` every 0.05 s (and, in the shared-* modes,
stores N as 8 little-endian bytes at offset 0 of its MAP_SHARED mapping, so a reader of
the file sees the process run; it exits if that fails).

usage: unrestorable.py MODE DIR

Modes (DIR holds any file the mode creates):
  deleted-map     MAP_PRIVATE mapping of DIR/gone.bin, linked again as DIR/kept.bin, then
                  DIR/gone.bin is unlinked (deleted, but the file has another link)
  aio             an AIO context (io_setup): the kernel maps "/[aio] (deleted)"
  deleted-cwd     working directory DIR/p/cwd, then removed, and DIR/p too
  proc-cwd        working directory /proc/self (/proc/PID: another process's after restore)
  netns-fd        an fd on /proc/self/ns/net ("net:[...]")
  shared-rw       DIR/shared.bin opened O_RDWR and mapped MAP_SHARED twice: read-write,
                  then read-only (at a lower address); the fd closed
  shared-mprotect DIR/shared.bin mapped MAP_SHARED read-write, fd closed; read-only but
                  while a tick stores into it (mprotect each time: VmFlags "mw" stays)
  memfd           a memfd of 2 MiB (above the default --ghost-limit) mapped MAP_SHARED,
                  fd closed
  deleted-fd      an fd on DIR/gone.txt (2 MiB: above the default --ghost-limit), then the
                  file is unlinked
  child           a child process (sleeps; killed when the target dies)
  sysv-partial    a System V shared memory segment attached, one page of it unmapped
  fanotify        a fanotify group (an anon inode no fd kind claims)
  dev-zero-fd     an fd on /dev/zero (a character device other than /dev/null)
  kmsg-fd         an fd on /dev/kmsg (a character device with state: its read position)
  chroot          chrooted into DIR
  posix-timer     a POSIX timer on the CPU clock of its parent (timer_create, never armed)
  shm-alias       shared anonymous memory mapped at a second address (mremap, size 0)
  thread-cwd      a thread that unshare(CLONE_FS)'d and moved to DIR
  deleted-fifo    an fd on the FIFO DIR/fifo (O_RDWR), then the FIFO is unlinked
  eventfd-flock   an eventfd with an flock() held on it (a lock on an fd not reopened by
                  path)
  plain           nothing special (control)
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import struct
import sys
import threading
import time

from fdkit import libc, sc

PAGE = 4096
NR_MMAP, NR_MPROTECT, NR_IO_SETUP, NR_UNSHARE, NR_FANOTIFY_INIT = 9, 10, 206, 272, 300
NR_MREMAP = 25
PR_SET_PDEATHSIG = 1
CLONE_FS, MAP_ANONYMOUS, MREMAP_MAYMOVE = 0x200, 0x20, 1
PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE = 1, 2, 1, 2
IPC_PRIVATE, IPC_CREAT = 0, 0o1000


def setup(mode: str, where: str) -> tuple[str, object]:
    """Do what ``mode`` says; return the detail for the ready line and what to keep."""
    if mode == "deleted-map":
        path = os.path.join(where, "gone.bin")
        with open(path, "wb") as f:
            f.write(b"g" * 4 * PAGE)
        fd = os.open(path, os.O_RDONLY)
        addr = sc(NR_MMAP, 0, 4 * PAGE, PROT_READ, MAP_PRIVATE, fd, 0)
        os.close(fd)
        os.link(path, os.path.join(where, "kept.bin"))
        os.unlink(path)
        return path, addr
    if mode == "aio":
        ctx = ctypes.c_ulong(0)
        sc(NR_IO_SETUP, 8, ctypes.addressof(ctx))
        return f"{ctx.value:#x}", ctx
    if mode == "deleted-cwd":
        path = os.path.join(where, "p", "cwd")
        os.makedirs(path)
        os.chdir(path)
        os.rmdir(path)
        os.rmdir(os.path.dirname(path))
        return path, None
    if mode == "proc-cwd":
        os.chdir("/proc/self")
        return os.getcwd(), None
    if mode == "netns-fd":
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        return str(fd), fd
    if mode in ("shared-rw", "shared-mprotect"):
        path = os.path.join(where, "shared.bin")
        with open(path, "wb") as f:
            f.write(bytes(4 * PAGE))
        fd = os.open(path, os.O_RDWR)
        rw = sc(NR_MMAP, 0, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if mode == "shared-rw":
            sc(NR_MMAP, 0, 4 * PAGE, PROT_READ, MAP_SHARED, fd, 0)
        else:
            sc(NR_MPROTECT, rw, 4 * PAGE, PROT_READ)
        os.close(fd)
        return path, rw
    if mode == "memfd":
        fd = os.memfd_create("ckpt-test")
        os.ftruncate(fd, 2 << 20)
        addr = sc(NR_MMAP, 0, 2 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        os.close(fd)
        return "memfd", addr
    if mode == "deleted-fd":
        path = os.path.join(where, "gone.txt")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 2 << 20)
        os.unlink(path)
        return str(fd), fd
    if mode == "child":
        pid = os.fork()
        if pid == 0:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the target
            if os.getppid() == 1:
                os._exit(0)
            while True:
                time.sleep(3600)
        return str(pid), pid
    if mode == "sysv-partial":
        shmid = libc.shmget(IPC_PRIVATE, 4 * PAGE, IPC_CREAT | 0o600)
        libc.shmat.restype = ctypes.c_void_p
        addr = libc.shmat(shmid, None, 0)
        libc.shmctl(shmid, 0, None)  # IPC_RMID: gone once detached
        libc.munmap(ctypes.c_void_p(addr + PAGE), PAGE)
        return f"{addr:#x}", addr
    if mode == "fanotify":
        fd = sc(NR_FANOTIFY_INIT, 0, os.O_RDONLY)
        return str(fd), fd
    if mode == "deleted-fifo":
        path = os.path.join(where, "fifo")
        os.mkfifo(path)
        fd = os.open(path, os.O_RDWR)
        os.unlink(path)
        return str(fd), fd
    if mode in ("dev-zero-fd", "kmsg-fd"):
        fd = os.open("/dev/zero" if mode == "dev-zero-fd" else "/dev/kmsg", os.O_RDONLY)
        return str(fd), fd
    if mode == "thread-cwd":
        moved = threading.Event()

        def own_cwd() -> None:
            sc(NR_UNSHARE, CLONE_FS)
            os.chdir(where)
            moved.set()
            while True:
                time.sleep(3600)

        threading.Thread(target=own_cwd, daemon=True).start()
        moved.wait()
        return where, None
    if mode == "eventfd-flock":
        fd = os.eventfd(0)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return str(fd), fd
    if mode == "posix-timer":
        timer, clock = ctypes.c_int(0), ctypes.c_int(0)
        if libc.clock_getcpuclockid(os.getppid(), ctypes.byref(clock)) != 0:
            raise OSError(ctypes.get_errno(), "clock_getcpuclockid")
        if libc.timer_create(clock, None, ctypes.byref(timer)) != 0:
            raise OSError(ctypes.get_errno(), "timer_create")
        return f"{timer.value} {os.getppid()}", timer
    if mode == "shm-alias":
        addr = sc(NR_MMAP, 0, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                  -1, 0)
        alias = sc(NR_MREMAP, addr, 0, 4 * PAGE, MREMAP_MAYMOVE)
        return f"{addr:#x} {alias:#x}", addr
    if mode == "chroot":
        os.chroot(where)
        return where, None
    if mode == "plain":
        return "-", None
    raise SystemExit(f"unknown mode {mode}")


def main() -> None:
    mode, where = sys.argv[1], sys.argv[2]
    detail, kept = setup(mode, where)
    print(f"ready {detail}", flush=True)
    n = 0
    while True:
        n += 1
        if mode.startswith("shared-"):
            assert isinstance(kept, int)
            store(kept, n, mode == "shared-mprotect")
        print(f"tick={n}", flush=True)
        time.sleep(0.05)


def store(addr: int, n: int, unprotect: bool) -> None:
    """n at ``addr`` (a MAP_SHARED mapping); with ``unprotect``, writable only meanwhile."""
    try:
        if unprotect:
            sc(NR_MPROTECT, addr, 4 * PAGE, PROT_READ | PROT_WRITE)
        ctypes.memmove(addr, struct.pack("<Q", n), 8)
        if unprotect:
            sc(NR_MPROTECT, addr, 4 * PAGE, PROT_READ)
    except OSError as exc:
        print(f"store failed: {exc}", flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
