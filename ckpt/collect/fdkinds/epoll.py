"""epoll(7): every registration of an epoll set, from /proc/PID/fdinfo/N.

    tfd:        5 events: 80000019 data:                5  pos:0 ino:40e sdev:10

One line per registration: the fd number it was added under (with the file, the key of
the registration), its events (EPOLLERR|EPOLLHUP, which EPOLL_CTL_ADD always adds,
included) and its data, in hex. The kernel keys a registration by (file, fd number), and
keeps it until the file itself is released: an fd closed while the file stays open
elsewhere (a dup) leaves it behind under a number that names nothing, or another file.
kcmp(KCMP_EPOLL_TFD) tells whether fd ``tfd`` of the process is still the registered
file; a registration that fails it is refused before the freeze, naming both fds.

EPOLLONESHOT: once it fired, the kernel keeps only the flags (EPOLLONESHOT, EPOLLET,
EPOLLWAKEUP, EPOLLEXCLUSIVE) in its events until EPOLL_CTL_MOD arms it again; fdinfo
shows exactly that (no EPOLLERR|EPOLLHUP). A restore disarms it the same way: it adds it
first, armed for every event, and lets it fire with an injected epoll_wait before any
other registration is added. That needs its file ready for some event (any file a
process writes to is); one that is not, or another epoll set, is refused.

Restore makes an empty epoll set in ckpt; once every fd of the process is in place, a
finish hook injects epoll_ctl(EPOLL_CTL_ADD, tfd, {events, data}) into the restored
process for each registration (an epoll set watched by another is just another fd). A
level-triggered registration whose file is ready is reported again after the restore, as
it would have been. An edge-triggered one whose file is ready may or may not have had
its edge reported: the kernel does not show it, but if the whole set is ready for
nothing at the dump (poll(2) on it), no ready file is on its ready list, so every such
edge was reported: restore adds these before the epoll_wait above, which takes their
edges. Otherwise (the set is ready for something) such an edge is reported once more
after the restore.
"""

from __future__ import annotations

import os
import re
import select
import struct
from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds.base import FdKind, Opened, Peek, RestoreCtx
from ckpt.collect.fds import FdInfo
from ckpt.errors import NotDumpable, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.anonfd import kcmp_epoll_tfd
from ckpt.kernel.sys import NR, syscall

EPOLL_CTL_ADD = 1
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
#: the flags a fired EPOLLONESHOT registration keeps (fs/eventpoll.c EP_PRIVATE_BITS)
PRIVATE_BITS = EPOLLEXCLUSIVE | EPOLLWAKEUP | EPOLLONESHOT | EPOLLET
#: every event a file may be polled for (EPOLLERR|EPOLLHUP come with any)
ALL_EVENTS = (select.EPOLLIN | select.EPOLLPRI | select.EPOLLOUT | select.EPOLLRDNORM
              | select.EPOLLRDBAND | select.EPOLLWRNORM | select.EPOLLWRBAND
              | select.EPOLLMSG | select.EPOLLRDHUP)
EVENT = struct.Struct("<IQ")  # struct epoll_event, packed on x86-64
LINE = re.compile(r"\s*(\d+) events:\s*([0-9a-f]+) data:\s*([0-9a-f]+)\s+pos:(-?\d+) "
                  r"ino:([0-9a-f]+) sdev:([0-9a-f]+)")
EPOLL_TARGET = "anon_inode:[eventpoll]"


@dataclass(frozen=True)
class Watch:
    """One registration line of an epoll fdinfo."""

    tfd: int
    events: int
    data: int
    ino: int
    sdev: int  # the kernel's encoding (major << 20 | minor)

    @property
    def disarmed(self) -> bool:
        """An EPOLLONESHOT registration that fired and was not armed again."""
        return not self.events & ~PRIVATE_BITS


def parse(info: FdInfo) -> list[Watch]:
    """The registrations of an epoll fdinfo, in its order."""
    out = []
    for key, value in info.extra:
        if key != "tfd":
            continue
        m = LINE.match(value)
        if m is None:
            raise NotDumpable(f"fd {info.fd}: unexpected epoll fdinfo line 'tfd: {value}'")
        out.append(Watch(tfd=int(m[1]), events=int(m[2], 16), data=int(m[3], 16),
                         ino=int(m[5], 16), sdev=int(m[6], 16)))
    return out


@dataclass(frozen=True)
class Found:
    """What inspect saw of one registration: is fd ``tfd`` still its file, and for a
    disarmed one, can a restore fire it (its file is ready for some event)."""

    watch: Watch
    open: bool
    ready: bool = True
    nested: bool = False  # its file is an epoll set
    reported: bool = False  # edge-triggered, ready, and its edge reported already


