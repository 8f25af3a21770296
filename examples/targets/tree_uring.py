"""A three-level tree whose grandchild holds an io_uring fd (a kind of fd no restore can
bring back): root → child → grandchild. Each member writes ``ROLE N`` every 0.05 s;
the root first prints ``ready ROOT CHILD GRANDCHILD FD`` (FD: the grandchild's io_uring
fd) once the grandchild has it.

With ``single`` the root alone holds the io_uring fd and forks nothing (a reference for
the one-process refusal).

usage: tree_uring.py [single]
"""

from __future__ import annotations

import ctypes
import os
import sys

from tree_sessions import tick

SYS_IO_URING_SETUP = 425
libc = ctypes.CDLL(None, use_errno=True)


def io_uring() -> int:
    """io_uring_setup(4, &params): the ring's fd (no ring mapped)."""
    params = ctypes.create_string_buffer(120)
    fd = int(libc.syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(4), params))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
    return fd


def main() -> None:
    if sys.argv[1:] == ["single"]:
        fd = io_uring()
        print(f"ready {os.getpid()} {fd}", flush=True)
        tick("root")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        grandchild = os.fork()
        if grandchild == 0:
            fd = io_uring()
            os.write(w, f"{os.getppid()} {os.getpid()} {fd}".encode())
            os.close(w)
            tick("grandchild")
        os.close(w)
        tick("child")
    os.close(w)
    ids = os.read(r, 100).decode()
    os.close(r)
    print(f"ready {os.getpid()} {ids}", flush=True)
    tick("root")


if __name__ == "__main__":
    main()
