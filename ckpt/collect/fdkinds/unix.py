"""Unix sockets: pairs, connections and listeners inside the process, with their queues.

What each socket is comes from unix_diag (ckpt.kernel.unix_diag: type, state, bound name,
peer, queue lengths, shutdown), read once for every socket of the process; what it holds
from a copy of its fd (Peek.getfd):

    queue        peeked without consuming: recvmsg(MSG_PEEK) at SO_PEEK_OFF until EAGAIN,
                 the target's own SO_PEEK_OFF and SO_PASSCRED put back after. Stream
                 queues are runs of bytes; dgram and seqpacket ones keep each message
                 (with its sender's address). SO_PASSCRED is set meanwhile so that each
                 run says who sent it (SCM_CREDENTIALS): the process itself, whose pid a
                 restore sends again, or another process (refused).
    options      getsockopt of OPTIONS that differ from a new socket's (O_ASYNC, its
                 owner and signal are every fd's: ckpt.collect.fdkinds.fown)
    shutdown     from unix_diag (sk_shutdown)

Restore (ckpt.collect.fdkinds.unix_build) makes every socket tied to this one at once
(by the restored process, so SO_PEERCRED names it): socketpair(2) for pairs, bind +
listen for listeners, connect + accept through the (restored or a passing) listener for
connections, then fills each queue by sending from the other end, shuts down, sets
options; the restored process takes them.

Refused, before the freeze and naming the fd (:func:`refusal`): a socket another process
holds too (a scan of /proc/*/fd), connections waiting in a listener's backlog, fds in
flight (SCM_RIGHTS, fdinfo scm_fds), an out-of-band byte (MSG_OOB), a socket filter,
a pending error (but ECONNRESET from a peer closed
unread), a name a restore could not bind again (a relative path, a path that now names
another file, a connection through a path whose listener is gone), a socket unix_diag
cannot see (another network namespace).
Found only while frozen, by the peek: queued data another process sent, a datagram from
a named socket outside.

In a tree dump (``ckpt dump -t``) the process's surroundings are the tree's: a peer, a
listener or a datagram's sender any member holds is "here" (a socketpair between a master
and its worker, a multiprocessing Pipe), its queue saved by the member holding the socket
(a socket held by several members is one open file description: saved by the first,
OpenFile.shared_pid for the others); restore makes the group once for every member.

A socket connected to a peer outside the process that a restore cannot reach by name (a
stream's, an unnamed dgram's) is external, "socket:[INODE]" as /proc/PID/fd shows it:
restore takes it from --inherit-fd; data the outside queued to it is refused (the socket
given would not hold it), and so is every external socket under migrate.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds.base import FdFlags, FdKind, Peek
from ckpt.collect.fdkinds.unix_build import restore
from ckpt.collect.fdkinds.unix_maker import show_name
from ckpt.collect.fdkinds.unix_queue import SO_PEEK_OFF, merge_runs, peek_queue
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import Sharing, TreeView, scan_holders
from ckpt.errors import NotDumpable
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel import unix_diag
from ckpt.kernel.unix_diag import ESTABLISHED, LISTEN, UnixDiag

NAME = "unix socket"
SO_PASSCRED = 16
SHUTDOWN_MASK = 3
#: SOL_SOCKET options carried over when they differ from a new socket's: (name, size)
OPTIONS = (
    (16, 4),   # SO_PASSCRED
    (34, 4),   # SO_PASSSEC
    (76, 4),   # SO_PASSPIDFD
    (83, 4),   # SO_PASSRIGHTS (6.16; 0: refuses SCM_RIGHTS)
    (7, 4),    # SO_SNDBUF (set with SO_SNDBUFFORCE, halved)
    (8, 4),    # SO_RCVBUF (SO_RCVBUFFORCE)
    (18, 4),   # SO_RCVLOWAT
    (12, 4),   # SO_PRIORITY
    (36, 4),   # SO_MARK
    (9, 4),    # SO_KEEPALIVE
    (13, 8),   # SO_LINGER
    (20, 16),  # SO_RCVTIMEO
    (21, 16),  # SO_SNDTIMEO
    (29, 4),   # SO_TIMESTAMP
    (35, 4),   # SO_TIMESTAMPNS
    (40, 4),   # SO_RXQ_OVFL
    (10, 4),   # SO_OOBINLINE
    (42, 4),   # SO_PEEK_OFF (the target's, read before the peek)
)


@dataclass(frozen=True)
class Seen:
    """What inspect found: the socket and its surroundings in the process."""

    diag: UnixDiag | None  # None: unix_diag does not know it (another network namespace)
    peer: UnixDiag | None  # the peer's, when it has one
    peer_here: bool  # the peer is a socket of the process (in a tree: of any member)
    listeners: frozenset[bytes]  # names of the process's (tree's) listening sockets
    scm_fds: int  # fds in flight in its queue (fdinfo)
    oob: bool  # an out-of-band byte is queued
    # a path name: "same" (its socket file), "missing" (unlinked), "other" (another file
    # there now), "gone" (its directory too)
    name_file: str
    # connected (getpeername): a dgram socket shows ESTABLISHED once another connected
    # to it, and no peer once its own peer was closed
    connected: bool = True
    filtered: bool = False  # a socket filter is attached (SO_ATTACH_FILTER)
    error: bool = False  # an error is pending (poll: POLLERR; SO_ERROR would clear it)
    outside: tuple[int, ...] = ()  # processes outside the dump that hold it too
    pid: int = 0  # the process's


def path_name(name: bytes) -> bytes:
    """A path name as bound (unix_diag adds the terminating NUL)."""
    return name if name.startswith(b"\0") else name.rstrip(b"\0")


def inode_of(target: str) -> int | None:
    if target.startswith("socket:[") and target.endswith("]"):
        return int(target[8:-1])
    return None


def sockets_of(peek: Peek) -> dict[int, UnixDiag]:
    """unix_diag of every unix socket of the process, by inode (read once per Peek)."""
    found: dict[int, UnixDiag] | None = peek.memo.get(NAME)
    if found is None:
        found = {}
        for info in peek.fds.values():
            ino = inode_of(info.target)
            if ino is not None and ino not in found:
                diag = unix_diag.query(ino)
                if diag is not None:
                    found[ino] = diag
        peek.memo[NAME] = found
    return found


def member_sockets(peek: Peek) -> dict[int, UnixDiag]:
    """unix_diag of every unix socket the process or another member of its tree holds, by
    inode (read once per Peek): a peer one of them holds is no outside one."""
    found: dict[int, UnixDiag] | None = peek.memo.get(NAME + ".tree")
    if found is None:
        found = dict(sockets_of(peek))
        for ino in socket_inodes(peek.tree, peek.pid) - found.keys():
            diag = unix_diag.query(ino)
            if diag is not None:
                found[ino] = diag
        peek.memo[NAME + ".tree"] = found
    return found


def socket_inodes(tree: TreeView, pid: int) -> set[int]:
    """Inodes of the sockets the members of ``tree`` but ``pid`` hold (pure)."""
    return {ino for _, info in tree.others(pid) if (ino := inode_of(info.target)) is not None}


def holders(peek: Peek) -> dict[str, tuple[int, ...]]:
    """Other processes holding the process's unix sockets (one /proc scan per Peek)."""
    found: dict[str, tuple[int, ...]] | None = peek.memo.get(NAME + ".holders")
    if found is None:
        links = {f"socket:[{ino}]" for ino in sockets_of(peek)}
        found = scan_holders(links, {peek.pid, os.getpid(), *peek.tree.pids})
        peek.memo[NAME + ".holders"] = found
    return found


