"""unix_diag over NETLINK_SOCK_DIAG: what the kernel knows of one unix socket by inode.

One request per socket (an exact lookup, SOCK_DIAG_BY_FAMILY without NLM_F_DUMP):

    nlmsghdr (16)       len, type=SOCK_DIAG_BY_FAMILY (20), flags=NLM_F_REQUEST, seq, pid
    unix_diag_req (24)  family=AF_UNIX, protocol 0, pad, states, ino, show, cookie[2]=~0

The answer is one message (or NLMSG_ERROR with -errno: ENOENT, no such socket in ckpt's
network namespace):

    nlmsghdr (16)
    unix_diag_msg (16)  family, type, state, pad, ino, cookie[2]
    attributes          rtattr (u16 len, u16 type) + payload, each padded to 4 bytes:
      UNIX_DIAG_NAME 0      sun_path as bound (abstract: a leading NUL)
      UNIX_DIAG_VFS 1       u32 ino, u32 dev of the socket file (path names)
      UNIX_DIAG_PEER 2      u32 inode of the peer (0: none, or closed)
      UNIX_DIAG_ICONS 3     u32 inodes of the connections waiting in a listener's backlog
      UNIX_DIAG_RQLEN 4     u32 rqueue, wqueue: bytes queued (stream; dgram: the first
                            message), or for a listener: pending connections and backlog
      UNIX_DIAG_SHUTDOWN 6  u8 sk_shutdown: 1 RCV_SHUTDOWN, 2 SEND_SHUTDOWN

:func:`parse_reply` is pure (tested on captured bytes); :func:`query` makes the call,
:func:`query_all` a dump of every socket. :func:`filter_length` asks one socket for its
filter (getsockopt SO_GET_FILTER), which unix_diag does not show.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

from ckpt.errors import KernelError
from ckpt.kernel.sys import libc

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER = 0x01, 0x02, 0x04
UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = 0x08, 0x10
SHOW_ALL = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS \
    | UDIAG_SHOW_RQLEN
NAME, VFS, PEER, ICONS, RQLEN, SHUTDOWN = 0, 1, 2, 3, 4, 6
NOCOOKIE = 0xFFFFFFFF
#: udiag_state values (the TCP names the kernel reuses)
ESTABLISHED, CLOSE, LISTEN = 1, 7, 10

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIIIII")
_MSG = struct.Struct("=BBBxIII")
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class UnixDiag:
    """One unix socket as unix_diag shows it."""

    ino: int
    type: int  # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    state: int  # ESTABLISHED, CLOSE, LISTEN
    name: bytes = b""  # bound address; b"" unbound; abstract names start with NUL
    vfs: tuple[int, int] | None = None  # (ino, dev) of the socket file of a path name
    peer: int = 0  # peer's inode (0: none, or closed)
    icons: tuple[int, ...] = ()  # a listener's pending connections (their peers' inodes)
    rqueue: int = 0  # bytes queued to read (listener: pending connections)
    wqueue: int = 0  # bytes sent not yet read by the peer (listener: backlog)
    shutdown: int = 0  # 1 RCV_SHUTDOWN, 2 SEND_SHUTDOWN

    @property
    def abstract(self) -> bool:
        return self.name.startswith(b"\0")


def build_request(ino: int, seq: int = 1, show: int = SHOW_ALL) -> bytes:
    """The netlink message asking for socket ``ino``; ``ino`` 0: a dump of every socket."""
    req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, show, NOCOOKIE, NOCOOKIE)
    flags = NLM_F_REQUEST | (NLM_F_DUMP if not ino else 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, flags,
                          seq, 0) + req


def parse_replies(data: bytes) -> tuple[list[UnixDiag], bool]:
    """Every message of one read of a dump, and whether NLMSG_DONE ended it."""
    out: list[UnixDiag] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, off)
        if kind == NLMSG_DONE:
            return out, True
        out.append(parse_reply(data[off:off + length]))
        off += (length + 3) & ~3
    return out, False


def parse_reply(data: bytes) -> UnixDiag:
    """The first message of a reply; KernelError for an NLMSG_ERROR (its errno)."""
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    body = data[_NLMSGHDR.size:length]
    if kind == NLMSG_ERROR:
        err = -struct.unpack_from("=i", body)[0]
        raise KernelError(err or errno.EIO, "unix_diag")
    if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG.size:
        raise KernelError(errno.EPROTO, f"unix_diag: unexpected netlink message type {kind}")
    _, type_, state, ino, _, _ = _MSG.unpack_from(body)
    fields: dict[str, object] = {}
    off = _MSG.size
    while off + _RTA.size <= len(body):
        rta_len, rta_type = _RTA.unpack_from(body, off)
        if rta_len < _RTA.size:
            break
        value = body[off + _RTA.size:off + rta_len]
        if rta_type == NAME:
            fields["name"] = value
        elif rta_type == VFS:
            fields["vfs"] = struct.unpack("=II", value[:8])
        elif rta_type == PEER:
            fields["peer"] = struct.unpack("=I", value[:4])[0]
        elif rta_type == ICONS:
            fields["icons"] = struct.unpack(f"={len(value) // 4}I", value[:len(value) // 4 * 4])
        elif rta_type == RQLEN:
            fields["rqueue"], fields["wqueue"] = struct.unpack("=II", value[:8])
        elif rta_type == SHUTDOWN:
            fields["shutdown"] = value[0]
        off += (rta_len + 3) & ~3
    return UnixDiag(ino=ino, type=type_, state=state, **fields)  # type: ignore[arg-type]


def query(ino: int) -> UnixDiag | None:
    """unix_diag of socket ``ino`` in ckpt's network namespace; None if there is none."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:
        nl.sendto(build_request(ino), (0, 0))
        data = nl.recv(1 << 16)
    try:
        return parse_reply(data)
    except KernelError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise KernelError(exc.errno, f"unix_diag of socket:[{ino}]") from None



def query_all(show: int = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS) -> list[UnixDiag]:
    """unix_diag of every unix socket of ckpt's network namespace."""
    out: list[UnixDiag] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:
        nl.sendto(build_request(0, show=show), (0, 0))
        done = False
        while not done:
            found, done = parse_replies(nl.recv(1 << 16))
            out += found
    return out


def kernel_dev(dev: int) -> int:
    """A kernel dev_t (UNIX_DIAG_VFS: major << 20 | minor) as st_dev encodes it."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)


SO_GET_FILTER = 26


def filter_length(fd: int) -> int:
    """Instructions of the socket filter on ``fd`` (SO_ATTACH_FILTER; 0: none; -1: an eBPF
    one, SO_ATTACH_BPF). getsockopt(SO_GET_FILTER) with a length of 0 only counts them:
    with a buffer, the kernel would write the whole program into it whatever its size."""
    length = ctypes.c_uint(0)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(length)) < 0:
        err = ctypes.get_errno()
        if err == errno.EACCES:
            return -1
        raise KernelError(err, "getsockopt(SO_GET_FILTER)")
    return length.value
