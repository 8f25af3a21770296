"""eventfds with a counter in flight: a plain one holding 5, a semaphore holding 3
(EFD_SEMAPHORE: each read takes 1), a non-blocking empty one.

Each check reads the plain one whole, one unit of the semaphore, tries the empty one,
then writes the plain one's count back plus one: the answers change from one check to
the next as they would without a checkpoint in between.
"""

from __future__ import annotations

import os

from fdkit import serve


def setup(args: list[str]) -> tuple[int, int, int]:
    plain = os.eventfd(5)
    sem = os.eventfd(3, os.EFD_SEMAPHORE)
    empty = os.eventfd(0, os.EFD_NONBLOCK)
    return plain, sem, empty


def check(fds: tuple[int, int, int]) -> dict[str, object]:
    plain, sem, empty = fds
    value = os.eventfd_read(plain)
    os.eventfd_write(plain, value + 1)
    try:
        os.eventfd_read(empty)
        empty_says = "readable"
    except BlockingIOError:
        empty_says = "EAGAIN"
    return {"plain": value, "sem": os.eventfd_read(sem), "empty": empty_says}


if __name__ == "__main__":
    serve(setup, check)
