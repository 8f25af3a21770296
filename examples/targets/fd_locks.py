"""File locks of every kind held in DIR (the first argument):

    DIR/flock   flock(LOCK_EX) through fd A (and its dup)
    DIR/shared  flock(LOCK_SH)
    DIR/dir     a directory, flock(LOCK_EX)
    DIR/posix   POSIX (fcntl F_SETLK) WRITE lock on bytes 0-9 through fd B, READ lock on
                bytes 100-EOF through fd C, a second open of the same file
    DIR/ofd     OFD (F_OFD_SETLK) WRITE lock on bytes 20-24
    DIR/lease   a READ lease (F_SETLEASE), opened read-only, signalled with SIGRTMIN+2
                (F_SETSIG; the default, SIGIO, would kill it): when someone opens the file
                for writing (the lease is being broken), the target gives it up
    DIR/wlease  a WRITE lease, opened read-write

Each check answers, per file, the "lock:" lines of its fds' fdinfo (without the pid,
which is the restored one after a restore) and the lease F_GETLEASE reports, and how many
lease breaks it has seen.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
from pathlib import Path
from typing import Any

from fdkit import serve

F_OFD_SETLK, F_SETSIG = 37, 10
BREAK_SIGNAL = signal.SIGRTMIN + 2
FLOCK = struct.Struct("hhqqi4x")
LEASES = {fcntl.F_RDLCK: "READ", fcntl.F_WRLCK: "WRITE", fcntl.F_UNLCK: "UNLCK"}


def setup(args: list[str]) -> dict[str, Any]:
    d = Path(args[0])
    fds: dict[str, int] = {}

    def make(name: str, flags: int) -> int:
        path = d / name
        path.write_bytes(b"x" * 200)
        return os.open(path, flags)

    fds["flock"] = make("flock", os.O_RDWR)
    fcntl.flock(fds["flock"], fcntl.LOCK_EX)
    fds["flock-dup"] = os.dup(fds["flock"])
    fds["shared"] = make("shared", os.O_RDONLY)
    fcntl.flock(fds["shared"], fcntl.LOCK_SH)
    (d / "dir").mkdir()
    fds["dir"] = os.open(d / "dir", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fds["dir"], fcntl.LOCK_EX)
    fds["posix"] = make("posix", os.O_RDWR)
    fcntl.lockf(fds["posix"], fcntl.LOCK_EX, 10, 0)
    fds["posix-2"] = os.open(d / "posix", os.O_RDONLY)
    fcntl.fcntl(fds["posix-2"], fcntl.F_SETLK, FLOCK.pack(fcntl.F_RDLCK, 0, 100, 0, 0))
    fds["ofd"] = make("ofd", os.O_RDWR)
    fcntl.fcntl(fds["ofd"], F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, 0, 20, 5, 0))
    fds["lease"] = make("lease", os.O_RDONLY)
    fcntl.fcntl(fds["lease"], F_SETSIG, BREAK_SIGNAL)
    fcntl.fcntl(fds["lease"], fcntl.F_SETLEASE, fcntl.F_RDLCK)
    fds["wlease"] = make("wlease", os.O_RDWR)
    fcntl.fcntl(fds["wlease"], fcntl.F_SETLEASE, fcntl.F_WRLCK)
    state: dict[str, Any] = {"fds": fds, "breaks": 0}

    def broken(signo: int, frame: object) -> None:
        state["breaks"] += 1
        fcntl.fcntl(fds["lease"], fcntl.F_SETLEASE, fcntl.F_UNLCK)

    signal.signal(BREAK_SIGNAL, broken)
    return state


def lock_lines(fd: int) -> list[str]:
    """'FLOCK ADVISORY WRITE 0 EOF' for each lock: line of fdinfo (pid and inode left out)."""
    out = []
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("lock:"):
            words = line.split()
            out.append(" ".join(words[2:5] + words[7:]))
    return out


def check(state: dict[str, Any]) -> dict[str, object]:
    fds = state["fds"]
    answer: dict[str, object] = {name: lock_lines(fd) for name, fd in fds.items()}
    answer["lease-type"] = LEASES[fcntl.fcntl(fds["lease"], fcntl.F_GETLEASE)]
    answer["breaks"] = state["breaks"]
    return answer


if __name__ == "__main__":
    serve(setup, check)
