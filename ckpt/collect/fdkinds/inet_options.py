"""The socket options of a TCP or UDP socket that a dump reads and a restore sets again
(ckpt/collect/fdkinds/inet.py), one row each: every option getsockopt(2) reads and
setsockopt(2) sets on these sockets (Linux 6.18's net/core/sock.c, net/ipv4/ip_sockglue.c,
net/ipv6/ipv6_sockglue.c, tcp.c, udp.c).

Only the options whose value differs from a new socket's of the same family, type and
protocol are kept (:func:`changed`), in the table's order (the order they are set again:
SO_TIMESTAMP* share flags, the last one set wins): a value the program never set stays
the system's default after restore (a buffer size left alone keeps TCP's autotuning),
and one it set is set again, before bind(2). A dump also sets them on a new socket of its
own and reads them back (:func:`replay`): an option whose value does not come back is
refused (a buffer past the sysctl's limit the program was allowed, a TCP_CONGESTION
whose module is gone, an interface index that no longer exists).

    SO_RCVBUF, SO_SNDBUF     getsockopt reads twice what setsockopt was given: halved,
                             and set with SO_*BUFFORCE (root: past rmem_max/wmem_max,
                             as the program may have been allowed to)
    SO_LINGER, SO_*TIMEO,    structs, kept as bytes
    SO_TIMESTAMPING, ...
    TCP_CONGESTION, TCP_ULP  names, NUL-padded
    IP_OPTIONS, IPV6_*OPTS   the option bytes the program set (sticky)

What no getsockopt reads is judged elsewhere: multicast memberships are found by asking
the socket about each group its network namespace has joined (inet_mcast.py); a ULP
(kTLS), TCP-MD5 and TCP-AO keys, repair mode and SOF_TIMESTAMPING_OPT_ID's counter are
refused (:func:`refused`). Not seen by any interface, so not restored and not refused:
a reuseport BPF program (SO_ATTACH_REUSEPORT_*: no getsockopt, no diag attribute),
IP_MULTICAST_IF given only an interface index (getsockopt shows the address), IPV6_MTU's
fragment size and IPV6_PKTINFO's sticky source (getsockopt shows neither), per-socket
IPsec policies (IP_XFRM_POLICY) and IPv6 flow label leases.
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
    set_as: int = 0  # the optname that sets it, if not ``optname``

    def applies(self, family: int, protocol: int) -> bool:
        return self.protocol in (0, protocol) and self.family in (0, family)


V6 = socket.AF_INET6
STICKY = 2048  # bytes of an IPv6 extension header (hdrlen is in 8-byte units, u8)
OPTIONS: tuple[Opt, ...] = (
    Opt("SO_DEBUG", SOL_SOCKET, 1),
    Opt("SO_REUSEADDR", SOL_SOCKET, 2),
    Opt("SO_REUSEPORT", SOL_SOCKET, 15),
    Opt("SO_DONTROUTE", SOL_SOCKET, 5),
    Opt("SO_KEEPALIVE", SOL_SOCKET, 9),
    Opt("SO_BROADCAST", SOL_SOCKET, 6),
    Opt("SO_OOBINLINE", SOL_SOCKET, 10),
    Opt("SO_PRIORITY", SOL_SOCKET, 12),
    Opt("SO_PASSCRED", SOL_SOCKET, 16),
    Opt("SO_RCVLOWAT", SOL_SOCKET, 18),
    Opt("SO_PASSSEC", SOL_SOCKET, 34),
    Opt("SO_MARK", SOL_SOCKET, 36),
    Opt("SO_RXQ_OVFL", SOL_SOCKET, 40),
    Opt("SO_WIFI_STATUS", SOL_SOCKET, 41),
    Opt("SO_PEEK_OFF", SOL_SOCKET, 42),
    Opt("SO_NOFCS", SOL_SOCKET, 43),
    Opt("SO_LOCK_FILTER", SOL_SOCKET, 44),
    Opt("SO_SELECT_ERR_QUEUE", SOL_SOCKET, 45),
    Opt("SO_BUSY_POLL", SOL_SOCKET, 46),
    Opt("SO_MAX_PACING_RATE", SOL_SOCKET, 47, size=8),
    Opt("SO_INCOMING_CPU", SOL_SOCKET, 49),
    Opt("SO_ZEROCOPY", SOL_SOCKET, 60),
    Opt("SO_TXTIME", SOL_SOCKET, 61, size=8),
    Opt("SO_BINDTOIFINDEX", SOL_SOCKET, 62),
    Opt("SO_PREFER_BUSY_POLL", SOL_SOCKET, 69),
    Opt("SO_RESERVE_MEM", SOL_SOCKET, 73),
    Opt("SO_TXREHASH", SOL_SOCKET, 74),
    Opt("SO_RCVMARK", SOL_SOCKET, 75),
    Opt("SO_RCVPRIORITY", SOL_SOCKET, 82),
    Opt("SO_RCVBUF", SOL_SOCKET, 8, halve=True, set_as=33),  # SO_RCVBUFFORCE
    Opt("SO_SNDBUF", SOL_SOCKET, 7, halve=True, set_as=32),  # SO_SNDBUFFORCE
    Opt("SO_LINGER", SOL_SOCKET, 13, size=8),
    Opt("SO_RCVTIMEO", SOL_SOCKET, 20, size=16),
    Opt("SO_SNDTIMEO", SOL_SOCKET, 21, size=16),
    # the old and new (64-bit time, other cmsg types) receive timestamps share the
    # socket's flags: set in this order, the one the program set last reads back
    Opt("SO_TIMESTAMP", SOL_SOCKET, 29),
    Opt("SO_TIMESTAMPNS", SOL_SOCKET, 35),
    Opt("SO_TIMESTAMP_NEW", SOL_SOCKET, 63),
    Opt("SO_TIMESTAMPNS_NEW", SOL_SOCKET, 64),
    Opt("SO_TIMESTAMPING", SOL_SOCKET, 37, size=8),  # struct so_timestamping
    Opt("SO_TIMESTAMPING_NEW", SOL_SOCKET, 65, size=8),
    Opt("IP_TOS", SOL_IP, 1),
    Opt("IP_TTL", SOL_IP, 2),
    Opt("IP_OPTIONS", SOL_IP, 4, size=40),
    Opt("IP_RECVOPTS", SOL_IP, 6),
    Opt("IP_RETOPTS", SOL_IP, 7),
    Opt("IP_PKTINFO", SOL_IP, 8),
    Opt("IP_MTU_DISCOVER", SOL_IP, 10),
    Opt("IP_RECVERR", SOL_IP, 11),
    Opt("IP_RECVTTL", SOL_IP, 12),
    Opt("IP_RECVTOS", SOL_IP, 13),
    Opt("IP_FREEBIND", SOL_IP, 15),
    Opt("IP_PASSSEC", SOL_IP, 18),
    Opt("IP_TRANSPARENT", SOL_IP, 19),
    Opt("IP_RECVORIGDSTADDR", SOL_IP, 20),
    Opt("IP_MINTTL", SOL_IP, 21),
    Opt("IP_CHECKSUM", SOL_IP, 23),
    Opt("IP_BIND_ADDRESS_NO_PORT", SOL_IP, 24),
    Opt("IP_RECVFRAGSIZE", SOL_IP, 25),
    Opt("IP_RECVERR_RFC4884", SOL_IP, 26),
    Opt("IP_MULTICAST_IF", SOL_IP, 32, size=4),  # its address (struct in_addr)
    Opt("IP_MULTICAST_TTL", SOL_IP, 33),
    Opt("IP_MULTICAST_LOOP", SOL_IP, 34),
    Opt("IP_MULTICAST_ALL", SOL_IP, 49),
    Opt("IP_UNICAST_IF", SOL_IP, 50),  # an ifindex in network order, both ways
    Opt("IP_LOCAL_PORT_RANGE", SOL_IP, 51),
    Opt("IPV6_V6ONLY", SOL_IPV6, 26, family=V6),
    Opt("IPV6_2292PKTINFO", SOL_IPV6, 2, family=V6),
    Opt("IPV6_2292HOPOPTS", SOL_IPV6, 3, family=V6),
    Opt("IPV6_2292DSTOPTS", SOL_IPV6, 4, family=V6),
    Opt("IPV6_2292RTHDR", SOL_IPV6, 5, family=V6),
    Opt("IPV6_2292HOPLIMIT", SOL_IPV6, 8, family=V6),
    Opt("IPV6_FLOWINFO", SOL_IPV6, 11, family=V6),
    Opt("IPV6_UNICAST_HOPS", SOL_IPV6, 16, family=V6),
    Opt("IPV6_MULTICAST_IF", SOL_IPV6, 17, family=V6),
    Opt("IPV6_MULTICAST_HOPS", SOL_IPV6, 18, family=V6),
    Opt("IPV6_MULTICAST_LOOP", SOL_IPV6, 19, family=V6),
    Opt("IPV6_ROUTER_ALERT", SOL_IPV6, 22, family=V6),
    Opt("IPV6_MTU_DISCOVER", SOL_IPV6, 23, family=V6),
    Opt("IPV6_RECVERR", SOL_IPV6, 25, family=V6),
    Opt("IPV6_MULTICAST_ALL", SOL_IPV6, 29, family=V6),
    Opt("IPV6_ROUTER_ALERT_ISOLATE", SOL_IPV6, 30, family=V6),
    Opt("IPV6_RECVERR_RFC4884", SOL_IPV6, 31, family=V6),
    Opt("IPV6_FLOWINFO_SEND", SOL_IPV6, 33, family=V6),
    Opt("IPV6_RECVPKTINFO", SOL_IPV6, 49, family=V6),
    Opt("IPV6_RECVHOPLIMIT", SOL_IPV6, 51, family=V6),
    Opt("IPV6_RECVHOPOPTS", SOL_IPV6, 53, family=V6),
    Opt("IPV6_HOPOPTS", SOL_IPV6, 54, size=STICKY, family=V6),
    Opt("IPV6_RTHDRDSTOPTS", SOL_IPV6, 55, size=STICKY, family=V6),
    Opt("IPV6_RECVRTHDR", SOL_IPV6, 56, family=V6),
    Opt("IPV6_RTHDR", SOL_IPV6, 57, size=STICKY, family=V6),
    Opt("IPV6_RECVDSTOPTS", SOL_IPV6, 58, family=V6),
    Opt("IPV6_DSTOPTS", SOL_IPV6, 59, size=STICKY, family=V6),
    Opt("IPV6_RECVPATHMTU", SOL_IPV6, 60, family=V6),
    Opt("IPV6_DONTFRAG", SOL_IPV6, 62, family=V6),
    Opt("IPV6_RECVTCLASS", SOL_IPV6, 66, family=V6),
    Opt("IPV6_TCLASS", SOL_IPV6, 67, family=V6),
    Opt("IPV6_AUTOFLOWLABEL", SOL_IPV6, 70, family=V6),
    Opt("IPV6_ADDR_PREFERENCES", SOL_IPV6, 72, family=V6),
    Opt("IPV6_MINHOPCOUNT", SOL_IPV6, 73, family=V6),
    Opt("IPV6_RECVORIGDSTADDR", SOL_IPV6, 74, family=V6),
    Opt("IPV6_TRANSPARENT", SOL_IPV6, 75, family=V6),
    Opt("IPV6_UNICAST_IF", SOL_IPV6, 76, family=V6),
    Opt("IPV6_RECVFRAGSIZE", SOL_IPV6, 77, family=V6),
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
    Opt("TCP_QUICKACK", SOL_TCP, 12, protocol=TCP),
    Opt("TCP_CONGESTION", SOL_TCP, 13, size=16, protocol=TCP),
    Opt("TCP_THIN_LINEAR_TIMEOUTS", SOL_TCP, 16, protocol=TCP),
    Opt("TCP_USER_TIMEOUT", SOL_TCP, 18, protocol=TCP),
    Opt("TCP_FASTOPEN", SOL_TCP, 23, protocol=TCP),
    Opt("TCP_NOTSENT_LOWAT", SOL_TCP, 25, protocol=TCP),
    Opt("TCP_SAVE_SYN", SOL_TCP, 27, protocol=TCP),
    Opt("TCP_FASTOPEN_CONNECT", SOL_TCP, 30, protocol=TCP),
    Opt("TCP_FASTOPEN_KEY", SOL_TCP, 33, size=32, protocol=TCP),
    Opt("TCP_FASTOPEN_NO_COOKIE", SOL_TCP, 34, protocol=TCP),
    Opt("TCP_INQ", SOL_TCP, 36, protocol=TCP),
    Opt("TCP_TX_DELAY", SOL_TCP, 37, protocol=TCP),
    Opt("TCP_RTO_MAX_MS", SOL_TCP, 44, protocol=TCP),
    Opt("TCP_RTO_MIN_US", SOL_TCP, 45, protocol=TCP),
    Opt("TCP_DELACK_MAX_US", SOL_TCP, 46, protocol=TCP),
    Opt("UDP_CORK", SOL_UDP, 1, protocol=UDP),
    Opt("UDP_ENCAP", SOL_UDP, 100, protocol=UDP),
    Opt("UDP_NO_CHECK6_TX", SOL_UDP, 101, protocol=UDP),
    Opt("UDP_NO_CHECK6_RX", SOL_UDP, 102, protocol=UDP),
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


def is_raw(name: str) -> bool:
    """Is the option ``name`` kept as bytes (InetOption.raw), not an int? KeyError for a
    name not in the table."""
    return BY_NAME[name].size > 0


def apply(sock: socket.socket, name: str, value: Value) -> None:
    """setsockopt(2) an option read by :func:`read`; KeyError for a name not in the table,
    OSError if the kernel refuses it, OverflowError for an int no C int holds."""
    o = BY_NAME[name]
    optname = o.set_as or o.optname
    if isinstance(value, int) and not -(1 << 31) <= value < 1 << 31:
        raise OverflowError(f"{value} is not a C int")
    if isinstance(value, bytes):
        sock.setsockopt(o.level, optname, value.rstrip(b"\0") if o.name == "TCP_CONGESTION"
                        else value)
    else:
        sock.setsockopt(o.level, optname, value // 2 if o.halve else value)


def replay(family: int, type_: int, protocol: int,
           options: tuple[tuple[str, Value], ...]) -> tuple[str, ...]:
    """The options that a new socket of this kind, given ``options`` in this order (as a
    restore gives them), does not read back as they are: each "NAME" (or "NAME: why" if
    setsockopt refused it)."""
    out: list[str] = []
    with socket.socket(family, type_ | socket.SOCK_CLOEXEC, protocol) as fresh:
        for name, value in options:
            try:
                apply(fresh, name, value)
            except (OSError, OverflowError) as exc:
                out.append(f"{name}: {getattr(exc, 'strerror', None) or exc}")
        back = read(fresh, family, protocol)
    failed = {line.partition(":")[0] for line in out}
    return tuple(out) + tuple(name for name, value in options
                              if name not in failed and back.get(name) != value)


TCP_REPAIR, TCP_ULP, TCP_AO_INFO = 19, 31, 40
TCP_AO_INFO_SIZE = 48  # struct tcp_ao_info_opt
SOF_TIMESTAMPING_OPT_ID = 1 << 7


def unreadable(sock: socket.socket, values: dict[str, Value], protocol: int,
               ) -> tuple[str, ...]:
    """What the socket holds that no getsockopt reads back, in words: refused."""
    out: list[str] = []
    for name in ("SO_TIMESTAMPING", "SO_TIMESTAMPING_NEW"):
        raw = values.get(name)
        if isinstance(raw, bytes) and len(raw) >= 4 \
                and int.from_bytes(raw[:4], "little") & SOF_TIMESTAMPING_OPT_ID:
            out.append(f"{name} SOF_TIMESTAMPING_OPT_ID (its counter cannot be read)")
            break
    if protocol != TCP:
        return tuple(out)
    ulp = (_get(sock, SOL_TCP, TCP_ULP, 16) or b"").rstrip(b"\0")
    if ulp:
        out.append(f"upper layer protocol {ulp.decode(errors='replace')} (TCP_ULP: kTLS "
                   "or MPTCP state)")
    repair = _get(sock, SOL_TCP, TCP_REPAIR, 4)
    if repair and int.from_bytes(repair, "little"):
        out.append("repair mode on (TCP_REPAIR)")
    if _get(sock, SOL_TCP, TCP_AO_INFO, TCP_AO_INFO_SIZE) is not None:
        out.append("TCP-AO keys (TCP_AO_ADD_KEY)")
    return tuple(out)


def _get(sock: socket.socket, level: int, optname: int, size: int) -> bytes | None:
    """getsockopt's bytes, None if it fails (ENOPROTOOPT: not built in; ENOENT: none)."""
    try:
        return sock.getsockopt(level, optname, size)
    except OSError:
        return None
