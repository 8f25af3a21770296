"""Uses one fd it inherited from its launcher, who keeps its own copy (the object or open
file is shared with another process, as after a fork).

usage: fd_shared.py CONTROL MODE FD
    listener  FD is a listening TCP socket: each check says its port and that it listens
    eventfd   FD is an eventfd: each check adds 1 to its counter
    file      FD is an open file (a memfd too): each check writes a line at its position
              and says the position after it
"""

from __future__ import annotations

import os
import socket
import sys

from fdkit import serve


def setup(args: list[str]) -> tuple[str, int]:
    return args[0], int(args[1])


def check(state: tuple[str, int]) -> dict[str, object]:
    mode, fd = state
    if mode == "listener":
        sock = socket.socket(fileno=os.dup(fd))
        try:
            return {"port": sock.getsockname()[1],
                    "listens": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)}
        finally:
            sock.close()
    if mode == "eventfd":
        os.eventfd_write(fd, 1)
        return {"added": 1}
    if mode == "file":
        os.write(fd, b"line\n")
        return {"pos": os.lseek(fd, 0, os.SEEK_CUR)}
    sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    serve(setup, check)
