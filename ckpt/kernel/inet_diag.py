"""inet_diag over NETLINK_SOCK_DIAG: the kernel's table of TCP and UDP sockets (what `ss`
shows), for what getsockopt(2) cannot tell about a socket: its TCP state, a listener's
backlog and accept queue, the connections a listener has not accepted yet (they have no
fd), shutdown state, and the uid that made it.

    request   nlmsghdr (16) | inet_diag_req_v2 (56): family, protocol, ext, pad,
              states (bit mask of TCP states), inet_diag_sockid (all zeros: every socket)
    answer    nlmsghdr | inet_diag_msg (72) | rtattrs ...   per socket, then NLMSG_DONE

    inet_diag_sockid (48): sport, dport (big-endian u16), src[16], dst[16], if, cookie[2]
    inet_diag_msg:         family, state, timer, retrans (u8), sockid, expires, rqueue,
                           wqueue, uid, inode (u32)

rqueue and wqueue mean: for a listener, connections waiting in its accept queue and its
backlog (sk_max_ack_backlog); for other TCP sockets, bytes not read / not acknowledged;
for UDP, bytes of queued datagrams (with their overhead) and of unsent ones. A TCP socket
with MD5 keys carries an INET_DIAG_MD5SIG attribute (to a CAP_NET_ADMIN asker).

:func:`request` and :func:`parse` are pure; :func:`dump` talks to the kernel, in the
network namespace of the socket asked about (:func:`netns_of`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ckpt.kernel.sys import syscall

T = TypeVar("T")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_SHUTDOWN, INET_DIAG_SKV6ONLY, INET_DIAG_MD5SIG = 8, 11, 18
ALL_STATES = 0xFFFFFFFF
#: ext: INET_DIAG_INFO (tcp_info), with which TCP's aux attributes (MD5SIG) come too
EXT_INFO = 1 << (2 - 1)
SIOCGSKNS = 0x894C
NR_SETNS, CLONE_NEWNET = 308, 0x40000000

#: TCP states (include/net/tcp_states.h); a UDP socket is ESTABLISHED when connected.
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
              5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK",
              10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")
_SOCKID_PORTS = struct.Struct(">HH")
_SOCKID_TAIL = struct.Struct("=III")
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_RTA = struct.Struct("=HH")
MSG_SIZE = _MSG_HEAD.size + 48 + _MSG_TAIL.size  # 72


@dataclass(frozen=True)
class DiagSocket:
    """One socket of the kernel's table."""

    family: int  # AF_INET, AF_INET6
    state: int  # TCP_STATES
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int
    rqueue: int
    wqueue: int
    uid: int
    inode: int  # 0: no fd refers to it (a connection a listener has not accepted yet)
    shutdown: int = 0  # SHUT_RD 1 | SHUT_WR 2 (sk_shutdown)
    v6only: bool | None = None  # AF_INET6 only
    md5: bool = False  # TCP-MD5 keys (TCP_MD5SIG; shown to CAP_NET_ADMIN only)

    @property
    def state_name(self) -> str:
        return TCP_STATES.get(self.state, str(self.state))


def request(family: int, protocol: int, states: int = ALL_STATES, seq: int = 1) -> bytes:
    """A dump request for every socket of ``family`` and ``protocol`` in ``states``."""
    body = (_REQ.pack(family, protocol, EXT_INFO, 0, states) + _SOCKID_PORTS.pack(0, 0)
            + bytes(32) + _SOCKID_TAIL.pack(0, 0xFFFFFFFF, 0xFFFFFFFF))  # INET_DIAG_NOCOOKIE
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw[:16])


def parse_socket(msg: bytes) -> DiagSocket:
    """One inet_diag_msg and its attributes (the payload of a SOCK_DIAG_BY_FAMILY answer)."""
    if len(msg) < MSG_SIZE:
        raise ValueError(f"inet_diag_msg of {len(msg)} bytes (want {MSG_SIZE})")
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(msg, 0)
    sport, dport = _SOCKID_PORTS.unpack_from(msg, 4)
    src, dst = msg[8:24], msg[24:40]
    ifindex, _c0, _c1 = _SOCKID_TAIL.unpack_from(msg, 40)
    _expires, rqueue, wqueue, uid, inode = _MSG_TAIL.unpack_from(msg, 52)
    shutdown, v6only, md5 = 0, None, False
    off = MSG_SIZE
    while off + _RTA.size <= len(msg):
        length, kind = _RTA.unpack_from(msg, off)
        if length < _RTA.size:
            break
        value = msg[off + _RTA.size:off + length]
        if kind == INET_DIAG_SHUTDOWN and value:
            shutdown = value[0]
        elif kind == INET_DIAG_SKV6ONLY and value:
            v6only = bool(value[0])
        elif kind == INET_DIAG_MD5SIG and value:
            md5 = True
        off += (length + 3) & ~3
    return DiagSocket(family, state, _address(family, src), sport, _address(family, dst),
                      dport, ifindex, rqueue, wqueue, uid, inode, shutdown, v6only, md5)


def parse(data: bytes) -> tuple[list[DiagSocket], bool]:
    """The sockets in one read of a dump's answer, and whether it ended (NLMSG_DONE).
    An NLMSG_ERROR raises OSError with its errno."""
    out: list[DiagSocket] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise ValueError(f"netlink message of {length} bytes at {off}")
        body = data[off + _NLMSGHDR.size:off + length]
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", body)[0]
            if err:
                raise OSError(err, f"inet_diag: {os.strerror(err)}")
            return out, True
        if kind == SOCK_DIAG_BY_FAMILY:
            out.append(parse_socket(body))
        off += (length + 3) & ~3
    return out, False


def netns_of(sock_fd: int) -> int:
    """An fd of the network namespace a socket belongs to (ioctl SIOCGSKNS)."""
    return int(fcntl.ioctl(sock_fd, SIOCGSKNS))


def in_netns(netns: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` run in the network namespace ``netns`` (an fd; None: ckpt's): a short
    thread enters it (setns(2) acts on the calling thread only), runs ``fn``, and ends. A
    socket keeps the namespace it was made in; /proc/thread-self/net shows the thread's."""
    if netns is None or os.fstat(netns).st_ino == os.stat("/proc/self/ns/net").st_ino:
        return fn()
    made: list[T] = []
    failed: list[OSError] = []

    def run() -> None:
        try:
            syscall(NR_SETNS, netns, CLONE_NEWNET, what="setns(CLONE_NEWNET)")
            made.append(fn())
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="ckpt-netns")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def _netlink(netns: int | None) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket of the network namespace ``netns``."""
    return in_netns(netns, lambda: socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG))


def dump(family: int, protocol: int, states: int = ALL_STATES,
         netns: int | None = None) -> list[DiagSocket]:
    """Every socket of ``family`` and ``protocol`` (IPPROTO_TCP, IPPROTO_UDP) in ``states``,
    in the network namespace ``netns`` (an fd; None: ckpt's)."""
    with _netlink(netns) as nl:
        nl.sendto(request(family, protocol, states), (0, 0))
        out: list[DiagSocket] = []
        while True:
            data = nl.recv(1 << 16)
            if not data:
                raise OSError(errno.EIO, "inet_diag: the kernel closed the dump")
            found, done = parse(data)
            out += found
            if done:
                return out


def find(family: int, protocol: int, inode: int) -> DiagSocket | None:
    """The socket with this inode, or None."""
    return next((s for s in dump(family, protocol) if s.inode == inode), None)
