"""Signal actions that are SIG_DFL but not pristine: CPython installs SIG_DFL with
SA_ONSTACK and glibc adds SA_RESTORER and its restorer (sigaction() reads them back).
Prints a counter every 50 ms."""

from __future__ import annotations

import signal
import time


def main() -> None:
    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGWINCH):
        signal.signal(sig, signal.SIG_DFL)
    n = 0
    while True:
        n += 1
        print(n, flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
