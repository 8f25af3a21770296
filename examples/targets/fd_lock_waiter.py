"""Threads waiting for locks another process holds (DIR is the first argument):

    DIR/wait-flock   a thread blocks in flock(LOCK_EX)
    DIR/wait-posix   a thread blocks in fcntl(F_SETLKW) for a WRITE lock on bytes 0-9

Each check answers, per file, whether its thread got the lock yet.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from fdkit import serve


def setup(args: list[str]) -> dict[str, threading.Event]:
    d = Path(args[0])
    got = {"flock": threading.Event(), "posix": threading.Event()}

    def wait_flock() -> None:
        fcntl.flock(os.open(d / "wait-flock", os.O_RDWR), fcntl.LOCK_EX)
        got["flock"].set()

    def wait_posix() -> None:
        fcntl.lockf(os.open(d / "wait-posix", os.O_RDWR), fcntl.LOCK_EX, 10, 0)
        got["posix"].set()

    for run in (wait_flock, wait_posix):
        threading.Thread(target=run, daemon=True).start()
    return got


def check(got: dict[str, threading.Event]) -> dict[str, bool]:
    return {name: event.is_set() for name, event in got.items()}


if __name__ == "__main__":
    serve(setup, check)