def claims(info: FdInfo, peek: Peek | None) -> bool:
    """A unix socket: one unix_diag knows, or (to be refused, naming why) one of another
    network namespace, which only its SO_DOMAIN tells."""
    ino = inode_of(info.target)
    if ino is None or peek is None:
        return False
    if ino in sockets_of(peek):
        return True
    with peek.getfd(info.fd) as fd, _sock(fd) as s:
        return s.family == socket.AF_UNIX


def _name_file(diag: UnixDiag) -> str:
    name = path_name(diag.name)
    if not name or diag.abstract or diag.vfs is None:
        return "same"
    try:
        st = os.stat(name)
    except OSError:
        return "missing" if os.path.isdir(os.path.dirname(name) or b".") else "gone"
    ino, dev = diag.vfs
    same = st.st_ino == ino and st.st_dev == unix_diag.kernel_dev(dev)
    return "same" if same and stat.S_ISSOCK(st.st_mode) else "other"


def inspect(info: FdInfo, peek: Peek) -> Seen:
    here = member_sockets(peek)  # the process's and, in a tree, every member's
    ino = inode_of(info.target) or 0
    diag = here.get(ino)
    peer = None
    if diag is not None and diag.peer:
        peer = here.get(diag.peer) or unix_diag.query(diag.peer)
    listeners = frozenset(d.name for d in here.values() if d.state == LISTEN)
    oob, connected, filtered, error = False, True, False, False
    if diag is not None:
        with peek.getfd(info.fd) as fd, _sock(fd) as s:
            if diag.type == socket.SOCK_STREAM:
                with contextlib.suppress(OSError):
                    oob = bool(s.recv(1, socket.MSG_OOB | socket.MSG_PEEK
                                      | socket.MSG_DONTWAIT))
            try:
                s.getpeername()
            except OSError:
                connected = False
            filtered = unix_diag.filter_length(fd) != 0
            poller = select.poll()
            poller.register(fd, select.POLLERR)
            error = any(ev & select.POLLERR for _, ev in poller.poll(0))
    fields = dict(info.extra)
    return Seen(diag, peer, peer is not None and diag is not None and diag.peer in here,
                listeners, int(fields.get("scm_fds", "0")), oob,
                _name_file(diag) if diag is not None else "same", connected, filtered, error,
                holders(peek).get(info.target, ()), peek.pid)


