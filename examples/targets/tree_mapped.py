"""A parent and its child playing ping-pong through files both map MAP_SHARED: a deleted
file in /dev/shm (as multiprocessing's POSIX semaphores are) and a memfd (its fd kept
open by both, as multiprocessing's heap arenas are).

usage: tree_mapped.py SHM_PATH

The parent makes SHM_PATH (a page), maps it and unlinks it, makes a memfd and maps it,
then forks. Ping-pong 1, in the /dev/shm file: the parent bumps the counter at offset 0
once the child has echoed it at offset 8. Ping-pong 2, in the memfd: the child bumps
offset 0 once the parent has echoed it at offset 8, its echo written through the fd
(pwrite), not the mapping. A side that sees the other's number jump or go back prints
"ERROR ..." and exits 1; each side prints "<side> round <n>" every 50 of its rounds.
Both go on only while they share the very same two files.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
import time

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]


def say(line: str) -> None:
    """One line in one write(2): parent and child share the output file's offset, and
    print's separate writes of text and newline could interleave between them."""
    os.write(1, (line + "\n").encode())


Cells = ctypes.Array[ctypes.c_uint64]  # two counters at offsets 0 and 8


def map_shared(fd: int) -> Cells:
    """A page of ``fd`` mapped MAP_SHARED, keeping no fd (Python's mmap keeps a dup; a
    POSIX semaphore's mapping, as sem_open makes it, has none)."""
    addr = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return (ctypes.c_uint64 * 2).from_address(addr)


def get(m: Cells, off: int) -> int:
    return int(m[off // 8])  # one 8-byte load (struct.pack_into zeroes, then writes)


def put(m: Cells, off: int, value: int) -> None:
    m[off // 8] = value


def play(me: str, lead: Cells, follow: Cells, follow_fd: int | None) -> None:
    """Lead one game (bump offset 0 of ``lead`` once it is echoed at 8), follow the other
    (echo offset 0 of ``follow`` at its offset 8: through ``follow_fd`` if given)."""
    rounds = echoed = 0
    while True:
        n, echo = get(lead, 0), get(lead, 8)
        if echo == n:
            put(lead, 0, n + 1)
            rounds += 1
            if rounds % 50 == 0:
                say(f"{me} round {n + 1}")
        elif echo != n - 1:
            say(f"ERROR {me}: my {n} echoed as {echo}")
            sys.exit(1)
        theirs = get(follow, 0)
        if theirs not in (echoed, echoed + 1):
            say(f"ERROR {me}: theirs went from {echoed} to {theirs}")
            sys.exit(1)
        if theirs != echoed:
            echoed = theirs
            if follow_fd is None:
                put(follow, 8, theirs)
            else:
                os.pwrite(follow_fd, struct.pack("Q", theirs), 8)
        time.sleep(0.002)


def main() -> None:
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, PAGE)
    shm = map_shared(fd)
    os.close(fd)
    os.unlink(sys.argv[1])
    mfd = os.memfd_create("tree-mapped")
    os.ftruncate(mfd, PAGE)
    mem = (ctypes.c_uint64 * 2).from_buffer(mmap.mmap(mfd, PAGE, mmap.MAP_SHARED))
    if os.fork() == 0:
        play("child", mem, shm, None)
    play("parent", shm, mem, mfd)


if __name__ == "__main__":
    main()
