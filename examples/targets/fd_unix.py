"""Unix sockets with state in flight, one mode per shape (first argument):

    stream      a socketpair with bytes queued both ways (200 kB one way, a line the
                other), one end non-blocking with SO_PASSCRED and a set SO_SNDBUF
    dgram       a SOCK_DGRAM socketpair with messages queued (one of them empty)
    seqpacket   the same with SOCK_SEQPACKET
    peeked      a dgram pair whose reader peeked (MSG_PEEK) its first datagram, empty
    connected   a connection accepted from an abstract listener: bytes queued both ways
    named       a bound dgram receiver with datagrams queued from a connected unnamed
                socket and from a bound one
    listen PATH a listening socket on PATH (mode 0666); each check accepts the pending
                connection, if any, and sends it "hello N"
    abstract    the same on an abstract name
    hidden PATH the same on PATH, unlinked after the bind
    shutdown    a socketpair whose end a wrote "last words" and shut down for writing
    served PATH a connection accepted from a listener on PATH, which stays: bytes
                queued both ways
    orphan      a socketpair whose end a wrote "last words" and was closed
    reset       the same, a closed without reading what b sent it (ECONNRESET pending)
    sigio       a socketpair whose end b is in O_ASYNC mode, owned by the process: each
                check writes to a and waits (up to 10 s) for the SIGIO
    inflight    a socketpair with an fd in flight (SCM_RIGHTS, not received)
    external ADDR  a stream socket connected to ADDR (a listener outside the process);
                each check sends "hello N" through it
    syslog PATH a dgram socket connected to PATH (a receiver outside, like /dev/log); each
                check sends "log N" through it

Each check reads what is queued and queues the next round, so its answer after a restore
is the one it would have given without the checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import stat
import struct
import time
from typing import Any

from fdkit import serve

BIG = bytes(i % 251 for i in range(200_000))
DGRAMS = [b"first", b"", b"x" * 3000, b"last"]


def drain(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(1 << 20, socket.MSG_DONTWAIT).decode("latin-1"))
        except BlockingIOError:
            return out


def stream_check(a: socket.socket, b: socket.socket, n: list[int], big: bytes,
                 ) -> dict[str, Any]:
    got_b = b"".join(x.encode("latin-1") for x in drain(b))
    got_a = "".join(drain(a))
    n[0] += 1
    a.sendall(big)
    b.send(f"to a {n[0]}".encode())
    return {"b": [len(got_b), got_b == big], "a": got_a}


def peer_groups(s: socket.socket) -> list[int]:
    """SO_PEERGROUPS (59): the supplementary groups of whoever SO_PEERCRED names."""
    raw = s.getsockopt(socket.SOL_SOCKET, 59, 1024)
    return sorted(struct.unpack(f"{len(raw) // 4}I", raw))


def args_path(st: dict[str, Any]) -> str:
    path: str = st["args"][1]
    return path


def peer_cred(s: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED (pid, uid, gid): who made the pair, who listened, who connected."""
    pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def setup(args: list[str]) -> dict[str, Any]:
    mode = args[0]
    st: dict[str, Any] = {"mode": mode, "n": [1], "args": args}
    if mode == "stream":
        a, b = socket.socketpair()
        b.setblocking(False)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 300_000)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 7, 500_000))
        a.sendall(BIG)
        b.send(b"to a 1")
        st["pair"] = (a, b)
    elif mode in ("dgram", "seqpacket"):
        kind = socket.SOCK_DGRAM if mode == "dgram" else socket.SOCK_SEQPACKET
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        for m in DGRAMS:
            a.send(m)
        b.send(b"back 1")
        st["pair"] = (a, b)
    elif mode == "connected":
        name = f"\0ckpt-test-conn-{os.getpid()}"
        lis = socket.socket(socket.AF_UNIX)
        lis.bind(name)
        lis.listen(1)
        client = socket.socket(socket.AF_UNIX)
        client.connect(name)
        server, _ = lis.accept()
        lis.close()  # the listener is gone: restore passes through a new one
        client.send(BIG[:5000])
        server.send(b"to a 1")
        st["pair"] = (client, server)
    elif mode == "peeked":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.send(b"")
        a.send(b"x")
        b.recv(10, socket.MSG_PEEK)
        st["pair"] = (a, b)
    elif mode == "served":
        lis = socket.socket(socket.AF_UNIX)
        lis.bind(args[1])
        lis.listen(1)
        client = socket.socket(socket.AF_UNIX)
        client.connect(args[1])
        server, _ = lis.accept()
        client.send(BIG[:5000])
        server.send(b"to a 1")
        st["pair"], st["listener"] = (client, server), lis
    elif mode in ("orphan", "reset"):
        a, b = socket.socketpair()
        a.send(b"last words")
        if mode == "reset":
            b.send(b"unread")
        a.close()
        st["pair"] = (a, b)
    elif mode == "named":
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(f"\0ckpt-test-rx-{os.getpid()}")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        conn.connect(rx.getsockname())
        tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        tx.bind(f"\0ckpt-test-tx-{os.getpid()}")
        conn.send(b"conn 1")
        tx.sendto(b"tx 1", rx.getsockname())
        st["named"] = (rx, conn, tx)
    elif mode in ("listen", "abstract", "hidden"):
        lis = socket.socket(socket.AF_UNIX)
        if mode == "hidden":
            lis.bind(args[1])
            os.unlink(args[1])
        elif mode == "listen":
            lis.bind(args[1])
            os.chmod(args[1], 0o666)
        else:
            lis.bind(f"\0ckpt-test-listen-{os.getpid()}")
        lis.listen(4)
        lis.setblocking(False)
        st["listener"] = lis
    elif mode == "sigio":
        a, b = socket.socketpair()
        got: list[int] = []
        signal.signal(signal.SIGIO, lambda signo, frame: got.append(signo))
        fcntl.fcntl(b.fileno(), fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(b.fileno(), fcntl.F_SETFL, fcntl.fcntl(b.fileno(), fcntl.F_GETFL)
                    | os.O_ASYNC)
        st["pair"], st["got"] = (a, b), got
    elif mode == "inflight":
        a, b = socket.socketpair()
        socket.send_fds(a, [b"fd"], [a.fileno()])
        st["pair"] = (a, b)
    elif mode == "external":
        c = socket.socket(socket.AF_UNIX)
        c.connect(args[1].replace("@", "\0"))
        st["pair"] = (c, c)
    elif mode == "syslog":
        log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        log.connect(args[1])
        st["log"] = log
    elif mode == "shutdown":
        a, b = socket.socketpair()
        a.send(b"last words")
        a.shutdown(socket.SHUT_WR)
        st["pair"] = (a, b)
    return st


def check(st: dict[str, Any]) -> dict[str, Any]:
    mode, n = st["mode"], st["n"]
    if mode in ("stream", "connected", "served"):
        a, b = st["pair"]
        out = stream_check(a, b, n, BIG if mode == "stream" else BIG[:5000])
        out["names"] = [str(x) for x in (a.getsockname(), b.getsockname(), a.getpeername(),
                                         b.getpeername())] if mode != "stream" else []
        out["opts"] = [b.getblocking(), b.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED),
                       a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                       struct.unpack("ll", a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                                        16))]
        me = (os.getpid(), os.geteuid(), os.getegid())
        out["peercred"] = [peer_cred(a) == me, peer_cred(b) == me]
        out["peergroups"] = [peer_groups(a) == sorted(os.getgroups())]
        return out
    if mode == "sigio":
        a, b = st["pair"]
        before = len(st["got"])
        a.send(b"x")
        deadline = time.monotonic() + 10
        while len(st["got"]) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        b.recv(10)
        return {"sigio": len(st["got"]) > before}
    if mode == "syslog":
        st["log"].send(f"log {n[0]}".encode())
        n[0] += 1
        return {"peer": st["log"].getpeername()}
    if mode == "peeked":
        a, b = st["pair"]
        got = [len(m) for m in drain(b)]
        a.send(b"")
        a.send(b"x")
        b.recv(10, socket.MSG_PEEK)
        return {"b": got}
    if mode in ("dgram", "seqpacket"):
        a, b = st["pair"]
        got = [len(m) for m in drain(b)]
        back = drain(a)
        n[0] += 1
        for m in DGRAMS:
            a.send(m)
        b.send(f"back {n[0]}".encode())
        return {"b": got, "a": back}
    if mode == "named":
        rx, conn, tx = st["named"]
        got = []
        while True:
            try:
                data, addr = rx.recvfrom(100, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            got.append([data.decode(), addr.decode("latin-1") if addr else None])
        n[0] += 1
        conn.send(f"conn {n[0]}".encode())
        tx.sendto(f"tx {n[0]}".encode(), rx.getsockname())
        return {"rx": got}
    if mode == "hidden":
        return {"name": st["listener"].getsockname(), "file": os.path.exists(args_path(st))}
    if mode in ("listen", "abstract"):
        lis = st["listener"]
        try:
            conn, _ = lis.accept()
            conn.sendall(f"hello {n[0]}".encode())
            conn.close()
            n[0] += 1
            accepted = True
        except BlockingIOError:
            accepted = False
        name = lis.getsockname()
        mode_bits = oct(stat.S_IMODE(os.stat(name).st_mode)) if isinstance(name, str) else ""
        return {"accepted": accepted, "name": name if isinstance(name, str) else "abstract",
                "mode": mode_bits}
    a, b = st["pair"]
    if mode == "external":
        a.send(f"hello {n[0]}".encode())
        n[0] += 1
        return {"fd": a.fileno()}
    if mode == "inflight":
        return {"fd": a.fileno()}
    try:
        b.send(b"more") if mode in ("orphan", "reset") else a.send(b"more")
        sent = "sent"
    except BrokenPipeError:
        sent = "EPIPE"
    if n[0] == 1:  # the first check only looks; later ones read to the end
        n[0] += 1
        return {"b": [b.recv(100, socket.MSG_PEEK).decode()], "a_send": sent}
    return {"b": read_to_end(b), "a_send": sent}


def read_to_end(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            data = s.recv(100)
        except ConnectionResetError:
            out.append("ECONNRESET")
            continue
        if not data:
            return out
        out.append(data.decode())


if __name__ == "__main__":
    serve(setup, check)
