"""Pipes with bytes in flight, one MODE per run (usage: fd_pipe.py CONTROL MODE [ARG]):

    full      a 64 KiB pipe filled to the last byte, its write end non-blocking
    big       a pipe grown to 1 MiB (F_SETPIPE_SZ) holding 300000 bytes
    nonblock  1000 bytes; the read end non-blocking, the write end blocking
    packet    a packet-mode pipe (O_DIRECT) holding packets of 10, 100 and 1000 bytes
    writer    a thread blocked writing 200000 bytes into a 64 KiB pipe
    fifo      a FIFO made at ARG (mkfifo), open for reading and writing, 5000 bytes
    rdwr      5000 bytes in a pipe held only by an O_RDWR reopen (/proc/self/fd/N)
    external  ARG is the write end of a pipe the test holds the other end of; each
              check writes "line N" to it

The first two checks look without consuming (the target tees its own pipe); the third
drains the pipe and says whether every byte came in order.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import termios
import threading
from dataclasses import dataclass, field

from fdkit import serve

libc = ctypes.CDLL(None, use_errno=True)
SIZES = {"full": 65536, "big": 300000, "nonblock": 1000, "writer": 200000, "fifo": 5000,
         "rdwr": 5000}
PACKETS = (10, 100, 1000)
PEEKS = 2


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


@dataclass
class State:
    mode: str
    r: int
    w: int
    checks: int = 0
    writer: threading.Thread | None = None
    extra: dict[str, int] = field(default_factory=dict)


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def setup(args: list[str]) -> State:
    mode = args[0]
    if mode == "external":
        return State(mode, -1, int(args[1]))
    if mode == "fifo":
        os.mkfifo(args[1])
        r = os.open(args[1], os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(args[1], os.O_WRONLY)
        fcntl.fcntl(r, fcntl.F_SETFL, 0)
    else:
        r, w = os.pipe2(os.O_DIRECT if mode == "packet" else 0)
    if mode == "big":
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    if mode == "rdwr":
        rw = os.open(f"/proc/self/fd/{r}", os.O_RDWR)
        os.close(r)
        os.close(w)
        r = w = rw
    state = State(mode, r, w)
    if mode == "packet":
        for n in PACKETS:
            os.write(w, pattern(n))
    elif mode == "writer":
        state.writer = threading.Thread(target=write_all, args=(w, pattern(SIZES[mode])))
        state.writer.start()
        while queued(r) < 65536:  # the thread is blocked on the full pipe
            os.sched_yield()
    else:
        write_all(w, pattern(SIZES[mode]))
    if mode == "full":
        os.set_blocking(w, False)
    if mode == "nonblock":
        os.set_blocking(r, False)
        os.set_inheritable(w, False)  # close-on-exec is the fd's: only the write end's
    return state


def queued(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def peek(fd: int, n: int) -> bytes:
    """The first n bytes buffered in pipe fd, left in place."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    got = libc.tee(fd, w, ctypes.c_size_t(n), 2)
    os.close(w)
    data = b""
    while len(data) < got:
        data += os.read(r, got - len(data))
    os.close(r)
    return data


def flags(fd: int) -> list[str]:
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    return [name for name, bit in (("nonblock", os.O_NONBLOCK), ("direct", os.O_DIRECT))
            if fl & bit] + ([] if os.get_inheritable(fd) else ["cloexec"])


def check(s: State) -> dict[str, object]:
    s.checks += 1
    if s.mode == "external":
        write_all(s.w, f"line {s.checks}\n".encode())
        return {"wrote": s.checks}
    n = queued(s.r)
    if s.checks <= PEEKS:
        more = "-"
        if s.mode == "full":
            try:
                os.write(s.w, b"x")
                more = "written"
            except BlockingIOError:
                more = "EAGAIN"
        return {"queued": n, "size": fcntl.fcntl(s.r, fcntl.F_GETPIPE_SZ), "more": more,
                "flags": [flags(s.r), flags(s.w)],
                "digest": hashlib.sha256(peek(s.r, n)).hexdigest()[:16]}
    if s.mode == "packet":
        return {"packets": [len(os.read(s.r, 65536)) for _ in PACKETS], "left": queued(s.r)}
    os.set_blocking(s.r, True)
    want = SIZES[s.mode]
    data = b""
    while len(data) < want:
        data += os.read(s.r, want - len(data))
    if s.writer is not None:
        s.writer.join()
    return {"read": len(data), "in_order": data == pattern(want), "left": queued(s.r)}


if __name__ == "__main__":
    serve(setup, check)
