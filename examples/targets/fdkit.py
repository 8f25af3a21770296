"""A small kit for targets that hold fds of one kind and report their state on request.

A target calls :func:`serve` with its set-up and its check: the set-up makes the fds and
returns whatever the check needs; ``serve`` prints ``ready`` and then, each time a file
``<control>.N`` appears (N = 1, 2, ...), prints one line: the check's result as JSON. So
a test asks the same question before the dump and after the restore and compares the
answers; the target goes on doing what it would have done without the checkpoint.

usage of a target: <target>.py CONTROL [args...]

:func:`sc` makes a raw syscall (for calls Python's os module lacks).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

S = TypeVar("S")
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def sc(nr: int, *args: int) -> int:
    """syscall(nr, *args); OSError on -1. Every argument is passed as a C long."""
    res = int(libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def serve(setup: Callable[[list[str]], S], check: Callable[[S], Any]) -> None:
    control, args = sys.argv[1], sys.argv[2:]
    state = setup(args)
    print("ready", flush=True)
    n = 1
    while True:
        if os.path.exists(f"{control}.{n}"):
            print(json.dumps(check(state)), flush=True)
            n += 1
        time.sleep(0.02)
