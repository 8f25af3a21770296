"""CPython counting target: the interpreter's own state must survive a checkpoint.

Writes the same fixed-width lines as counter.c to stdout, every PERIOD seconds:

    n=00000001 m=00000002 h=00000003 f=00000000.5 pid=0012345

n is a Python int, m lives in a private anonymous mmap, h in a heap bytearray, f is a
float.
usage: counter.py [PERIOD_SECONDS]   (default 0.05)
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time


def main() -> None:
    period = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
    area = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)
    heap = bytearray(64 * 1024)
    n = 0
    f = 0.0
    while True:
        n += 1
        struct.pack_into("<q", area, 8000, struct.unpack_from("<q", area, 8000)[0] + 2)
        struct.pack_into("<q", heap, 800, struct.unpack_from("<q", heap, 800)[0] + 3)
        f += 0.5
        m = struct.unpack_from("<q", area, 8000)[0]
        h = struct.unpack_from("<q", heap, 800)[0]
        sys.stdout.write(f"n={n:08d} m={m:08d} h={h:08d} f={f:010.1f} pid={os.getpid():07d}\n")
        sys.stdout.flush()
        time.sleep(period)


if __name__ == "__main__":
    main()
