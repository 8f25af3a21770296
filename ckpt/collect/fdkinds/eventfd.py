"""eventfd(2): its counter and semaphore mode, from /proc/PID/fdinfo/N.

    eventfd-count:                3      the counter, hex
    eventfd-semaphore: 1                 EFD_SEMAPHORE

Restore makes a new eventfd in ckpt with that counter and the fd's status flags
(O_NONBLOCK is EFD_NONBLOCK); the restored process takes it.
"""

from __future__ import annotations

import os
from typing import Any

from ckpt.collect.fdkinds.base import FdKind, Opened, Peek, RestoreCtx
from ckpt.collect.fds import FdInfo
from ckpt.images.pb import core_pb2 as pb

EFD_SEMAPHORE = 1


def parse(info: FdInfo) -> tuple[int, bool]:
    """(count, semaphore) of an eventfd's fdinfo."""
    fields = dict(info.extra)
    return int(fields.get("eventfd-count", "0"), 16), fields.get("eventfd-semaphore") == "1"


def claims(info: FdInfo, peek: Peek | None) -> bool:
    return info.target == "anon_inode:[eventfd]"


def collect(info: FdInfo, details: Any, peek: Peek, out: pb.OpenFile) -> None:
    count, semaphore = parse(info)
    out.eventfd.count = count
    out.eventfd.semaphore = semaphore


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    flags = (f.flags & os.O_NONBLOCK) | (EFD_SEMAPHORE if f.eventfd.semaphore else 0)
    with ctx.as_owner():
        fd = ctx.hold(os.eventfd(0, flags))  # initval is 32 bits wide; the counter 64
    if f.eventfd.count:
        os.eventfd_write(fd, f.eventfd.count)
    return Opened(fd)


KIND = FdKind("eventfd", pb.OpenFile.EVENTFD, claims, collect, restore)
