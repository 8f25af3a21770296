"""Typed errors. Every expected failure reaches the user as one line and an exit code."""

from __future__ import annotations


class CkptError(Exception):
    """Base of every error ckpt reports to the user (one line, no traceback)."""

    exit_code = 1


class NoSuchProcess(CkptError):
    def __init__(self, pid: int, what: str = "") -> None:
        super().__init__(f"no such process: {pid}{(' (' + what + ')') if what else ''}")
        self.pid = pid


class AccessDenied(CkptError):
    def __init__(self, pid: int, what: str) -> None:
        super().__init__(f"permission denied on process {pid}: {what}")
        self.pid = pid


class NotDumpable(CkptError):
    """The target has state ckpt cannot checkpoint (kernel thread, unsupported fd, ...)."""


class ImageError(CkptError):
    """An image is missing, incomplete, corrupted or of another format version."""


class RestoreError(CkptError):
    """Restore could not rebuild the process; nothing half-built is left behind."""


class KernelError(CkptError):
    """A syscall failed unexpectedly; carries the errno."""

    def __init__(self, errno_: int, what: str) -> None:
        import os

        super().__init__(f"{what}: {os.strerror(errno_)}")
        self.errno = errno_
