"""fd_owner_creds: an owner's credentials. F_SETOWN records the caller's uid and euid with
the owner, and the kernel sends SIGIO only to the members of the owning group that those
ids may signal (or to all of them, were the euid 0).

Set-up: the target becomes uid 65534, real and effective, keeping saved uid 0 and fsuid 0
(so it still reaches its control files); a pipe (or with "unix", a unix socketpair) whose
read end is in O_ASYNC mode with SIGUSR1, owned by the target's process group
(F_SETOWN -pgrp) as uid 65534.

Each check forks a child that becomes uid 0 (its saved uid lets it) with SIGUSR1 blocked,
writes a byte into it (SIGIO to every member of the group the owner may signal) and
says which got SIGUSR1: the target itself ("self") and the root child ("root_child").

usage: fd_owner_creds.py CONTROL [unix]
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from fdkit import libc, serve

NOBODY = 65534


@dataclass
class State:
    r: int
    w: int
    got: list[int] = field(default_factory=lambda: [0])


def setup(args: list[str]) -> State:
    if args == ["unix"]:
        a, b = socket.socketpair()
        state = State(a.detach(), b.detach())
    else:
        state = State(*os.pipe())
    signal.signal(signal.SIGUSR1, lambda s, f: state.got.__setitem__(0, state.got[0] + 1))
    os.setresuid(NOBODY, NOBODY, 0)
    libc.setfsuid(0)
    fd = state.r
    fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGUSR1)
    fcntl.fcntl(fd, fcntl.F_SETOWN, -os.getpgrp())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    return state


def check(s: State) -> dict[str, object]:
    before = s.got[0]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        os.setresuid(0, 0, 0)
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        os._exit(1 if signal.SIGUSR1 in signal.sigpending() else 0)
    os.read(ready_r, 1)
    os.write(s.w, b"x")  # SIGIO is sent to the whole group before write returns
    os.read(s.r, 1)
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)
    for _ in range(200):  # its own handler runs between two bytecodes
        if s.got[0] > before:
            break
        time.sleep(0.01)
    return {"self": s.got[0] > before, "root_child": os.waitstatus_to_exitcode(status) == 1}


if __name__ == "__main__":
    serve(setup, check)
