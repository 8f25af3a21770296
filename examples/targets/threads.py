"""Multi-threaded CPython target: every thread must come back, with its own TID.

The main thread (t0) and three threading.Threads (t1..t3) each count in their own loop
and write one line per step with a single write(2), so lines never interleave:

    t<k> <count> tid=<threading.get_native_id()>

usage: threads.py [PERIOD_SECONDS]   (default 0.05)
"""

from __future__ import annotations

import os
import sys
import threading
import time

WORKERS = 3


def count(k: int, period: float) -> None:
    tid = threading.get_native_id()
    n = 0
    while True:
        n += 1
        os.write(1, f"t{k} {n} tid={tid}\n".encode())
        time.sleep(period)


def main() -> None:
    period = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
    for k in range(1, WORKERS + 1):
        threading.Thread(target=count, args=(k, period), name=f"t{k}", daemon=True).start()
    count(0, period)


if __name__ == "__main__":
    main()
