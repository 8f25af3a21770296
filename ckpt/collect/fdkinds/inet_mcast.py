"""Multicast memberships of a TCP or UDP socket (IP_ADD_MEMBERSHIP, MCAST_JOIN_GROUP,
IPV6_JOIN_GROUP, source filters), read and joined again (ckpt/collect/fdkinds/inet.py).

No interface lists one socket's groups: /proc/net/igmp and /proc/net/igmp6 list every
group joined on each interface of a network namespace, by anyone (the kernel's own
all-hosts groups too). So each (interface, group) there is asked of the socket with
getsockopt(MCAST_MSFILTER) (ckpt.kernel.mcast), which answers only for a group the socket
joined on that interface, with its filter mode and sources. An IPv6 socket may join IPv4
groups as well (at SOL_IP). Exact: a group the socket joined is in the table (the
interface's count includes it) and nothing else answers.

    /proc/net/igmp    "Idx\\tDevice : Count Querier" per interface, then one line per
                      group: "\\t\\t\\t\\t030201EF ..." (the __be32 printed as a host u32)
    /proc/net/igmp6   "IDX NAME GROUP(32 hex) USERS FLAGS TIMER" per group
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from ckpt.kernel import mcast

SOL_IP, SOL_IPV6 = 0, 41


@dataclass(frozen=True)
class Membership:
    family: int  # of the group: AF_INET, AF_INET6
    group: bytes
    ifindex: int
    include: bool  # MCAST_INCLUDE (only the sources), else EXCLUDE (all but the sources)
    sources: tuple[bytes, ...] = ()

    @property
    def level(self) -> int:
        return SOL_IP if self.family == socket.AF_INET else SOL_IPV6

    def __str__(self) -> str:
        return f"{socket.inet_ntop(self.family, self.group)} on interface {self.ifindex}"


Candidate = tuple[int, int, bytes]  # (family, ifindex, group)


def parse_igmp(text: str) -> list[Candidate]:
    """The (AF_INET, ifindex, group) pairs of /proc/net/igmp."""
    out: list[Candidate] = []
    ifindex = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        if not line.startswith("\t"):
            ifindex = int(fields[0])
        else:
            out.append((socket.AF_INET, ifindex, struct.pack("=I", int(fields[0], 16))))
    return out


def parse_igmp6(text: str) -> list[Candidate]:
    """The (AF_INET6, ifindex, group) pairs of /proc/net/igmp6."""
    out: list[Candidate] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out.append((socket.AF_INET6, int(fields[0]), bytes.fromhex(fields[2])))
    return out


def read_candidates(net: str = "/proc/thread-self/net") -> list[Candidate]:
    """Every group joined on an interface of the calling thread's network namespace."""
    out: list[Candidate] = []
    for name, parse in (("igmp", parse_igmp), ("igmp6", parse_igmp6)):
        try:
            with open(f"{net}/{name}") as f:
                out += parse(f.read())
        except FileNotFoundError:  # a kernel without IPv6 (or multicast)
            continue
    return out


def memberships(fd: int, family: int, candidates: list[Candidate]) -> tuple[Membership, ...]:
    """The groups the socket ``fd`` of ``family`` joined, among ``candidates``."""
    out = []
    for fam, ifindex, group in candidates:
        if fam == socket.AF_INET6 and family != socket.AF_INET6:
            continue
        level = SOL_IP if fam == socket.AF_INET else SOL_IPV6
        found = mcast.msfilter(fd, level, fam, group, ifindex)
        if found is not None:
            fmode, sources = found
            out.append(Membership(fam, group, ifindex, fmode == mcast.MCAST_INCLUDE,
                                  tuple(sources)))
    return tuple(out)


def join(sock: socket.socket, m: Membership) -> None:
    mcast.join(sock, m.level, m.family, m.group, m.ifindex,
               mcast.MCAST_INCLUDE if m.include else mcast.MCAST_EXCLUDE, list(m.sources))
