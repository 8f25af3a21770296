"""Signal-driven I/O (O_ASYNC, F_SETOWN, F_SETSIG) on fds of several kinds:

    fd            owner                      signal      fires on
    pipe          the process (F_SETOWN)     SIGUSR1     a byte written into it
    pipe          a thread (F_OWNER_TID)     SIGRTMIN+1  a byte written into it
    TCP listener  the process group          SIGUSR2     a connection to accept
    eventfd       the process                SIGUSR1     never (no fasync: F_SETFL drops
                                                         its O_ASYNC)
    this script   the process                SIGUSR1     never (a regular file: no fasync;
                                                         its O_ASYNC is open(2)'s)

Each check sets each of them off (a byte into each pipe, read back; a connection,
accepted and closed) and says which signals came, with each fd's O_ASYNC and
O_NONBLOCK, owner (as "self", "thread", "group" or a number) and signal.

usage: fd_owner.py CONTROL [other PID | group PGID]: the first pipe's owner is then that
process (F_SETOWN PID) or process group (F_SETOWN -PGID) instead.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from fdkit import serve

F_SETOWN_EX, F_GETOWN_EX, F_OWNER_TID = 15, 16, 0
OWNER_EX = struct.Struct("ii")
SIGNALS = {"usr1": signal.SIGUSR1, "usr2": signal.SIGUSR2, "rt1": signal.SIGRTMIN + 1}


@dataclass
class State:
    pipe: tuple[int, int]
    thread_pipe: tuple[int, int]
    listener: socket.socket
    eventfd: int
    file: int
    got: dict[str, int] = field(default_factory=dict)


def make_async(fd: int, sig: int, nonblock: bool = False) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC
                | (os.O_NONBLOCK if nonblock else 0))
    fcntl.fcntl(fd, fcntl.F_SETSIG, sig)


def setup(args: list[str]) -> State:
    got = dict.fromkeys(SIGNALS, 0)
    for name, signo in SIGNALS.items():
        signal.signal(signo, lambda s, f, name=name: got.__setitem__(name, got[name] + 1))
    ready = threading.Event()
    tid: list[int] = []

    def helper() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        threading.Event().wait()

    threading.Thread(target=helper, daemon=True).start()
    ready.wait()
    pipe, thread_pipe = os.pipe(), os.pipe()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its connections' TIME_WAIT
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    efd = os.eventfd(0)
    file = os.open(__file__, os.O_RDONLY | os.O_ASYNC)
    fcntl.fcntl(file, fcntl.F_SETSIG, signal.SIGUSR1)
    make_async(pipe[0], signal.SIGUSR1)
    make_async(thread_pipe[0], SIGNALS["rt1"])
    make_async(listener.fileno(), signal.SIGUSR2, nonblock=True)
    make_async(efd, signal.SIGUSR1)
    owner = {"other": int(args[1]), "group": -int(args[1])}.get(args[0]) if args else None
    fcntl.fcntl(pipe[0], fcntl.F_SETOWN, owner or os.getpid())
    fcntl.fcntl(thread_pipe[0], F_SETOWN_EX, OWNER_EX.pack(F_OWNER_TID, tid[0]))
    fcntl.fcntl(listener.fileno(), fcntl.F_SETOWN, -os.getpgrp())
    fcntl.fcntl(efd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(file, fcntl.F_SETOWN, os.getpid())
    return State(pipe, thread_pipe, listener, efd, file, got)


def helper_tid() -> int:
    """The helper thread's id now (a restore under --new-pid gives it another one)."""
    return next(int(t) for t in os.listdir("/proc/self/task") if int(t) != os.getpid())


def describe(fd: int, s: State) -> dict[str, object]:
    kind, who = OWNER_EX.unpack(fcntl.fcntl(fd, F_GETOWN_EX, bytes(OWNER_EX.size)))
    names = {os.getpid(): "self", helper_tid(): "thread"} if kind != 2 else {os.getpgrp(): "group"}
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    return {"async": bool(flags & os.O_ASYNC), "nonblock": bool(flags & os.O_NONBLOCK),
            "owner": [kind, names.get(who, who)], "signal": fcntl.fcntl(fd, fcntl.F_GETSIG)}


def check(s: State) -> dict[str, object]:
    before = dict(s.got)
    for r, w in (s.pipe, s.thread_pipe):
        os.write(w, b"x")
        os.read(r, 1)
    with socket.create_connection(s.listener.getsockname()):
        for _ in range(100):  # the connection reaches the accept queue with the SYN's ACK
            try:
                s.listener.accept()[0].close()
                break
            except BlockingIOError:
                time.sleep(0.01)
    expected = {"usr1", "rt1", "usr2"}
    for _ in range(200):  # signals to the process itself arrive at once; to be sure
        if all(s.got[n] > before[n] for n in expected):
            break
        time.sleep(0.01)
    fds = {"pipe": s.pipe[0], "thread_pipe": s.thread_pipe[0],
           "listener": s.listener.fileno(), "eventfd": s.eventfd, "file": s.file}
    return {"signals": sorted(n for n in SIGNALS if s.got[n] > before[n]),
            "fds": {name: describe(fd, s) for name, fd in fds.items()}}


if __name__ == "__main__":
    serve(setup, check)
