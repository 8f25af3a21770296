"""A socket's multicast source filter for one group, read with getsockopt(MCAST_MSFILTER)
(RFC 3678), which takes the group and interface as input, so Python's getsockopt cannot
make it. The kernel answers only for a group the socket itself joined on that interface
(EADDRNOTAVAIL otherwise): asking about every group its network namespace has joined
finds exactly the socket's memberships.

    struct group_filter (x86-64)   gf_interface u32 | pad | gf_group sockaddr_storage (128)
                                   | gf_fmode u32 | gf_numsrc u32 | gf_slist[] (128 each)
    offsets                        0, 8, 136, 140, 144
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

from ckpt.kernel.sys import libc

MCAST_JOIN_GROUP, MCAST_MSFILTER = 42, 48
MCAST_EXCLUDE, MCAST_INCLUDE = 0, 1
SS = 128  # sizeof(struct sockaddr_storage)
HEAD = 144
MAX_SOURCES = 1024  # more than net.ipv4.igmp_max_msf's default (10) allows


def sockaddr(family: int, addr: bytes) -> bytes:
    """A sockaddr_in or sockaddr_in6 (port 0) padded to a sockaddr_storage."""
    if family == socket.AF_INET:
        raw = struct.pack("=H2x4s", family, addr)
    else:
        raw = struct.pack("=H2x4x16sI", family, addr, 0)
    return raw.ljust(SS, b"\0")


def group_filter(ifindex: int, family: int, group: bytes, fmode: int,
                 sources: list[bytes]) -> bytes:
    """struct group_filter for MCAST_MSFILTER (get: room for ``len(sources)``)."""
    head = struct.pack("=I4x", ifindex) + sockaddr(family, group)
    head += struct.pack("=II", fmode, len(sources))
    return head + b"".join(sockaddr(family, s) for s in sources)


def source_of(family: int, raw: bytes) -> bytes:
    return raw[4:8] if family == socket.AF_INET else raw[8:24]


def msfilter(fd: int, level: int, family: int, group: bytes, ifindex: int,
             ) -> tuple[int, list[bytes]] | None:
    """(filter mode, sources) of the socket ``fd``'s membership of ``group`` on interface
    ``ifindex`` at ``level`` (SOL_IP or SOL_IPV6); None if it has none. OSError for any
    other failure."""
    room = 16
    while True:
        buf = ctypes.create_string_buffer(group_filter(ifindex, family, group, 0,
                                                       [bytes(16)] * room))
        size = ctypes.c_uint32(len(buf.raw))
        if libc.getsockopt(fd, level, MCAST_MSFILTER, buf, ctypes.byref(size)) < 0:
            err = ctypes.get_errno()
            if err in (errno.EADDRNOTAVAIL, errno.ENODEV):  # not joined; interface gone
                return None
            raise OSError(err, f"getsockopt(MCAST_MSFILTER): {errno.errorcode.get(err)}")
        fmode, count = struct.unpack_from("=II", buf.raw, 136)
        if count <= room:
            raw = buf.raw
            return fmode, [source_of(family, raw[HEAD + i * SS:HEAD + (i + 1) * SS])
                           for i in range(count)]
        if count > MAX_SOURCES:
            raise OSError(errno.E2BIG, f"{count} multicast sources")
        room = count


def join(sock: socket.socket, level: int, family: int, group: bytes, ifindex: int,
         fmode: int, sources: list[bytes]) -> None:
    """Join ``group`` on ``ifindex`` with this source filter (MCAST_JOIN_GROUP, then
    MCAST_MSFILTER unless it is the join's own: EXCLUDE nothing)."""
    req = struct.pack("=I4x", ifindex) + sockaddr(family, group)
    sock.setsockopt(level, MCAST_JOIN_GROUP, req)
    if fmode != MCAST_EXCLUDE or sources:
        sock.setsockopt(level, MCAST_MSFILTER,
                        group_filter(ifindex, family, group, fmode, sources))
