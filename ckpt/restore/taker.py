"""Moving fds of ckpt into the stub with pidfd_getfd(2)."""

from __future__ import annotations

import os

from ckpt.kernel.sys import NR
from ckpt.restore.stub import Stub

O_CLOEXEC = 0o2000000


class Taker:
    """Moves fds of ckpt into the stub through a pidfd of ckpt that the stub holds: on fd
    ``slot`` (above every fd of the image), or where pidfd_open put it (``slot`` None)."""

    def __init__(self, stub: Stub, slot: int | None = None) -> None:
        self.stub, self.slot = stub, slot
        self.pidfd = -1

    def take(self, fd: int, what: str) -> int:
        stub = self.stub
        if self.pidfd < 0:
            pidfd = stub.sc(NR.pidfd_open, os.getpid(), 0, what="pidfd_open of ckpt")
            if self.slot is not None and pidfd != self.slot:
                stub.sc(NR.dup3, pidfd, self.slot, O_CLOEXEC, what="dup3 pidfd")
                stub.sc(NR.close, pidfd, what="close")
                pidfd = self.slot
            self.pidfd = pidfd
        return stub.sc(NR.pidfd_getfd, self.pidfd, fd, 0, what=f"pidfd_getfd ({what})")

    def close(self) -> None:
        """Close the stub's pidfd (if it made one)."""
        if self.pidfd >= 0:
            self.stub.sc(NR.close, self.pidfd, check=False)
            self.pidfd = -1
