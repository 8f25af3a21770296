"""Restore of unix sockets (the collector is ckpt.collect.fdkinds.unix).

The first restore of a socket builds every socket of the images tied to it (its peer, the
listener it was accepted from, the named sockets its datagrams came from), in this
order, made by the restored process (see Maker) and handled through copies in ckpt, kept
in ``ctx.objects``; each open file then just takes its own. An external socket is the
--inherit-fd given for it. In a tree the group is taken from every member's images
(``ctx.all_files``) and made by the first member restored that holds one of its sockets;
the others take theirs from the tree's ``ctx.objects``. SO_PEERCRED then names that member
for every socket of the group: as it was for a pair made before a fork, not for a
connection another member made itself (its peer sees the first member's pid).

    1. make      socketpair(2) for two unnamed sockets connected to each other, and for
                 a socket whose peer was closed (the other end is closed at step 5);
                 socket + bind for the rest (a path: a stale socket file is unlinked
                 first, anything else there is refused; mode and owner set back; the
                 unlink and bind with the process's file access, not root's)
    2. connect   listen(backlog); a connection accepted from a listener: connect to it
                 (the restored one, or a passing one on the same abstract name) and
                 accept
    3. refill    each queue, oldest first, sent from the other end with the
                 SCM_CREDENTIALS it had (pid: the restored process); datagrams from
                 named sockets are sent from those; then a dgram socket connected to a
                 named one connects (it would take datagrams from its peer only)
    4. shut      shutdown(2) with each socket's own bits, after the refill (a shut down
                 socket neither sends nor is sent to); an end whose peer had closed
                 without reading all sends it a byte first (ECONNRESET at the close)
    5. finish    options, O_NONBLOCK; temporary ends closed; names unlinked at dump
                 time unlinked again (O_ASYNC, its owner and signal: in the restored
                 process, as for every fd, ckpt.collect.fdkinds.fown)
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

from ckpt.collect.fdkinds.base import Opened, RestoreCtx, fs_identity
from ckpt.collect.fdkinds.unix_maker import Maker, show_name
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel import unix_diag
from ckpt.kernel.unix_diag import ESTABLISHED, LISTEN

NAME = "unix socket"  # the kind's name: ctx.objects keys
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33
FORCED = {SO_SNDBUF: SO_SNDBUFFORCE, SO_RCVBUF: SO_RCVBUFFORCE}
REFILL_BUF = 1 << 26
T = TypeVar("T")


def _addr(name: bytes) -> str | bytes:
    return name if name.startswith(b"\0") else os.fsdecode(name)


def component(files: Iterable[pb.OpenFile], first: pb.OpenFile) -> list[pb.OpenFile]:
    """``first`` and every unix socket of ``files`` tied to it (peer, listener by name,
    sender of a queued datagram), in image order."""
    socks = [f for f in files if f.type == pb.OpenFile.UNIX_SOCKET and not f.external
             and not f.shared_pid]  # a member's share of an earlier member's socket
    by_ino = {f.unix_socket.inode: f for f in socks}
    edges: dict[int, set[int]] = {ino: set() for ino in by_ino}

    def link(a: int, b: int) -> None:
        if a in edges and b in edges and a != b:
            edges[a].add(b)
            edges[b].add(a)

    listeners = {f.unix_socket.name: f.unix_socket.inode for f in socks
                 if f.unix_socket.state == LISTEN}
    named = {f.unix_socket.name: f.unix_socket.inode for f in socks if f.unix_socket.name}
    for f in socks:
        u = f.unix_socket
        link(u.inode, u.peer)
        if u.state == ESTABLISHED and u.name in listeners:
            link(u.inode, listeners[u.name])
        for m in u.queue:
            if m.sender in named:
                link(u.inode, named[m.sender])
    seen, todo = set(), [first.unix_socket.inode]
    while todo:
        ino = todo.pop()
        if ino not in seen:
            seen.add(ino)
            todo.extend(edges[ino])
    return [f for f in socks if f.unix_socket.inode in seen]


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    if f.external:
        return Opened(_inherited(ctx.inherit[f.external], f))  # ckpt.restore.files checked
    key = (NAME, f.unix_socket.inode)
    if key not in ctx.objects:
        Build(ctx, component(ctx.all_files, f)).run()  # a tree's: every member's
    return Opened(ctx.objects[key])


def _inherited(fd: int, f: pb.OpenFile) -> int:
    """The fd given for an external socket (--inherit-fd), if it is a unix socket of the
    dumped type; it gets the dumped O_NONBLOCK, the rest is as given."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            family, kind = s.family, s.type
    except OSError:
        family, kind = None, None
    if family != socket.AF_UNIX or kind != f.unix_socket.type:
        raise RestoreError(f"--inherit-fd fd[{fd}]:{f.external}: not a unix socket of type "
                           f"{f.unix_socket.type} (SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5)")
    os.set_blocking(fd, not f.flags & os.O_NONBLOCK)
    return fd


