"""Anon-inode fds with state in flight, chosen by MODE; each check answers the same
question again and leaves the state as it found it (see fdkit.py).

usage: fd_anon.py CONTROL MODE [DIR]

  epoll          epoll set A watching: eventfd R (count 7, level-triggered, data
                 0x1111222233334444), eventfd I (empty, data 0x10), eventfd O (count 1,
                 EPOLLONESHOT that already fired, data 0x20) and epoll set B (data 0x30),
                 which watches R, and eventfd X (empty, EPOLLEXCLUSIVE|EPOLLWAKEUP, data
                 0x50). Check: what A reports (R and B; O is disarmed), then after
                 a write to I (reported, then read back), then after O is armed again
                 (reported once, then disarmed again). Epoll set C watches eventfd E
                 (count 1, EPOLLET, data 0x40) whose edge it reported: C reports nothing
                 until a write to E (reported once; E is then read and written again,
                 that edge taken by a wait). And the registrations of A and C as their
                 fdinfo shows them.
  epoll-closed   epoll set watching an eventfd (count 1, data 5) whose fd was closed
                 after a dup() of it: the registration outlives the fd (refused)
  epoll-unready  epoll set watching a timerfd (data 5) with EPOLLONESHOT: it fired and the
                 expiry was read, so the timerfd is ready for nothing (refused)
  timerfd        a one-shot timer that expired and was not read, a periodic one (50 ms),
                 and an absolute CLOCK_REALTIME one (TFD_TIMER_CANCEL_ON_SET) an hour
                 ahead. Check: reads the expired one (1) and arms it again to expire at once,
                 waits for a period of the periodic one, reports the absolute one's flags.
  signalfd       SIGUSR1 and SIGUSR2 blocked, a non-blocking signalfd for both. Check:
                 the signals it reads.
  inotify        watches on DIR/a (wd 1, IN_CREATE) and DIR (wd 3, IN_CREATE); wd 2 was
                 on DIR/b, removed. Check: creates DIR/new and DIR/a/new, reports the
                 events read, removes both files.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import time

from fdkit import libc, sc, serve

NR_EPOLL_WAIT, NR_EPOLL_CTL, NR_TIMERFD_CREATE, NR_TIMERFD_SETTIME = 232, 233, 283, 286
NR_SIGNALFD4, NR_EPOLL_CREATE1, NR_INOTIFY_INIT1 = 289, 291, 294
EPOLL_CTL_ADD, EPOLL_CTL_MOD = 1, 3
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
CLOCK_REALTIME, CLOCK_MONOTONIC = 0, 1
TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2
IN_CREATE, IN_IGNORED = 0x100, 0x8000
EVENT = struct.Struct("<IQ")


# --------------------------------------------------------------------------- epoll

def ctl(ep: int, op: int, fd: int, events: int, data: int) -> None:
    ev = ctypes.create_string_buffer(EVENT.pack(events, data))
    sc(NR_EPOLL_CTL, ep, op, fd, ctypes.addressof(ev))


def wait(ep: int) -> list[list[str]]:
    """What ``ep`` reports now: sorted [data, events] in hex."""
    buf = ctypes.create_string_buffer(EVENT.size * 16)
    n = sc(NR_EPOLL_WAIT, ep, ctypes.addressof(buf), 16, 0)
    got = [EVENT.unpack_from(buf.raw, i * EVENT.size) for i in range(n)]
    return sorted([f"{data:#x}", f"{events:#x}"] for events, data in got)


def epoll_setup(args: list[str]) -> tuple[int, ...]:
    a, b = sc(NR_EPOLL_CREATE1, 0), sc(NR_EPOLL_CREATE1, 0)
    r, i, o = os.eventfd(7), os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(1)
    ctl(b, EPOLL_CTL_ADD, r, select.EPOLLIN, 0x99)
    ctl(a, EPOLL_CTL_ADD, r, select.EPOLLIN, 0x1111222233334444)
    ctl(a, EPOLL_CTL_ADD, i, select.EPOLLIN, 0x10)
    ctl(a, EPOLL_CTL_ADD, o, select.EPOLLIN | EPOLLONESHOT, 0x20)
    ctl(a, EPOLL_CTL_ADD, b, select.EPOLLIN, 0x30)
    x = os.eventfd(0)  # never written: only its flags show
    ctl(a, EPOLL_CTL_ADD, x, select.EPOLLIN | EPOLLEXCLUSIVE | EPOLLWAKEUP, 0x50)
    wait(a)  # O fires: disarmed from now on
    c, e = sc(NR_EPOLL_CREATE1, 0), os.eventfd(1)
    ctl(c, EPOLL_CTL_ADD, e, select.EPOLLIN | EPOLLET, 0x40)
    wait(c)  # E's edge is reported
    return a, i, o, c, e


def epoll_check(fds: tuple[int, ...]) -> dict[str, object]:
    a, i, o, c, e = fds
    quiet = wait(c)
    os.eventfd_write(e, 1)
    edge = wait(c)
    os.eventfd_write(e, os.eventfd_read(e) - 1)
    wait(c)
    ready = wait(a)
    os.eventfd_write(i, 1)
    written = wait(a)
    os.eventfd_read(i)
    ctl(a, EPOLL_CTL_MOD, o, select.EPOLLIN | EPOLLONESHOT, 0x20)
    armed = wait(a)
    return {"ready": ready, "written": written, "armed": armed, "after": wait(a),
            "et_quiet": quiet, "et_edge": edge, "a": registrations(a), "c": registrations(c)}


def registrations(ep: int) -> list[list[str]]:
    """[data, events] of each registration of ``ep``, from its fdinfo."""
    with open(f"/proc/self/fdinfo/{ep}") as f:
        lines = [line.split() for line in f if line.startswith("tfd:")]
    return sorted([f"{int(w[5], 16):#x}", w[3]] for w in lines)


def epoll_closed_setup(args: list[str]) -> tuple[int, ...]:
    ep = sc(NR_EPOLL_CREATE1, 0)
    e = os.eventfd(1)
    kept = os.dup(e)
    ctl(ep, EPOLL_CTL_ADD, e, select.EPOLLIN, 5)
    os.close(e)
    return ep, kept


def epoll_unready_setup(args: list[str]) -> tuple[int, ...]:
    ep = sc(NR_EPOLL_CREATE1, 0)
    t = sc(NR_TIMERFD_CREATE, CLOCK_MONOTONIC, 0)
    ctl(ep, EPOLL_CTL_ADD, t, select.EPOLLIN | EPOLLONESHOT, 5)
    settime(t, 0, 1, 0)
    assert wait_blocking(ep) == [["0x5", "0x1"]]
    os.read(t, 8)
    return (ep,)


def wait_blocking(ep: int) -> list[list[str]]:
    select.select([ep], [], [])
    return wait(ep)


def epoll_closed_check(fds: tuple[int, ...]) -> dict[str, object]:
    return {"ready": wait(fds[0])}


# --------------------------------------------------------------------------- timerfd

def settime(fd: int, flags: int, value_ns: int, interval_ns: int) -> None:
    spec = ctypes.create_string_buffer(struct.pack(
        "4q", interval_ns // 10**9, interval_ns % 10**9, value_ns // 10**9, value_ns % 10**9))
    sc(NR_TIMERFD_SETTIME, fd, flags, ctypes.addressof(spec), 0)


def expire_now(fd: int) -> None:
    """Arm one-shot ``fd`` to expire at once and wait until it did (not reading it)."""
    settime(fd, 0, 1, 0)
    select.select([fd], [], [])


def timerfd_setup(args: list[str]) -> tuple[int, ...]:
    pending = sc(NR_TIMERFD_CREATE, CLOCK_MONOTONIC, os.O_NONBLOCK)
    expire_now(pending)
    periodic = sc(NR_TIMERFD_CREATE, CLOCK_MONOTONIC, 0)
    settime(periodic, 0, 50_000_000, 50_000_000)
    wall = sc(NR_TIMERFD_CREATE, CLOCK_REALTIME, os.O_NONBLOCK)
    settime(wall, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, time.time_ns() + 3600 * 10**9, 0)
    return pending, periodic, wall


def fdinfo(fd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def timerfd_check(fds: tuple[int, ...]) -> dict[str, object]:
    pending, periodic, wall = fds
    try:
        expired = struct.unpack("Q", os.read(pending, 8))[0]
    except BlockingIOError:
        expired = "EAGAIN"
    expire_now(pending)
    ticks = struct.unpack("Q", os.read(periodic, 8))[0]
    info = fdinfo(wall)
    left_s = _ns(info["it_value"]) / 1e9
    return {"expired": expired, "periodic": ticks >= 1,
            "interval": fdinfo(periodic)["it_interval"], "wall_flags": info["settime flags"],
            "wall_clock": info["clockid"], "wall_in_an_hour": 3000 < left_s <= 3600}


def _ns(pair: str) -> int:
    s, ns = pair.strip("()").split(",")
    return int(s) * 10**9 + int(ns)


# --------------------------------------------------------------------------- signalfd

def signalfd_setup(args: list[str]) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    mask = ctypes.c_uint64((1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGUSR2 - 1)))
    return sc(NR_SIGNALFD4, -1, ctypes.addressof(mask), 8, os.O_NONBLOCK)


def signalfd_check(fd: int) -> dict[str, object]:
    got = []
    while True:
        try:
            got.append(struct.unpack_from("I", os.read(fd, 128))[0])
        except BlockingIOError:
            return {"signals": got, "sigmask": fdinfo(fd)["sigmask"]}


# --------------------------------------------------------------------------- inotify

def inotify_setup(args: list[str]) -> tuple[int, str]:
    where = args[0]
    for sub in ("a", "b"):
        os.makedirs(os.path.join(where, sub), exist_ok=True)
    fd = sc(NR_INOTIFY_INIT1, os.O_NONBLOCK)
    assert add_watch(fd, os.path.join(where, "a")) == 1
    assert add_watch(fd, os.path.join(where, "b")) == 2
    assert libc.inotify_rm_watch(fd, 2) == 0
    assert add_watch(fd, where) == 3
    assert [mask for _, mask, _ in events(fd)] == [IN_IGNORED]
    return fd, where


def add_watch(fd: int, path: str) -> int:
    return int(libc.inotify_add_watch(fd, os.fsencode(path), IN_CREATE))


def events(fd: int) -> list[tuple[int, int, str]]:
    """(wd, mask, name) of every event queued."""
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return []
    out = []
    while data:
        wd, mask, _, size = struct.unpack_from("iIII", data)
        out.append((wd, mask, data[16:16 + size].rstrip(b"\0").decode()))
        data = data[16 + size:]
    return out


def inotify_check(state: tuple[int, str]) -> dict[str, object]:
    fd, where = state
    made = [os.path.join(where, "new"), os.path.join(where, "a", "new")]
    for path in made:
        open(path, "w").close()
    got = sorted(events(fd))
    for path in made:
        os.unlink(path)
    return {"events": got}


MODES = {"epoll": (epoll_setup, epoll_check),
         "epoll-closed": (epoll_closed_setup, epoll_closed_check),
         "epoll-unready": (epoll_unready_setup, epoll_closed_check),
         "timerfd": (timerfd_setup, timerfd_check),
         "signalfd": (signalfd_setup, signalfd_check),
         "inotify": (inotify_setup, inotify_check)}


def main() -> None:
    import sys

    setup, check = MODES[sys.argv.pop(2)]
    serve(setup, check)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