def _ready(fd: int, events: int) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))


def claims(info: FdInfo, peek: Peek | None) -> bool:
    return info.target == EPOLL_TARGET


def inspect(info: FdInfo, peek: Peek) -> list[Found]:
    """Each registration of the set: still on its fd? For a fired EPOLLONESHOT one: can it
    be fired again? For an edge-triggered one: was its edge reported already? (Only known
    when the set is ready for nothing: then no ready file is on its ready list.)"""
    out: list[Found] = []
    seen: dict[int, int] = {}
    with peek.getfd(info.fd) as local:
        quiet = not _ready(local, select.EPOLLIN)
    for w in parse(info):
        toff = seen.get(w.tfd, 0)
        seen[w.tfd] = toff + 1
        same = w.tfd in peek.fds and kcmp_epoll_tfd(peek.pid, w.tfd, info.fd, w.tfd, toff)
        edge = w.events & (EPOLLET | EPOLLONESHOT) == EPOLLET  # an armed one-shot: listed
        if not same or not (w.disarmed or (quiet and edge)):
            out.append(Found(w, same))
            continue
        with peek.getfd(w.tfd) as local:
            ready = _ready(local, ALL_EVENTS if w.disarmed else w.events & ~PRIVATE_BITS)
        nested = peek.fds[w.tfd].target == EPOLL_TARGET
        # a nested set is ready at restore only once its own registrations are back
        out.append(Found(w, True, ready, nested, ready and not w.disarmed and not nested))
    return out


def refuse(info: FdInfo, details: list[Found], flags: Any) -> str | None:
    for f in details:
        w = f.watch
        if not f.open:
            return (f"it watches fd {w.tfd}, which was closed since it was added (the "
                    f"registration outlives it: its file is still open elsewhere, or fd "
                    f"{w.tfd} is another file now); a restore has no such fd to watch")
        if f.nested and w.disarmed:
            return (f"its EPOLLONESHOT registration of fd {w.tfd} (an epoll set) fired and "
                    "was not armed again: a restore cannot disarm it")
        if not f.ready and w.disarmed:
            return (f"its EPOLLONESHOT registration of fd {w.tfd} fired and was not armed "
                    f"again, and fd {w.tfd} is ready for no event now: a restore cannot "
                    "disarm it")
    return None


def collect(info: FdInfo, details: list[Found], peek: Peek, out: pb.OpenFile) -> None:
    for f in details:
        out.epoll.watches.add(tfd=f.watch.tfd, events=f.watch.events, data=f.watch.data,
                              reported=f.reported)


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    with ctx.as_owner():
        fd = ctx.hold(syscall(NR.epoll_create1, 0, what="epoll_create1"))
    os.set_blocking(fd, not f.flags & os.O_NONBLOCK)
    return Opened(fd)


def finish(ctx: RestoreCtx, f: pb.OpenFile, epfd: int) -> None:
    """Add every registration to the restored set ``epfd``: first those that must have
    fired already (fired EPOLLONESHOT ones, armed for anything; edge-triggered ones whose
    edge was reported), fired by an epoll_wait; then the others (see the module doc)."""
    r = ctx.remote
    fired = [w.reported or not w.events & ~PRIVATE_BITS for w in f.epoll.watches]
    first = [w for w, done in zip(f.epoll.watches, fired, strict=True) if done]
    for w in first:
        _add(ctx, epfd, w.tfd, w.events if w.reported else w.events | ALL_EVENTS, w.data)
    if first:
        got = r.sc(NR.epoll_wait, epfd, r.put(bytes(EVENT.size * len(first))), len(first),
                   0, what=f"epoll_wait fd {epfd}")
        if got != len(first):
            raise RestoreError(f"fd {epfd} (an epoll set): {len(first) - got} registration(s) "
                               "that had fired (EPOLLONESHOT or EPOLLET) could not fire "
                               "again: their fds are ready for no event")
    for w, done in zip(f.epoll.watches, fired, strict=True):
        if not done:
            _add(ctx, epfd, w.tfd, w.events, w.data)


def _add(ctx: RestoreCtx, epfd: int, tfd: int, events: int, data: int) -> None:
    ctx.remote.sc(NR.epoll_ctl, epfd, EPOLL_CTL_ADD, tfd, ctx.remote.put(EVENT.pack(events, data)),
                  what=f"epoll_ctl(fd {epfd}, EPOLL_CTL_ADD, fd {tfd})")


KIND = FdKind("epoll", pb.OpenFile.EPOLL, claims, collect, restore, inspect, refuse, finish)