def _stale(path: str, st: os.stat_result) -> str:
    """``path`` if it is a socket file no socket holds (left by the dumped process, or by
    a failed restore); RestoreError otherwise."""
    if not stat.S_ISSOCK(st.st_mode):
        raise RestoreError(f"unix socket {path}: the path exists and is not a socket")
    for d in unix_diag.query_all():
        if d.vfs and d.vfs[0] == st.st_ino and unix_diag.kernel_dev(d.vfs[1]) == st.st_dev:
            raise RestoreError(f"unix socket {path}: a live socket (socket:[{d.ino}]) is "
                               "bound there")
    return path


class Build:
    """One connected group of sockets (steps 1-5 of the module's doc)."""

    def __init__(self, ctx: RestoreCtx, files: list[pb.OpenFile]) -> None:
        self.ctx = ctx
        self.files = {f.unix_socket.inode: f.unix_socket for f in files}
        self.flags = {f.unix_socket.inode: f.flags for f in files}
        # sockets of this process (in a tree, the others are other members')
        mine = {f.id: f.unix_socket.inode for f in ctx.entry.files if not f.shared_pid
                and f.type == pb.OpenFile.UNIX_SOCKET and f.unix_socket.inode in self.files}
        self.own = set(mine.values())
        self.where = "fd " + ", ".join(str(fd.fd) for fd in ctx.entry.fds if fd.file_id in mine)
        th = ctx.entry.threads[0] if ctx.entry.threads else None
        creds = th.creds if th is not None and th.HasField("creds") else None
        self.maker = Maker(ctx.remote, (creds.euid, creds.egid) if creds else (0, 0),
                           tuple(creds.groups) if creds else None)
        self.who = fs_identity(ctx.entry) if creds else None
        self.socks: dict[int, socket.socket] = {}
        self.other: dict[int, socket.socket] = {}  # by inode: the end whose peer was closed
        self.passing: list[socket.socket] = []  # unnamed senders of datagrams
        # dgram sockets by name: the senders of queued datagrams
        self.named = {u.name: ino for ino, u in self.files.items()
                      if u.name and u.type == socket.SOCK_DGRAM}
        self.listening = {u.name for u in self.files.values() if u.state == LISTEN}

    def run(self) -> None:
        try:
            self.make()
            self.connect()
            self.refill()
            self.connect_dgram()
            for ino, u in self.files.items():
                if u.reset:  # unread when the other end closes: ECONNRESET, as it was
                    self.socks[ino].send(b"\0", socket.MSG_DONTWAIT)
                if u.shutdown:
                    self.socks[ino].shutdown(u.shutdown - 1)  # SHUT_* is the mask - 1
            self.finish()
        except OSError as exc:
            raise RestoreError(f"{self.where} (unix sockets): {exc.strerror or exc}") from None
        finally:
            self.maker.close()
            for s in [*self.other.values(), *self.passing]:
                s.close()
        for ino, s in self.socks.items():
            self.ctx.objects[(NAME, ino)] = self.ctx.hold(s.detach())

    # ------------------------------------------------------------------ 1. make
    def make(self) -> None:
        for ino, u in self.files.items():
            if ino in self.socks:
                continue
            peer = self.files.get(u.peer)
            if peer is not None and peer.peer == ino and not u.name and not peer.name:
                self.socks[ino], self.socks[u.peer] = self.maker.socketpair(u.type)
            elif u.peer_closed:
                self.socks[ino], self.other[ino] = self.maker.socketpair(u.type)
            elif not self._accepted(u):
                s = self.socks[ino] = self.maker.new(u.type)
                if u.name:
                    self._bind(s, u)

    def _accepted(self, u: pb.UnixSocket) -> bool:
        """Made by accept(2) at step 2: a named stream end of a connection."""
        peer = self.files.get(u.peer)
        return u.type != socket.SOCK_DGRAM and u.state == ESTABLISHED and bool(u.name) \
            and peer is not None and (u.name in self.listening or not peer.name)

    def _bind(self, s: socket.socket, u: pb.UnixSocket) -> None:
        stale: str | None = None
        if not u.name.startswith(b"\0"):
            path = os.fsdecode(u.name)
            with contextlib.suppress(FileNotFoundError):  # nothing there: nothing stale
                stale = _stale(path, os.lstat(path))

        def bind() -> None:
            if stale is not None:
                os.unlink(stale)
            s.bind(_addr(u.name))

        try:
            self._with_file_access(bind)
        except OSError as exc:
            raise RestoreError(f"unix socket {show_name(u.name)}: {exc.strerror}") from None
        if u.file_mode and not u.name.startswith(b"\0"):
            os.chown(u.name, u.file_uid, u.file_gid)
            os.chmod(u.name, u.file_mode)

    def _with_file_access(self, work: Callable[[], T]) -> T:
        """``work()`` (a bind or connect by path: a socket file made, unlinked or written
        to) with the process's own file access, not root's (ckpt.kernel.creds.FsIdentity):
        a directory it may no longer write, a socket it may no longer connect to, fails."""
        return work() if self.who is None or self.who.unrestricted else self.who.run(work)

    # ------------------------------------------------------------------ 2. connect
    def connect(self) -> None:
        for ino, u in self.files.items():
            if u.state == LISTEN:
                self.maker.listen(self.socks[ino], u.backlog)
        for ino, u in self.files.items():
            if self._accepted(u):
                self.socks[ino] = self._accept(u, self.socks[u.peer])

    def connect_dgram(self) -> None:
        """After the refill: a connected dgram socket takes datagrams from its peer only."""
        for ino, u in self.files.items():
            if u.type == socket.SOCK_DGRAM and (u.peer or u.peer_name) \
                    and not self._paired(ino):
                target = self.files[u.peer].name if u.peer in self.files else u.peer_name
                if not target:
                    raise RestoreError(f"{self.where}: a unix socket connected to an unnamed "
                                       "one")
                try:
                    self._with_file_access(functools.partial(self.socks[ino].connect,
                                                             _addr(target)))
                except OSError as exc:
                    raise RestoreError(f"{self.where}: a unix socket connected to "
                                       f"{show_name(target)}: {exc.strerror}") from None

    def _paired(self, ino: int) -> bool:
        u = self.files[ino]
        peer = self.files.get(u.peer)
        return u.peer_closed or (peer is not None and peer.peer == ino and not u.name
                                 and not peer.name)

    def _accept(self, u: pb.UnixSocket, client: socket.socket) -> socket.socket:
        listener = next((self.socks[i] for i, x in self.files.items()
                         if x.state == LISTEN and x.name == u.name), None)
        passing = None
        if listener is None:  # gone since: a passing one on its abstract name
            passing = listener = self.maker.new(u.type)
            listener.bind(_addr(u.name))
            self.maker.listen(listener, 1)
        try:
            self.maker.connect(client, u.name)
            blocking = listener.getblocking()
            listener.setblocking(True)
            accepted, _ = listener.accept()
            listener.setblocking(blocking)
        finally:
            if passing is not None:
                passing.close()
        return accepted

    # ------------------------------------------------------------------ 3. refill
    def refill(self) -> None:
        """Buffers are made large for the refill (senders' and receivers'), then given back
        the size they had (step 5 sets the dumped ones)."""
        bumped: dict[tuple[socket.socket, int], int] = {}

        def bump(s: socket.socket, opt: int) -> None:
            if (s, opt) not in bumped:
                bumped[(s, opt)] = s.getsockopt(socket.SOL_SOCKET, opt)
                s.setsockopt(socket.SOL_SOCKET, FORCED[opt], REFILL_BUF)

        for ino, u in self.files.items():
            for m in u.queue:
                sender, to = self._sender(ino, u, m)
                bump(sender, SO_SNDBUF)
                bump(self.socks[ino], SO_RCVBUF)
                if m.from_self and ino not in self.own:
                    raise RestoreError(f"{self.where}: a unix socket of another member of "
                                       "the tree has data it sent itself with credentials "
                                       "(SO_PASSCRED): not supported yet")
                creds = struct.pack("iII", self.ctx.remote.pid, m.uid, m.gid) \
                    if m.from_self else b""
                self._send(sender, m.data, creds, to, u.type == socket.SOCK_STREAM)
        for (s, opt), size in bumped.items():
            if s.fileno() >= 0:
                s.setsockopt(socket.SOL_SOCKET, FORCED[opt], size // 2)

    def _sender(self, ino: int, u: pb.UnixSocket, m: pb.UnixMessage,
                ) -> tuple[socket.socket, str | bytes | None]:
        """The socket that sends ``m`` to socket ``ino``, and the address (None: its peer).
        Named dgram sockets are not connected yet: datagrams go to their name."""
        named = u.type == socket.SOCK_DGRAM and bool(u.name) and not self._paired(ino)
        to = _addr(u.name) if named else None
        if m.sender:
            src = self.named.get(m.sender)
            if src is None:
                raise RestoreError(f"{self.where}: no unix socket named {show_name(m.sender)}")
            return self.socks[src], to
        if ino in self.other:
            return self.other[ino], None
        if u.peer in self.socks:
            return self.socks[u.peer], to
        self.passing.append(socket.socket(socket.AF_UNIX, u.type))
        return self.passing[-1], _addr(u.name)

    @staticmethod
    def _send(s: socket.socket, data: bytes, creds: bytes, to: str | bytes | None,
              stream: bool) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)] if creds else []
        flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
        while True:
            n = s.sendmsg([data], anc, flags) if to is None else \
                s.sendmsg([data], anc, flags, to)
            if not stream or n == len(data):
                return
            data = data[n:]

    # ------------------------------------------------------------------ 5. finish
    def finish(self) -> None:
        for ino, u in self.files.items():
            s = self.socks[ino]
            for o in u.options:
                if o.name in FORCED:
                    value = struct.unpack("i", o.value[:4])[0] // 2
                    s.setsockopt(o.level, FORCED[o.name], value)
                else:
                    s.setsockopt(o.level, o.name, o.value)
            if self.flags[ino] & os.O_NONBLOCK:
                s.setblocking(False)
            if u.unlinked and u.name and not u.name.startswith(b"\0"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(u.name)
