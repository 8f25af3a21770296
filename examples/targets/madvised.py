"""A target with one small anonymous region per madvise or mlock flag that smaps shows.

    madvised.py

Each region is 2 MiB, with a guard page between neighbours (so they never merge), gets
one advice (MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTDUMP, MADV_DONTFORK,
MADV_WIPEONFORK, MADV_MERGEABLE, MADV_SEQUENTIAL, MADV_RANDOM) or lock (mlock2 with flags
0 or MLOCK_ONFAULT), and a written first page; one the kernel refuses is left out. One
more region, 1 TiB, is mapped on its own with MAP_NORESERVE (VmFlags "nr", not "ac"),
its first page written with 9s and its last with 10s; and a runtime-like heap, a 64 GiB
PROT_NONE reservation whose first 32 MiB are made RW and filled (COMMITTED, RESERVED). It
prints one `region addr=<hex> advice=<name>` line per region, then `ready`, then sleeps;
the checker compares the regions' VmFlags.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import time

ADVICE = {"HUGEPAGE": 14, "NOHUGEPAGE": 15, "DONTDUMP": 16, "DONTFORK": 10,
          "WIPEONFORK": 18, "MERGEABLE": 12, "SEQUENTIAL": 2, "RANDOM": 1,
          "LOCKED": -1, "LOCKONFAULT": -2}  # negative: mlock2 with flags -advice - 1
NR_MLOCK2 = 325
SIZE = 2 << 20
HUGE = 1 << 40
RESERVED, COMMITTED = 64 << 30, 32 << 20
PAGE = mmap.PAGESIZE


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    span = len(ADVICE) * (SIZE + PAGE)
    base = libc.mmap(None, span, 3, 0x22, -1, 0)  # RW, private anonymous
    if base in (None, ctypes.c_void_p(-1).value):
        sys.exit("mmap failed")
    for i, (name, advice) in enumerate(ADVICE.items()):
        addr = base + i * (SIZE + PAGE)
        libc.mprotect(addr + SIZE, PAGE, 0)  # the guard page after it
        if advice < 0:
            if libc.syscall(NR_MLOCK2, ctypes.c_void_p(addr), SIZE, -advice - 1) != 0:
                continue
        elif libc.madvise(addr, SIZE, advice) != 0:
            continue
        ctypes.memset(addr, i + 1, PAGE)
        print(f"region addr={addr:x} advice={name}", flush=True)
    # MAP_NORESERVE ("nr", no "ac"), 1 TiB: a sparse reservation (ASan shadow, runtime
    # heaps) that no overcommit heuristic would grant without the flag
    nr = libc.mmap(None, HUGE, 3, 0x22 | 0x4000, -1, 0)
    if nr not in (None, ctypes.c_void_p(-1).value):
        ctypes.memset(nr, 9, PAGE)
        ctypes.memset(nr + HUGE - PAGE, 10, PAGE)
        print(f"region addr={nr:x} advice=NORESERVE", flush=True)
    # a runtime's heap: a 64 GiB PROT_NONE reservation whose first 32 MiB are committed
    # (made RW and written), two neighbouring VMAs
    resv = libc.mmap(None, RESERVED, 0, 0x22 | 0x4000, -1, 0)
    if resv not in (None, ctypes.c_void_p(-1).value):
        libc.mprotect(resv, COMMITTED, 3)
        ctypes.memset(resv, 11, COMMITTED)
        print(f"region addr={resv:x} advice=COMMITTED", flush=True)
        print(f"region addr={resv + COMMITTED:x} advice=RESERVED", flush=True)
    print("ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
