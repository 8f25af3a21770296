"""Migration demo workload: MIB of memory, a slice of it rewritten every step, and a
progress line per step with a checksum of what it just wrote.

usage: workload.py MIB
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import time

PAGE = 4096


def main() -> None:
    size = int(sys.argv[1]) << 20
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block = os.urandom(1 << 20)
    for off in range(0, size, len(block)):
        mem[off : off + len(block)] = block
    pages = size // PAGE
    step = 0
    while True:
        step += 1
        first = (step * 97) % pages
        for k in range(64):  # ~256 KiB dirtied per step
            p = (first + k * 31) % pages
            mem[p * PAGE : p * PAGE + 8] = step.to_bytes(8, "little")
        digest = hashlib.sha256(mem[first * PAGE : (first + 1) * PAGE]).hexdigest()[:12]
        print(f"step={step} pid={os.getpid()} page={first} sha={digest}", flush=True)
        time.sleep(0.1)


if __name__ == "__main__":
    main()
