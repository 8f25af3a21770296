"""timerfd(2): its clock, interval, time left and expirations not yet read.

/proc/PID/fdinfo/N of a timerfd:

    clockid: 1                      CLOCK_MONOTONIC
    ticks: 4                        expirations not read yet
    settime flags: 01               TFD_TIMER_ABSTIME (octal), TFD_TIMER_CANCEL_ON_SET
    it_value: (0, 50390369)         time left (s, ns)
    it_interval: (0, 100000000)

A periodic timer that expired is left stopped by the kernel until the next read or
timerfd_gettime(2) counts the periods missed since: fdinfo's ticks lag until then. So the
collector first calls timerfd_gettime on ckpt's copy of the fd (what a read would do,
without taking the ticks), then reads ticks from that copy's fdinfo.

Restore makes a timerfd in ckpt and arms it (timerfd_settime) with the time it had left:
time stands still for it between dump and restore, as for setitimer timers. An absolute
timer on the wall clock (CLOCK_REALTIME[_ALARM] with TFD_TIMER_ABSTIME, and
TFD_TIMER_CANCEL_ON_SET if it had it) is armed for the same wall-clock time instead; an
absolute timer on another clock is armed with its time left. The expirations not read
are then set with TFD_IOC_SET_TICKS, so a read returns them as it would have.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds.base import FdKind, Opened, Peek, RestoreCtx
from ckpt.collect.fds import FdInfo, parse_fdinfo
from ckpt.errors import NotDumpable
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.anonfd import (
    TFD_TIMER_ABSTIME,
    timerfd_create,
    timerfd_gettime,
    timerfd_set_ticks,
    timerfd_settime,
)

CLOCK_REALTIME, CLOCK_REALTIME_ALARM = 0, 8
WALL_CLOCKS = frozenset({CLOCK_REALTIME, CLOCK_REALTIME_ALARM})
PAIR = re.compile(r"\((\d+), (\d+)\)")


@dataclass(frozen=True)
class TimerState:
    """A timerfd's fdinfo."""

    clockid: int
    ticks: int
    settime_flags: int
    value_ns: int  # time left; 0: disarmed
    interval_ns: int


def _ns(pair: str) -> int:
    m = PAIR.fullmatch(pair.strip())
    if m is None:
        raise ValueError(f"not a (seconds, nanoseconds) pair: {pair!r}")
    return int(m[1]) * 1_000_000_000 + int(m[2])


def parse(extra: tuple[tuple[str, str], ...]) -> TimerState:
    """The state in a timerfd's fdinfo lines (FdInfo.extra); NotDumpable if they are not
    what this module knows."""
    f = dict(extra)
    try:
        return TimerState(clockid=int(f["clockid"]), ticks=int(f["ticks"]),
                          settime_flags=int(f["settime flags"], 8),
                          value_ns=_ns(f["it_value"]), interval_ns=_ns(f["it_interval"]))
    except (KeyError, ValueError) as exc:
        raise NotDumpable(f"unexpected timerfd fdinfo ({exc})") from None


def read_state(fd: int) -> TimerState:
    """The state of ckpt's timerfd ``fd``, ticks counted up to now (see the module doc)."""
    timerfd_gettime(fd)
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return parse(parse_fdinfo(f.read())[4])


def claims(info: FdInfo, peek: Peek | None) -> bool:
    return info.target == "anon_inode:[timerfd]"


def collect(info: FdInfo, details: Any, peek: Peek, out: pb.OpenFile) -> None:
    with peek.getfd(info.fd) as local:
        s = read_state(local)
    t = out.timerfd
    t.clockid, t.ticks, t.settime_flags = s.clockid, s.ticks, s.settime_flags
    t.value_ns, t.interval_ns = s.value_ns, s.interval_ns
    t.clock_ns = time.clock_gettime_ns(s.clockid)


def arming(t: pb.TimerFd) -> tuple[int, int, int]:
    """(settime flags, it_value, it_interval) that arm a new timer as ``t`` was."""
    value = t.value_ns
    if not value and t.interval_ns:
        value = 1  # a periodic timer is never disarmed; 0 would disarm it
    if t.settime_flags & TFD_TIMER_ABSTIME and t.clockid in WALL_CLOCKS:
        return t.settime_flags, t.clock_ns + value if value else 0, t.interval_ns
    return 0, value, t.interval_ns  # CANCEL_ON_SET goes only with ABSTIME


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    t = f.timerfd
    with ctx.as_owner():
        fd = ctx.hold(timerfd_create(t.clockid, f.flags & os.O_NONBLOCK))
    flags, value, interval = arming(t)
    timerfd_settime(fd, flags, value, interval)
    # settime zeroed the ticks; an expiry since (a timer due at once) is counted in
    ticks = t.ticks + (read_state(fd).ticks if value else 0)
    if ticks:
        timerfd_set_ticks(fd, ticks)
    return Opened(fd)


KIND = FdKind("timerfd", pb.OpenFile.TIMERFD, claims, collect, restore)
