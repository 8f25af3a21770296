"""A process tree sharing MAP_SHARED|MAP_ANONYMOUS memory: a parent maps 8 MiB, writes a
pattern into every page, forks 2 children, and the three pass rounds through it.

usage: tree_shmem.py [split|parts]

    page 0    u64 round (the parent's slot), then one u64 ack per child (their slots)
    page k    u64 k at offset 0 (k = 1 .. 2047): written by the parent before the forks
    page 1+j  u64 at offset 8: how many rounds child j acked, written by it alone (the
              parent never writes this page after the forks), checked by it against
              its own private count each round

A round: the parent sets round r and waits until every child has acked r; a child that
sees round r checks the pattern of every page and that the other child acked r - 1 (it
cannot have seen r otherwise), then acks r. The parent checks the pattern each round too
and prints "round r" after each one. So the rounds go on only while the memory is one:
after a restore that lost the sharing, they stop; any wrong value prints "BAD ..." (each
member checks the others' writes itself). "ready" once both children are running; each
child prints "child J PID" first (J: 0, 1).

split   child 1 unmaps pages 3 .. 1023 of its mapping after the fork: its pages 1024 and
        on are a VMA of its own at object offset 4 MiB (checked like the others)
parts   the parent unmaps its last page after the forks: the children map a page of the
        object the parent (the owner in a dump) does not
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
import time

PAGE = mmap.PAGESIZE
SIZE = 8 << 20
CHILDREN = 2
PAUSE = 0.05  # seconds between rounds


def say(line: str) -> None:
    """One line in one write(2): parent and child share the output file's offset, and
    print's separate writes of text and newline could interleave between them."""
    os.write(1, (line + "\n").encode())


def get(m: mmap.mmap, off: int) -> int:
    return int(struct.unpack_from("Q", m, off)[0])


def put(m: mmap.mmap, off: int, n: int) -> None:
    struct.pack_into("Q", m, off, n)


libc = ctypes.CDLL(None, use_errno=True)
ALL = range(1, SIZE // PAGE)


def unmap(m: mmap.mmap, first: int, end: int) -> None:
    """munmap pages [first, end) of ``m`` (never touched again)."""
    at = ctypes.addressof(ctypes.c_char.from_buffer(m)) + first * PAGE
    if libc.munmap(ctypes.c_void_p(at), ctypes.c_size_t((end - first) * PAGE)) != 0:
        raise OSError(ctypes.get_errno(), "munmap")


def pattern_ok(m: mmap.mmap, pages: range | list[int] = ALL) -> bool:
    return all(get(m, k * PAGE) == k for k in pages)


def child(m: mmap.mmap, j: int, split: bool) -> None:
    pages: range | list[int] = ALL
    if split and j == 1:
        unmap(m, 3, 1024)
        pages = [1, 2, *range(1024, SIZE // PAGE)]
    say(f"child {j} {os.getpid()}")
    other = 1 + (1 - j)
    acked = count = 0
    mine = (1 + j) * PAGE + 8
    while True:
        if get(m, mine) != count:
            say(f"BAD child {j}: count {get(m, mine)}, not {count}")
            put(m, mine, count)
        r = get(m, 0)
        if r > acked:
            if not pattern_ok(m, pages):
                say(f"BAD child {j}: pattern")
            if get(m, 8 * other) < r - 1:
                say(f"BAD child {j}: round {r}, other ack {get(m, 8 * other)}")
            put(m, 8 * (1 + j), r)
            put(m, mine, count + 1)
            acked, count = r, count + 1
        time.sleep(0.005)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    m = mmap.mmap(-1, SIZE, mmap.MAP_SHARED)
    for k in range(1, SIZE // PAGE):
        put(m, k * PAGE, k)
    for j in range(CHILDREN):
        if os.fork() == 0:
            child(m, j, mode == "split")
            sys.exit(0)
    pages: range | list[int] = ALL
    if mode == "parts":
        unmap(m, SIZE // PAGE - 1, SIZE // PAGE)
        pages = range(1, SIZE // PAGE - 1)
    r = 0
    while True:
        r += 1
        put(m, 0, r)
        while any(get(m, 8 * (1 + j)) < r for j in range(CHILDREN)):
            time.sleep(0.005)
        if not pattern_ok(m, pages):
            say("BAD parent: pattern")
        say("ready" if r == 1 else f"round {r}")
        time.sleep(PAUSE)


if __name__ == "__main__":
    main()
