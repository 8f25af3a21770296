"""What a unix socket has to read, peeked without consuming it (for
ckpt.collect.fdkinds.unix): recvmsg(MSG_PEEK) at SO_PEEK_OFF, with SO_PASSCRED set so
that each message or run says who sent it (SCM_CREDENTIALS).
"""

from __future__ import annotations

import os
import socket

SO_PEEK_OFF = 42
PEEK_BUF = 1 << 16
#: (data, sender's address, (pid, uid, gid)) of each message or run of a queue
Queued = list[tuple[bytes, bytes, tuple[int, int, int]]]
CRED_SPACE = socket.CMSG_SPACE(12)


def _creds(anc: list[tuple[int, int, bytes]]) -> tuple[int, int, int] | None:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            pid, uid, gid = (int.from_bytes(data[i:i + 4], "little") for i in (0, 4, 8))
            return pid, uid, gid
    return None


def peek_queue(s: socket.socket, kind: int, total: int | None = None) -> Queued:
    """(data, sender address, (pid, uid, gid)) of every message (dgram, seqpacket) or run
    (stream) queued on ``s``, oldest first, without consuming any. The caller has set
    SO_PASSCRED on it, and puts its SO_PEEK_OFF back after.

    The first is peeked plainly (SO_PEEK_OFF -1), the rest at their offset: a peek at an
    offset skips an empty datagram that was peeked before (skb->peeked), and a process
    polling with a plain MSG_PEEK marks the first one so. With an error pending, a stream
    or seqpacket queue is peeked up to its ``total`` bytes (unix_diag) and no further: a
    read of an empty queue would take the error (sk_err) away from the process."""
    out: Queued = []
    off, size = -1, PEEK_BUF
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
    while total is None or max(off, 0) < total:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, off)
        try:
            data, anc, mflags, addr = s.recvmsg(size, CRED_SPACE, flags)
        except BlockingIOError:
            return out
        creds = _creds(anc)
        if creds is None or (kind == socket.SOCK_STREAM and not data):
            return out  # end of file: shut down for reading, nothing left
        if mflags & socket.MSG_TRUNC:  # a larger message: peek it again whole
            size *= 4
            continue
        off = max(off, 0) + len(data)
        sender = os.fsencode(addr) if isinstance(addr, str) else addr or b""
        out.append((data, sender, creds))
    return out


def merge_runs(queued: Queued, kind: int) -> Queued:
    """A stream's runs as few as they can be: one per sender's credentials (peeked in
    pieces of PEEK_BUF); messages stay as they are."""
    if kind != socket.SOCK_STREAM:
        return queued
    out: Queued = []
    for data, sender, creds in queued:
        if out and out[-1][2] == creds:
            out[-1] = (out[-1][0] + data, sender, creds)
        else:
            out.append((data, sender, creds))
    return out
