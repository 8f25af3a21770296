"""A tree whose members fork and exit on request, for races with a freeze:

    root      never reaps anything
    ├── forker    on SIGUSR1 forks a child, "forked", that ticks
    └── leaver    on SIGUSR2 exits with status 3 (a zombie of the root from then on)

Every live member writes ``ROLE N`` every 0.05 s (tree_sessions.tick); the root first
prints ``ready FORKER LEAVER``.

usage: tree_race.py
"""

from __future__ import annotations

import os
import signal
from types import FrameType

from tree_sessions import tick


def fork_one(signo: int, frame: FrameType | None) -> None:
    if os.fork() == 0:
        tick("forked")


def leave(signo: int, frame: FrameType | None) -> None:
    os._exit(3)


def main() -> None:
    # set in the parent first: a signal sent right after the fork is not lost
    signal.signal(signal.SIGUSR1, fork_one)
    forker = os.fork()
    if forker == 0:
        tick("forker")
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, leave)
    leaver = os.fork()
    if leaver == 0:
        tick("leaver")
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    print(f"ready {forker} {leaver}", flush=True)
    tick("root")


if __name__ == "__main__":
    main()
