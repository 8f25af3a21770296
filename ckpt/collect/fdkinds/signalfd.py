"""signalfd(2): the set of signals it reads, from /proc/PID/fdinfo/N.

    sigmask:  0000000000000201     bit N-1: signal N (here SIGHUP and SIGUSR1)

A signalfd reads the signals pending for whichever thread reads it, so nothing but the
mask belongs to it: the process's pending signals come back with the process. Restore
makes a new signalfd in ckpt with that mask (SIGKILL and SIGSTOP, which the kernel drops
from it, never show) and the fd's O_NONBLOCK; the restored process takes it.
"""

from __future__ import annotations

import os
from typing import Any

from ckpt.collect.fdkinds.base import FdKind, Opened, Peek, RestoreCtx
from ckpt.collect.fds import FdInfo
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.anonfd import signalfd4


def parse(info: FdInfo) -> int:
    """The signal mask of a signalfd's fdinfo."""
    return int(dict(info.extra).get("sigmask", "0"), 16)


def claims(info: FdInfo, peek: Peek | None) -> bool:
    return info.target == "anon_inode:[signalfd]"


def collect(info: FdInfo, details: Any, peek: Peek, out: pb.OpenFile) -> None:
    out.signalfd.mask = parse(info)


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    with ctx.as_owner():
        return Opened(ctx.hold(signalfd4(f.signalfd.mask, f.flags & os.O_NONBLOCK)))


KIND = FdKind("signalfd", pb.OpenFile.SIGNALFD, claims, collect, restore)
