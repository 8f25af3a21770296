"""inet_diag over NETLINK_SOCK_DIAG (ckpt/kernel/inet_diag.py): requests and answers built
by hand, and one live dump."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from ckpt.collect.fdkinds.inet_tables import pending_of
from ckpt.kernel import inet_diag as diag

V4, TCP = socket.AF_INET, socket.IPPROTO_TCP


def diag_msg(family: int, state: int, src: bytes, sport: int, dst: bytes, dport: int,
             rqueue: int, wqueue: int, uid: int, inode: int,
             attrs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    body = (struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", sport, dport)
            + src.ljust(16, b"\0") + dst.ljust(16, b"\0") + struct.pack("=III", 0, 1, 2)
            + struct.pack("=IIIII", 0, rqueue, wqueue, uid, inode))
    for kind, value in attrs:
        rta = struct.pack("=HH", 4 + len(value), kind) + value
        body += rta.ljust((len(rta) + 3) & ~3, b"\0")
    return struct.pack("=IHHII", 16 + len(body), diag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def test_parse_inet_diag_answer() -> None:
    lo6 = socket.inet_pton(socket.AF_INET6, "::1")
    data = (diag_msg(socket.AF_INET6, 10, bytes(16), 6379, bytes(16), 0, 2, 511, 1000, 77,
                     ((diag.INET_DIAG_SHUTDOWN, b"\0"), (diag.INET_DIAG_SKV6ONLY, b"\1")))
            + diag_msg(socket.AF_INET6, 1, lo6, 6379, lo6, 40000, 0, 0, 1000, 0)
            + struct.pack("=IHHII", 20, diag.NLMSG_DONE, 2, 1, 0) + bytes(4))
    found, done = diag.parse(data)
    assert done
    assert found[0] == diag.DiagSocket(socket.AF_INET6, 10, "::", 6379, "::", 0, 0, 2, 511,
                                       1000, 77, 0, True)
    assert (found[1].src, found[1].dport, found[1].inode, found[1].v6only) == \
        ("::1", 40000, 0, None)
    assert pending_of(found[0], found) == ("[::1]:40000 -> [::1]:6379",)
    with pytest.raises(ValueError):  # netlink datagrams come whole: a cut one is corrupt
        diag.parse(data[:len(data) // 3])
    assert diag.parse(data[:104]) == (found[:1], False)  # the dump goes on in another read


def test_parse_inet_diag_error() -> None:
    data = struct.pack("=IHHII", 36, diag.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -2) + bytes(16)
    with pytest.raises(OSError) as exc:
        diag.parse(data)
    assert exc.value.errno == 2


def test_request_layout() -> None:
    req = diag.request(V4, TCP, seq=7)
    assert len(req) == 16 + 56
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (72, 20, 0x301, 7)
    # ext INET_DIAG_INFO: TCP's MD5SIG attribute comes only with it
    assert struct.unpack_from("=BBBBI", req, 16) == (V4, TCP, 2, 0, 0xFFFFFFFF)


def test_live_dump_finds_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(9)
        me = diag.find(V4, TCP, os.fstat(s.fileno()).st_ino)
        assert me is not None
        assert (me.state, me.src, me.sport, me.wqueue) == (10, "127.0.0.1", s.getsockname()[1], 9)
