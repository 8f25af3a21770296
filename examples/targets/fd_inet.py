"""TCP and UDP sockets, IPv4 and IPv6, each with options set (ckpt/collect/fdkinds/inet.py):

    v4      TCP listener on 127.0.0.1, non-blocking, backlog 7, SO_REUSEADDR, TCP_NODELAY,
            SO_KEEPALIVE, SO_RCVBUF, TCP_DEFER_ACCEPT, TCP_FASTOPEN, IP_FREEBIND
    v6only  TCP listener on [::] and v4's port, IPV6_V6ONLY on, SO_REUSEPORT, backlog 5
    dual    TCP listener on [::], IPV6_V6ONLY off (takes IPv4 too), backlog 3
    udp     UDP socket bound to 127.0.0.1
    udp6    UDP socket on [::1] connected to a peer (another UDP socket of this process)
    bound   TCP socket bound to 127.0.0.1, not listening; unbound: a TCP socket, no address

Each check reports every socket's address and options (getsockopt, as the program sees
them), connects to each listener and accepts the connection, sends a datagram to each
UDP socket and reads it back. With argument ``conn`` the process also holds both ends of
a TCP connection over 127.0.0.1 to the v4 listener, and each check reports what a
non-blocking read of each end gives (EAGAIN while it is open). With ``stdin``, fd 0 is
one more listener, not close-on-exec (as inetd would leave it to its child); with
``filter``, the UDP socket has a socket filter (SO_ATTACH_FILTER); with ``dead``, it
holds a connection its peer reset, and each check reads it (ECONNRESET once, then EOF).
With ``mcast``, a UDP socket on 0.0.0.0 joined multicast group 239.1.2.3 on lo, with
IP_MULTICAST_IF, SO_TIMESTAMP and IP_RECVTTL: each check sends a datagram to the group
and reports what arrived and its ancillary data (a timestamp and a TTL).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import struct
from typing import Any

from fdkit import serve

S = socket.socket
SOL, TCP, IP6 = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IPV6
TCP_DEFER_ACCEPT, TCP_FASTOPEN, TCP_INFO, IP_FREEBIND = 9, 23, 11, 15
SO_ATTACH_FILTER = 26
IP = socket.IPPROTO_IP
GROUP, LO = "239.1.2.3", socket.inet_aton("127.0.0.1")
IP_RECVTTL, IP_MULTICAST_IF, IP_ADD_MEMBERSHIP, SO_TIMESTAMP = 12, 32, 35, 29


def listener(family: int, host: str, backlog: int, port: int = 0,
             **opts: tuple[int, int, int]) -> S:
    sock = socket.socket(family, socket.SOCK_STREAM)
    for level, name, value in opts.values():
        sock.setsockopt(level, name, value)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def setup(args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v4": listener(socket.AF_INET, "127.0.0.1", 7,
                       reuse=(SOL, socket.SO_REUSEADDR, 1),
                       nodelay=(TCP, socket.TCP_NODELAY, 1),
                       keepalive=(SOL, socket.SO_KEEPALIVE, 1),
                       rcvbuf=(SOL, socket.SO_RCVBUF, 50000),
                       defer=(TCP, TCP_DEFER_ACCEPT, 5), fastopen=(TCP, TCP_FASTOPEN, 5),
                       freebind=(socket.IPPROTO_IP, IP_FREEBIND, 1)),
        "dual": listener(socket.AF_INET6, "::", 3, v6only=(IP6, socket.IPV6_V6ONLY, 0)),
        "udp": socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        "udp6": socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
        "peer": socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
        "bound": socket.socket(),
        "unbound": socket.socket(),
    }
    out["v4"].setblocking(False)
    # the v4 listener's port, as redis listens on * and ::: only IPV6_V6ONLY lets it
    out["v6only"] = listener(socket.AF_INET6, "::", 5, out["v4"].getsockname()[1],
                             v6only=(IP6, socket.IPV6_V6ONLY, 1),
                             reuseport=(SOL, socket.SO_REUSEPORT, 1))
    out["udp"].bind(("127.0.0.1", 0))
    out["peer"].bind(("::1", 0))
    out["udp6"].bind(("::1", 0))
    out["udp6"].connect(out["peer"].getsockname())
    out["bound"].bind(("127.0.0.1", 0))
    out["unbound"].setsockopt(TCP, socket.TCP_NODELAY, 1)
    if "filter" in args:  # a classic BPF program that takes every datagram whole
        out["prog"] = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0xFFFFFFFF))
        fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(out["prog"]))
        out["udp"].setsockopt(SOL, SO_ATTACH_FILTER, fprog)
    if "stdin" in args:  # an inetd-style listener on fd 0, inherited across exec
        lst = listener(socket.AF_INET, "127.0.0.1", 1)
        os.dup2(lst.fileno(), 0)  # not close-on-exec
        lst.close()
        out["stdin"] = socket.socket(fileno=0)
    if "dead" in args:  # a connection its peer reset, the fd still open
        dead = socket.create_connection(out["v4"].getsockname())
        dead.send(b"!")
        server = accept(out["v4"])
        server.setsockopt(SOL, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()  # RST
        select.select([dead], [], [], 10)
        out["dead"] = dead
    if "mcast" in args:
        mc = out["mc"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mc.bind(("0.0.0.0", 0))
        mreqn = struct.pack("4s4si", socket.inet_aton(GROUP), LO, 1)  # ifindex 1: lo
        mc.setsockopt(IP, IP_ADD_MEMBERSHIP, mreqn)
        mc.setsockopt(IP, IP_MULTICAST_IF, LO)
        mc.setsockopt(SOL, SO_TIMESTAMP, 1)
        mc.setsockopt(IP, IP_RECVTTL, 1)
    if "conn" in args:
        out["client"] = socket.create_connection(out["v4"].getsockname())
        out["client"].send(b"!")  # TCP_DEFER_ACCEPT: accept waits for data
        out["server"] = accept(out["v4"])
        out["server"].recv(1)
    return out


def accept(lst: S) -> S:
    if not select.select([lst], [], [], 10)[0]:
        raise TimeoutError("nothing to accept")
    return lst.accept()[0]


def accepts(lst: S, host: str) -> bool:
    """Connect to the listener from ``host``, send a byte, accept, read it. The client
    closes first, so TIME_WAIT holds its port, not the listener's (a listener without
    SO_REUSEADDR could not listen again on a port in TIME_WAIT)."""
    client = socket.create_connection((host, lst.getsockname()[1]), timeout=10)
    client.send(b"x")
    with accept(lst) as conn:
        conn.settimeout(10)
        ok = conn.recv(1) == b"x" and conn.getpeername()[1] == client.getsockname()[1]
        client.close()
        return ok and conn.recv(1) == b""


OPTIONS = {"SO_REUSEADDR": (SOL, socket.SO_REUSEADDR), "SO_REUSEPORT": (SOL, socket.SO_REUSEPORT),
           "SO_KEEPALIVE": (SOL, socket.SO_KEEPALIVE), "SO_RCVBUF": (SOL, socket.SO_RCVBUF),
           "TCP_NODELAY": (TCP, socket.TCP_NODELAY), "TCP_DEFER_ACCEPT": (TCP, TCP_DEFER_ACCEPT),
           "TCP_FASTOPEN": (TCP, TCP_FASTOPEN), "IP_FREEBIND": (socket.IPPROTO_IP, IP_FREEBIND)}


def described(sock: S) -> dict[str, Any]:
    out: dict[str, Any] = {"name": list(sock.getsockname()[:2]), "blocking": sock.getblocking()}
    out.update({k: sock.getsockopt(*v) for k, v in OPTIONS.items()
                if sock.type == socket.SOCK_STREAM or v[0] != TCP})
    if sock.family == socket.AF_INET6:
        out["IPV6_V6ONLY"] = sock.getsockopt(IP6, socket.IPV6_V6ONLY)
    if sock.fileno() == 0:
        out["cloexec"] = fcntl.fcntl(0, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    if sock.type == socket.SOCK_STREAM:
        info = sock.getsockopt(TCP, TCP_INFO, 104)
        out["state"] = info[0]
        out["backlog"] = struct.unpack_from("I", info, 28)[0]  # tcpi_sacked of a listener
    return out


def read_now(sock: S) -> str:
    try:
        data = sock.recv(16, socket.MSG_DONTWAIT)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return data.decode() if data else "EOF"


def check(s: dict[str, Any]) -> dict[str, Any]:
    out = {k: described(v) for k, v in s.items() if isinstance(v, S)
           and k not in ("client", "server", "dead")}
    out["v4"]["accepts"] = accepts(s["v4"], "127.0.0.1")
    out["v6only"]["accepts"] = accepts(s["v6only"], "::1")
    out["dual"]["accepts"] = [accepts(s["dual"], "::1"), accepts(s["dual"], "127.0.0.1")]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"to udp", s["udp"].getsockname())
        out["udp"]["got"] = s["udp"].recv(16).decode()
    out["udp6"]["peer"] = list(s["udp6"].getpeername()[:2]) == list(s["peer"].getsockname()[:2])
    s["udp6"].send(b"to peer")
    out["udp6"]["peer_got"] = s["peer"].recv(16).decode()
    s["peer"].sendto(b"from peer", s["udp6"].getsockname())
    out["udp6"]["got"] = s["udp6"].recv(16).decode()
    if "dead" in s:
        out["dead"] = read_now(s["dead"])
    if "mc" in s:
        out["mc"].update(multicast(s["mc"]))
    if "client" in s:
        out["conn"] = {"client": read_now(s["client"]), "server": read_now(s["server"])}
    return out


def multicast(mc: S) -> dict[str, Any]:
    """Send to the group from 127.0.0.1; what ``mc`` receives and its options."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setsockopt(IP, IP_MULTICAST_IF, LO)
        sender.sendto(b"to group", (GROUP, mc.getsockname()[1]))
    out: dict[str, Any] = {
        "IP_MULTICAST_IF": socket.inet_ntoa(mc.getsockopt(IP, IP_MULTICAST_IF, 4)),
        "SO_TIMESTAMP": mc.getsockopt(SOL, SO_TIMESTAMP),
        "IP_RECVTTL": mc.getsockopt(IP, IP_RECVTTL)}
    if not select.select([mc], [], [], 3)[0]:
        return {**out, "got": None}
    data, anc, _, _ = mc.recvmsg(16, 256)
    return {**out, "got": data.decode(), "cmsgs": sorted([lvl, kind] for lvl, kind, _ in anc)}


if __name__ == "__main__":
    serve(setup, check)
