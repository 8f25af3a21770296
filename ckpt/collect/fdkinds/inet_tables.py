"""What a dump pass reads once per network namespace for the TCP and UDP sockets it looks
at (ckpt/collect/fdkinds/inet.py), kept in Peek.memo: inet_diag's table of sockets, the
multicast groups joined there; and what they tell about one socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator

from ckpt.collect.fdkinds import inet_mcast as mc
from ckpt.collect.fdkinds.base import Peek
from ckpt.kernel import inet_diag as diag

#: inet_diag states of a connection a listener has not accepted yet
QUEUED = (diag.TCP_ESTABLISHED, 3, 12)  # ESTABLISHED, SYN_RECV, NEW_SYN_RECV
SHUTDOWN_MASK = 3  # RCV_SHUTDOWN | SEND_SHUTDOWN


def pending_of(listener: diag.DiagSocket, table: list[diag.DiagSocket]) -> tuple[str, ...]:
    """A listener's connections not accepted yet: "peer -> local" of each socket without
    an inode on its port (and address, unless it listens on every address)."""
    wild = ipaddress.ip_address(listener.src).is_unspecified
    out = []
    for s in table:
        if (s.inode == 0 and s.state in QUEUED and s.sport == listener.sport
                and (wild or s.src == listener.src)):
            out.append(f"{_show(s.dst, s.dport)} -> {_show(s.src, s.sport)}")
    return tuple(out)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def diag_table(peek: Peek, netns: int | None, family: int, proto: int,
                ) -> list[diag.DiagSocket]:
    """inet_diag's sockets of this family and protocol in the socket's network namespace
    (``netns``, an fd), read once per pass (Peek.memo); none if it cannot tell (a kernel
    without INET_DIAG)."""
    key = ("inet_diag", _ns_ino(netns), family, proto)
    if key not in peek.memo:
        try:
            peek.memo[key] = diag.dump(family, proto, netns=netns)
        except (OSError, ValueError):
            peek.memo[key] = []
    table: list[diag.DiagSocket] = peek.memo[key]
    return table


def groups(peek: Peek, netns: int | None) -> list[mc.Candidate]:
    """The multicast groups joined in the socket's network namespace (once per pass)."""
    key = ("igmp", _ns_ino(netns))
    if key not in peek.memo:
        peek.memo[key] = diag.in_netns(netns, mc.read_candidates)
    groups: list[mc.Candidate] = peek.memo[key]
    return groups


def _ns_ino(netns: int | None) -> int:
    return os.fstat(netns).st_ino if netns is not None else 0


@contextlib.contextmanager
def netns_of(fd: int) -> Iterator[int | None]:
    """An fd of the socket's network namespace (None: a kernel without SIOCGSKNS)."""
    try:
        netns: int | None = diag.netns_of(fd)
    except OSError:
        netns = None
    try:
        yield netns
    finally:
        if netns is not None:
            os.close(netns)


def foreign_netns(netns: int | None) -> str:
    """"net:[INODE]" if ``netns`` is not ckpt's network namespace, else ""."""
    ino = _ns_ino(netns)
    return f"net:[{ino}]" if ino and ino != os.stat("/proc/self/ns/net").st_ino else ""


def unlisted(proto: int, tcp_state: int, bound: bool) -> tuple[int, int]:
    """(state, shutdown) of a socket inet_diag does not list (it lists those in its hash
    tables): an unbound one is CLOSE; a bound TCP socket in CLOSE is a connection that
    ended (a reset, or both sides closed: the kernel let go of its port), shut down both
    ways; anything else cannot be told (-1)."""
    if tcp_state != diag.TCP_CLOSE:
        return -1, 0
    if not bound:
        return diag.TCP_CLOSE, 0
    return (diag.TCP_CLOSE, SHUTDOWN_MASK) if proto == socket.IPPROTO_TCP else (-1, 0)