def external(seen: Seen) -> bool:
    """Connected to a socket outside the process that a restore cannot reach by name (a
    stream's peer, an unnamed dgram one): restore takes it from --inherit-fd."""
    d = seen.diag
    return d is not None and bool(d.peer) and not seen.peer_here and (
        d.type != socket.SOCK_DGRAM or seen.peer is None or not seen.peer.name)


def refusal(seen: Seen, externals: bool = True) -> str | None:
    """Why a restore could not bring this socket back exactly, or None (pure).
    ``externals``: a socket connected outside may be recorded as external (not for
    migrate: nothing could stand for it on another host)."""
    d = seen.diag
    if d is None:
        return "a unix socket unix_diag does not show (another network namespace?): " \
            "not supported yet"
    name = show_name(path_name(d.name))
    stream = d.type != socket.SOCK_DGRAM
    if seen.outside:
        return f"a unix socket also held by process {', '.join(map(str, seen.outside))} " \
            "outside the dump (a restore would cut it off): not supported yet"
    if d.state == LISTEN and d.rqueue:
        return f"a listening unix socket ({name}) with {d.rqueue} connection(s) not " \
            "accepted yet: not supported yet"
    if seen.scm_fds:
        return f"a unix socket with {seen.scm_fds} file descriptor(s) in flight " \
            "(SCM_RIGHTS): not supported yet"
    if seen.filtered:
        return "a unix socket with a socket filter (SO_ATTACH_FILTER): not supported yet"
    orphan = stream and d.state == ESTABLISHED and not d.peer and d.shutdown == SHUTDOWN_MASK
    if seen.error and not orphan:
        return "a unix socket with an error pending (SO_ERROR): not supported yet"
    if seen.oob:
        return "a unix socket with an out-of-band byte queued (MSG_OOB): not supported yet"
    if d.name and not d.abstract and not d.name.startswith(b"/"):
        return f"a unix socket bound to a relative path ({name}): not supported yet"
    if seen.name_file == "other":
        return f"a unix socket bound to {name}, which now names another file: " \
            "not supported yet"
    if seen.name_file == "gone":
        return f"a unix socket bound to {name}, whose directory is gone: not supported yet"
    if stream and d.state == ESTABLISHED and not d.peer and d.shutdown != SHUTDOWN_MASK:
        return "a unix socket whose connection waits in a listener's backlog (not " \
            "accepted yet): not supported yet"
    if external(seen):
        if not externals:
            return f"a unix socket connected to socket:[{d.peer}] outside the process: " \
                "this cannot be connected on another host (restore's --inherit-fd)"
        if d.rqueue:
            return f"a unix socket with {d.rqueue} bytes queued from socket:[{d.peer}] " \
                "outside the process, which a socket given by --inherit-fd would not " \
                "hold: not supported yet"
        return None
    peer_name = seen.peer.name if seen.peer is not None else b""
    if d.peer and not seen.peer_here and not peer_name.startswith((b"\0", b"/")):
        return f"a unix socket connected to {show_name(path_name(peer_name))} (socket:" \
            f"[{d.peer}]), a relative path outside the process: not supported yet"
    if stream and seen.peer_here and d.name and d.name not in seen.listeners \
            and peer_name not in seen.listeners:
        if peer_name:
            return f"a unix socket bound to {name} and connected to another bound one " \
                f"(socket:[{d.peer}]): not supported yet"
        if not d.abstract:
            return f"a unix socket connected through {name}, whose listening socket is " \
                "gone: not supported yet"
    return None


