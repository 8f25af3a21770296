"""A target that dirties memory faster than any link: every page of 32 MiB is rewritten
again and again. The region starts random, so its pages do not compress: how long a round
takes depends on the link, not on how well zstd packs zeros. Prints
`n=<pass> pid=<pid> sum=<checksum of the region>` every 20 passes.

usage: dirtier.py
"""

from __future__ import annotations

import hashlib
import mmap
import os

PAGE = 4096
SIZE = 32 << 20


def main() -> None:
    mem = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(mem)
    view[:] = os.urandom(SIZE)
    n = 0
    while True:
        n += 1
        stamp = n.to_bytes(8, "little")
        for off in range(0, SIZE, PAGE):
            view[off : off + 8] = stamp
        if n % 20 == 0:
            digest = hashlib.sha256(mem).hexdigest()[:16]
            print(f"n={n // 20:08d} sum={digest} pid={os.getpid()}", flush=True)


if __name__ == "__main__":
    main()
