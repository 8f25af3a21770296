"""A process tree for incremental passes: a parent that forks CHILDREN workers, each with
its own 32 MiB filled with a pattern of its own, then stamping one page per step. Every
step a worker prints `c<child> <step> <crc32 of its 32 MiB>` (and first `a<child>
<address of its 32 MiB> <pid>`); the crc after any step is a pure function of (child, step)
(``expected``), so a restored worker's lines, or its memory in images, can be checked.
The parent prints `ready` once every worker has printed its first line; then it forks
one more worker (the next index) on each SIGUSR1, replaces worker 0 by a new worker (the
next index) under the same pid on SIGUSR2 (`reused PID`), and reaps workers that die.

usage: tree_worker.py [STEP_SECONDS]
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import sys
import time
import zlib

PAGE = 4096
SIZE = 32 << 20
CHILDREN = 2


def initial(child: int) -> bytes:
    """The worker's 32 MiB before step 1: bytes 0..255 shifted by ``child``."""
    return bytes((j + 31 * child) & 0xFF for j in range(256)) * (SIZE // 256)


def stamp(mem: bytearray | mmap.mmap, step: int) -> None:
    """Step ``step``: its number written at the start of one page (17 apart)."""
    off = (step * 17 % (SIZE // PAGE)) * PAGE
    mem[off : off + 8] = step.to_bytes(8, "little")


def expected(child: int, step: int) -> int:
    """The crc32 a worker prints after ``step``."""
    mem = bytearray(initial(child))
    for n in range(1, step + 1):
        stamp(mem, n)
    return zlib.crc32(mem)


def work(child: int, period: float, started: int) -> None:
    mem = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem[:] = initial(child)
    where = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    sys.stdout.write(f"a{child} {where:#x} {os.getpid()}\n")  # where its 32 MiB are
    step = 0
    while True:
        step += 1
        stamp(mem, step)
        sys.stdout.write(f"c{child} {step} {zlib.crc32(mem)}\n")
        sys.stdout.flush()
        if started >= 0:
            os.close(started)  # the parent's read ends when every worker closed its end
            started = -1
        time.sleep(period)


def spawn(child: int, period: float, pipe: tuple[int, int] | None = None,
          want: int = 0) -> int:
    """Fork worker ``child``; it closes ``pipe`` (its write end once started). With
    ``want``, a child that did not get that pid exits at once. Returns its pid."""
    pid = os.fork()
    if pid == 0:
        if want and os.getpid() != want:
            os._exit(0)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        if pipe is not None:
            os.close(pipe[0])
        work(child, period, pipe[1] if pipe is not None else -1)
    return pid


def respawn_as(pid: int, child: int, period: float) -> bool:
    """Worker ``child`` forked under ``pid``, just freed: ns_last_pid set to the pid
    before it (root only); other processes forking meanwhile may take it first, so
    tried again a few times."""
    for _ in range(100):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        got = spawn(child, period, want=pid)
        if got == pid:
            return True
        os.waitpid(got, 0)
    return False


def main() -> None:
    period = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
    asked: list[int] = []
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(signal.SIGUSR1))
    signal.signal(signal.SIGUSR2, lambda *_: asked.append(signal.SIGUSR2))
    r, w = os.pipe()
    workers = [spawn(child, period, (r, w)) for child in range(CHILDREN)]
    os.close(w)
    os.read(r, 1)  # EOF: every worker printed its first line
    os.close(r)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
        while asked:
            if asked.pop() == signal.SIGUSR1:  # one more worker
                workers.append(spawn(len(workers), period))
                continue
            # SIGUSR2: worker 0 killed, another worker (a new index) under its pid
            os.kill(workers[0], signal.SIGKILL)
            os.waitpid(workers[0], 0)
            reused = respawn_as(workers[0], len(workers), period)
            print(f"reused {workers[0]}" if reused else "not reused", flush=True)
            workers.append(workers[0])
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)  # a worker killed: reaped, gone from the tree


if __name__ == "__main__":
    main()