def refuse(info: FdInfo, details: Any, flags: FdFlags) -> str | None:
    return refusal(details, flags.externals)


@contextlib.contextmanager
def _sock(fd: int) -> Iterator[socket.socket]:
    s = socket.socket(fileno=os.dup(fd))
    try:
        yield s
    finally:
        s.close()


def _options(s: socket.socket, kind: int) -> list[pb.UnixOption]:
    """The OPTIONS of ``s`` that differ from those of a new socket of its type."""
    out = []
    for name, size in OPTIONS:
        default = defaults(kind).get(name)
        if default is None:
            continue  # not known to this kernel
        value = s.getsockopt(socket.SOL_SOCKET, name, size)
        if value != default:
            out.append(pb.UnixOption(level=socket.SOL_SOCKET, name=name, value=value))
    return out


@functools.cache
def defaults(kind: int) -> dict[int, bytes]:
    """The OPTIONS of a new unix socket of type ``kind`` (those this kernel knows)."""
    out = {}
    with socket.socket(socket.AF_UNIX, kind) as fresh:
        for name, size in OPTIONS:
            with contextlib.suppress(OSError):
                out[name] = fresh.getsockopt(socket.SOL_SOCKET, name, size)
    return out


def collect(info: FdInfo, details: Any, peek: Peek, out: pb.OpenFile) -> None:
    seen: Seen = details
    d = seen.diag
    assert d is not None  # refused otherwise
    u = out.unix_socket
    u.type, u.state, u.inode, u.shutdown = d.type, d.state, d.ino, d.shutdown
    u.name = path_name(d.name)
    out.object = d.ino
    if external(seen):  # what the outside sent it stays with the outside (refused if any)
        out.external = f"socket:[{d.ino}]"
        return
    if d.state == LISTEN:
        u.backlog = d.wqueue
    if d.peer:
        u.peer = d.peer if seen.peer_here else 0
        if not seen.peer_here and seen.peer is not None:
            u.peer_name = path_name(seen.peer.name)
    elif d.state == ESTABLISHED and seen.connected:
        u.peer_closed = True
        u.reset = seen.error  # (stream) its peer was closed before reading all
    if u.name and not d.abstract:
        _record_file(u, seen)
    named = {path_name(x.name): x.ino for x in member_sockets(peek).values() if x.name}
    with peek.getfd(info.fd) as fd, _sock(fd) as s:
        u.options.extend(_options(s, d.type))
        if d.state == LISTEN:
            return
        peek_off = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        passcred = s.getsockopt(socket.SOL_SOCKET, SO_PASSCRED)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
            queued = peek_queue(s, d.type, d.rqueue if seen.error else None)
        finally:
            s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, peek_off)
            s.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, passcred)
    for data, sender, (pid, uid, gid) in merge_runs(queued, d.type):
        if pid not in (0, peek.pid):  # 0: none recorded (neither end had SO_PASSCRED)
            who = "another member of the tree" if pid in peek.tree.pids else "outside"
            raise NotDumpable(f"fd {info.fd} is a unix socket with data queued by process "
                              f"{pid} ({who}) with its credentials (SO_PASSCRED), which a "
                              "restore cannot send again: not supported yet")
        if d.type != socket.SOCK_STREAM and sender and sender not in named:
            raise NotDumpable(f"fd {info.fd} is a unix socket with a datagram queued from "
                              f"{show_name(sender)}, outside the process: not supported yet")
        u.queue.append(pb.UnixMessage(data=data, from_self=pid != 0, uid=uid, gid=gid,
                                      sender=sender if d.type != socket.SOCK_STREAM else b""))


def _record_file(u: pb.UnixSocket, seen: Seen) -> None:
    if seen.name_file == "missing":
        u.unlinked = True
        return
    with contextlib.suppress(OSError):
        st = os.stat(u.name)
        u.file_mode, u.file_uid, u.file_gid = st.st_mode & 0o7777, st.st_uid, st.st_gid


KIND = FdKind(NAME, pb.OpenFile.UNIX_SOCKET, claims, collect, restore, inspect=inspect,
              refuse=refuse, holders=Sharing.OWN)  # refuse names the other holders itself
