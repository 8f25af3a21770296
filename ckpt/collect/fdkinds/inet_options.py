"""The socket options of a TCP or UDP socket that a dump reads and a restore sets again
(ckpt/collect/fdkinds/inet.py), one row each.

Only the options whose value differs from a new socket's of the same family, type and
protocol are kept (:func:`changed`): a value the program never set stays the system's
default after restore (a buffer size left alone keeps TCP's autotuning), and one it set
is set again, before bind(2).

    SO_RCVBUF, SO_SNDBUF     getsockopt reads twice what setsockopt was given: halved
    SO_LINGER, SO_*TIMEO     structs, kept as bytes
    TCP_CONGESTION           a name, NUL-padded

Multicast memberships, IP options (IP_OPTIONS) and ancillary-data subscriptions of
IPv6 beyond those listed are not read: getsockopt cannot list them.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass

SOL_SOCKET, SOL_IP, SOL_IPV6, SOL_TCP, SOL_UDP = 1, 0, 41, 6, 17
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP


@dataclass(frozen=True)
class Opt:
    name: str
    level: int
    optname: int
    size: int = 0  # bytes of a struct option; 0: an int
    protocol: int = 0  # only sockets of this protocol (0: any)
    family: int = 0  # only sockets of this family (0: any)
    halve: bool = False  # the kernel doubles what it is given

    def applies(self, family: int, protocol: int) -> bool:
        return self.protocol in (0, protocol) and self.family in (0, family)


V6 = socket.AF_INET6
OPTIONS: tuple[Opt, ...] = (
    Opt("SO_REUSEADDR", SOL_SOCKET, 2),
    Opt("SO_REUSEPORT", SOL_SOCKET, 15),
    Opt("SO_KEEPALIVE", SOL_SOCKET, 9),
    Opt("SO_BROADCAST", SOL_SOCKET, 6),
    Opt("SO_OOBINLINE", SOL_SOCKET, 10),
    Opt("SO_PRIORITY", SOL_SOCKET, 12),
    Opt("SO_RCVLOWAT", SOL_SOCKET, 18),
    Opt("SO_MARK", SOL_SOCKET, 36),
    Opt("SO_BINDTOIFINDEX", SOL_SOCKET, 62),
    Opt("SO_RCVBUF", SOL_SOCKET, 8, halve=True),
    Opt("SO_SNDBUF", SOL_SOCKET, 7, halve=True),
    Opt("SO_LINGER", SOL_SOCKET, 13, size=8),
    Opt("SO_RCVTIMEO", SOL_SOCKET, 20, size=16),
    Opt("SO_SNDTIMEO", SOL_SOCKET, 21, size=16),
    Opt("IP_TOS", SOL_IP, 1),
    Opt("IP_TTL", SOL_IP, 2),
    Opt("IP_PKTINFO", SOL_IP, 8),
    Opt("IP_MTU_DISCOVER", SOL_IP, 10),
    Opt("IP_RECVERR", SOL_IP, 11),
    Opt("IP_RECVTOS", SOL_IP, 13),
    Opt("IP_FREEBIND", SOL_IP, 15),
    Opt("IP_TRANSPARENT", SOL_IP, 19),
    Opt("IP_BIND_ADDRESS_NO_PORT", SOL_IP, 24),
    Opt("IP_MULTICAST_TTL", SOL_IP, 33),
    Opt("IP_MULTICAST_LOOP", SOL_IP, 34),
    Opt("IPV6_V6ONLY", SOL_IPV6, 26, family=V6),
    Opt("IPV6_UNICAST_HOPS", SOL_IPV6, 16, family=V6),
    Opt("IPV6_MULTICAST_HOPS", SOL_IPV6, 18, family=V6),
    Opt("IPV6_MULTICAST_LOOP", SOL_IPV6, 19, family=V6),
    Opt("IPV6_MTU_DISCOVER", SOL_IPV6, 23, family=V6),
    Opt("IPV6_RECVERR", SOL_IPV6, 25, family=V6),
    Opt("IPV6_RECVPKTINFO", SOL_IPV6, 49, family=V6),
    Opt("IPV6_TCLASS", SOL_IPV6, 67, family=V6),
    Opt("IPV6_TRANSPARENT", SOL_IPV6, 75, family=V6),
    Opt("IPV6_FREEBIND", SOL_IPV6, 78, family=V6),
    Opt("TCP_NODELAY", SOL_TCP, 1, protocol=TCP),
    Opt("TCP_MAXSEG", SOL_TCP, 2, protocol=TCP),
    Opt("TCP_CORK", SOL_TCP, 3, protocol=TCP),
    Opt("TCP_KEEPIDLE", SOL_TCP, 4, protocol=TCP),
    Opt("TCP_KEEPINTVL", SOL_TCP, 5, protocol=TCP),
    Opt("TCP_KEEPCNT", SOL_TCP, 6, protocol=TCP),
    Opt("TCP_SYNCNT", SOL_TCP, 7, protocol=TCP),
    Opt("TCP_LINGER2", SOL_TCP, 8, protocol=TCP),
    Opt("TCP_DEFER_ACCEPT", SOL_TCP, 9, protocol=TCP),
    Opt("TCP_WINDOW_CLAMP", SOL_TCP, 10, protocol=TCP),
    Opt("TCP_CONGESTION", SOL_TCP, 13, size=16, protocol=TCP),
    Opt("TCP_USER_TIMEOUT", SOL_TCP, 18, protocol=TCP),
    Opt("TCP_FASTOPEN", SOL_TCP, 23, protocol=TCP),
    Opt("TCP_NOTSENT_LOWAT", SOL_TCP, 25, protocol=TCP),
    Opt("TCP_FASTOPEN_CONNECT", SOL_TCP, 30, protocol=TCP),
    Opt("TCP_FASTOPEN_NO_COOKIE", SOL_TCP, 34, protocol=TCP),
    Opt("UDP_CORK", SOL_UDP, 1, protocol=UDP),
    Opt("UDP_SEGMENT", SOL_UDP, 103, protocol=UDP),
    Opt("UDP_GRO", SOL_UDP, 104, protocol=UDP),
)
BY_NAME = {o.name: o for o in OPTIONS}

Value = int | bytes


def read(sock: socket.socket, family: int, protocol: int) -> dict[str, Value]:
    """Every option of the table this socket has (getsockopt only: nothing changes)."""
    out: dict[str, Value] = {}
    for o in OPTIONS:
        if not o.applies(family, protocol):
            continue
        try:
            out[o.name] = (sock.getsockopt(o.level, o.optname, o.size) if o.size
                           else sock.getsockopt(o.level, o.optname))
        except OSError:  # not this socket's (ENOPROTOOPT), or an older kernel
            continue
    return out


@functools.cache
def defaults(family: int, type_: int, protocol: int) -> tuple[tuple[str, Value], ...]:
    """The options of a new socket of this kind (in ckpt's network namespace)."""
    with socket.socket(family, type_, protocol) as fresh:
        return tuple(read(fresh, family, protocol).items())


def changed(values: dict[str, Value], default: dict[str, Value]) -> dict[str, Value]:
    """The options whose value is not a new socket's; IPV6_V6ONLY always (its default is
    a sysctl's, and which addresses a listener takes depends on it)."""
    return {k: v for k, v in values.items() if v != default.get(k) or k == "IPV6_V6ONLY"}


def apply(sock: socket.socket, name: str, value: Value) -> None:
    """setsockopt(2) an option read by :func:`read`; KeyError for a name not in the table,
    OSError if the kernel refuses it."""
    o = BY_NAME[name]
    if isinstance(value, bytes):
        sock.setsockopt(o.level, o.optname, value.rstrip(b"\0") if o.name == "TCP_CONGESTION"
                        else value)
    else:
        sock.setsockopt(o.level, o.optname, value // 2 if o.halve else value)
