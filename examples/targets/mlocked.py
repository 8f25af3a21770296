"""A process that called mlockall: ``mlocked.py MODE``, MODE ``future`` (MCL_FUTURE),
``onfault`` (MCL_FUTURE | MCL_ONFAULT) or ``current`` (MCL_CURRENT only: its mappings
locked now, none in the future). Prints ``n=N`` every 50 ms."""

from __future__ import annotations

import ctypes
import sys
import time

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MODES = {"future": MCL_FUTURE, "onfault": MCL_FUTURE | MCL_ONFAULT, "current": MCL_CURRENT}


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MODES[sys.argv[1]]) != 0:
        raise SystemExit(f"mlockall: errno {ctypes.get_errno()}")
    n = 0
    while True:
        n += 1
        print(f"n={n}", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
