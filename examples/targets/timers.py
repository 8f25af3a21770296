"""timers: a busy loop under a 1 ms interval timer, counting the signals it handles.

Every ~50 ms of work it prints ``n=<line> sigs=<signals handled so far>``; the signal
count must keep growing (a dump that swallowed the timer's signals, or died of one, shows).

usage: timers.py prof|real    ITIMER_PROF (SIGPROF, CPU time) or ITIMER_REAL (SIGALRM)
"""

import signal
import sys
import time
from types import FrameType

TIMERS = {"prof": (signal.ITIMER_PROF, signal.SIGPROF),
          "real": (signal.ITIMER_REAL, signal.SIGALRM)}
count = 0


def on_signal(signo: int, frame: FrameType | None) -> None:
    global count
    count += 1


def main() -> None:
    timer, signo = TIMERS[sys.argv[1]]
    signal.signal(signo, on_signal)
    signal.setitimer(timer, 0.001, 0.001)
    n = 0
    while True:
        x, end = 0, time.monotonic() + 0.05
        while time.monotonic() < end:
            x += 1
        n += 1
        print(f"n={n} sigs={count}", flush=True)


if __name__ == "__main__":
    main()
