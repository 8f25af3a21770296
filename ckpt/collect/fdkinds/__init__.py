"""The fd kind table: every kind of fd a dump can carry beyond plain files, one module
each with its collector and restorer side by side (see :mod:`ckpt.collect.fdkinds.base`).

An fd no row claims falls to ckpt.collect.restorable's rules: a regular file, directory or
stateless device is reopened by path; anything else is refused before the freeze.
"""

from __future__ import annotations

from ckpt.collect.fdkinds import (
    epoll,
    eventfd,
    inet,
    inotify,
    memfd,
    pipe,
    signalfd,
    timerfd,
    unix,
)
from ckpt.collect.fdkinds.base import FdKind, Peek
from ckpt.collect.fds import FdInfo

KINDS: tuple[FdKind, ...] = (
    eventfd.KIND,
    pipe.KIND,
    epoll.KIND,
    timerfd.KIND,
    signalfd.KIND,
    inotify.KIND,
    memfd.MEMFD,
    memfd.GHOST,
    inet.KIND,
    unix.KIND,
)

BY_TYPE = {k.image_type: k for k in KINDS}


def kind_of(info: FdInfo, peek: Peek | None) -> FdKind | None:
    """The row that claims this fd, or None."""
    for kind in KINDS:
        if kind.claims(info, peek):
            return kind
    return None
