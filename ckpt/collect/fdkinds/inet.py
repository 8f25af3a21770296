"""TCP and UDP sockets, IPv4 and IPv6: listeners, bound and unbound sockets, bound and
connected UDP sockets; TCP connections only closed (--tcp-close).

What is read, from a copy of the fd (Peek.getfd) and from inet_diag (ckpt.kernel.inet_diag,
which knows what getsockopt does not):

    family, type, protocol      getsockopt SO_DOMAIN, SO_TYPE, SO_PROTOCOL
    local and peer address      getsockname, getpeername
    options                     getsockopt, those a new socket lacks (inet_options.py)
    multicast memberships       getsockopt MCAST_MSFILTER of each group of /proc/net/igmp
                                and igmp6 of its namespace (inet_mcast.py)
    state no getsockopt reads   TCP_ULP, TCP_REPAIR, TCP-AO, TCP-MD5 (inet_diag): refused
    state, backlog, queues,     inet_diag, found by the socket's inode
    shutdown, owner's uid
    connections not accepted    inet_diag: sockets without an inode on a listener's port

Restore makes the socket in ckpt (as the owner's uid: sk_uid decides who may join an
SO_REUSEPORT group; with the process's gid and groups: RestoreCtx.as_owner), sets the
options, joins the groups, binds, listens with the same backlog or connects a
UDP socket to its peer, and the restored process takes it. The port is free then: the
dump killed the process; if it is not, the restore fails naming the address. A listener
without SO_REUSEADDR is refused its port by the kernel while connections it accepted
linger there in TIME_WAIT or FIN_WAIT (closed shortly before the dump, or by the dump
under --tcp-close), as the program itself would be if restarted: SO_REUSEADDR does not
help (the lingering sockets lack it too), nor TCP_REPAIR's forced reuse (a listener in
repair mode cannot leave it).

Refused, naming the socket (what ``ckpt dump`` says, before the freeze):
    a socket of another network namespace than ckpt's: the restore would make it in
        ckpt's (a listener of a container back on the host's address); ckpt run in that
        namespace takes it. Not refused by migrate, which moves the process to the
        destination's namespace on purpose (FdFlags.migrating)
    an option a new socket does not read back once set (inet_options.replay), and
        state no getsockopt reads (inet_options.unreadable; TCP-MD5 keys from inet_diag)
    a TCP connection (any state but LISTEN, and CLOSE when never connected; one that
        ended, its fd still open, too: its pending error cannot be read without taking
        it from the program), unless
        --tcp-close: then it comes back reset: a socket whose peer sent a RST, so the
        program's next read or write fails with ECONNRESET (then reads return 0, writes
        EPIPE), poll reports POLLERR|POLLHUP, and the program closes it; its clients see
        their connection closed by the dump and reconnect
    a listener's connections not yet accepted, unless --tcp-close: then they are
        dropped (their clients get a reset when the dumped listener dies)
    datagrams queued on a UDP socket, or corked (UDP_CORK) and not sent
    a socket filter (SO_ATTACH_FILTER, SO_ATTACH_BPF)
    a bound or connected socket that inet_diag does not show (a kernel without it)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import socket
import struct
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds import inet_mcast as mc
from ckpt.collect.fdkinds import inet_options as opts
from ckpt.collect.fdkinds import inet_tables as tables
from ckpt.collect.fdkinds.base import FdFlags, FdKind, Opened, Peek, RestoreCtx
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import Sharing
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel import inet_diag as diag

FAMILIES = (socket.AF_INET, socket.AF_INET6)
KINDS: dict[tuple[int, int], str] = {(int(socket.SOCK_STREAM), socket.IPPROTO_TCP): "TCP",
                                     (int(socket.SOCK_DGRAM), socket.IPPROTO_UDP): "UDP"}
SO_DOMAIN, SO_PROTOCOL, SO_GET_FILTER = 39, 38, 26
SO_LINGER, TCP_INFO = 13, 11
RESET_WAIT_MS = 5000


@dataclass(frozen=True)
class Endpoint:
    """An address and port; ``addr`` packed (4 or 16 bytes)."""

    addr: bytes
    port: int
    scope_id: int = 0

    @staticmethod
    def of(family: int, name: Any) -> Endpoint:
        """From getsockname()'s tuple ("::1%lo" keeps its scope in scope_id)."""
        host = str(name[0]).partition("%")[0]
        scope = int(name[3]) if family == socket.AF_INET6 else 0
        return Endpoint(socket.inet_pton(family, host), int(name[1]), scope)

    @property
    def host(self) -> str:
        return socket.inet_ntop(socket.AF_INET if len(self.addr) == 4 else socket.AF_INET6,
                                self.addr)  # "::ffff:127.0.0.1", as ss shows it

    @property
    def wildcard(self) -> bool:
        return not any(self.addr) and not self.port

    def sockaddr(self) -> tuple[Any, ...]:
        if len(self.addr) == 4:
            return (self.host, self.port)
        return (self.host, self.port, 0, self.scope_id)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if len(self.addr) == 4 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class InetState:
    """What :func:`inspect` found; :func:`refuse` judges it, :func:`collect` saves it."""

    family: int
    type: int
    protocol: int
    state: int  # inet_diag's; -1: the socket is not in inet_diag's table
    local: Endpoint | None  # None: not bound
    peer: Endpoint | None
    backlog: int = 0
    rqueue: int = 0
    wqueue: int = 0
    uid: int = 0
    shutdown: int = 0
    options: tuple[tuple[str, opts.Value], ...] = ()
    pending: tuple[str, ...] = ()  # a listener's connections not accepted: "peer -> local"
    filtered: bool = False
    memberships: tuple[mc.Membership, ...] = ()
    unreadable: tuple[str, ...] = ()  # state no getsockopt reads (opts.unreadable), in words
    unreplayable: tuple[str, ...] = ()  # options that do not read back once set (opts.replay)
    netns: str = ""  # "net:[INODE]" of a socket in another network namespace than ckpt's

    @property
    def proto_name(self) -> str:
        return KINDS[self.type, self.protocol]

    @property
    def is_connection(self) -> bool:
        """A TCP socket that is or was connected (restored only closed)."""
        return (self.protocol == socket.IPPROTO_TCP and self.state != diag.TCP_LISTEN
                and not (self.state == diag.TCP_CLOSE and not self.shutdown))


@contextlib.contextmanager
def borrowed(fd: int) -> Iterator[socket.socket]:
    """A socket object over ``fd`` that leaves the fd open (and its flags alone)."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def claims(info: FdInfo, peek: Peek | None) -> bool:
    if peek is None or not info.target.startswith("socket:["):
        return False
    with peek.getfd(info.fd) as fd, borrowed(fd) as sock:
        return (sock.getsockopt(socket.SOL_SOCKET, SO_DOMAIN) in FAMILIES and
                (sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
                 sock.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL)) in KINDS)


def _name(sock: socket.socket, family: int, peer: bool) -> Endpoint | None:
    try:
        name = sock.getpeername() if peer else sock.getsockname()
    except OSError:  # ENOTCONN
        return None
    end = Endpoint.of(family, name)
    return None if end.wildcard else end


def inspect(info: FdInfo, peek: Peek) -> InetState:
    st = _inspect(info, peek)
    if st.is_connection:  # restored reset: no option, no group matters
        return st
    return dataclasses.replace(st, unreplayable=opts.replay(st.family, st.type, st.protocol,
                                                            st.options))


def _inspect(info: FdInfo, peek: Peek) -> InetState:
    with peek.getfd(info.fd) as fd, borrowed(fd) as sock, tables.netns_of(fd) as netns:
        family, type_, proto = sock.family, sock.type, sock.proto
        local, peer = _name(sock, family, False), _name(sock, family, True)
        values = opts.read(sock, family, proto)
        uid = os.fstat(fd).st_uid
        tcp_state = (sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0]
                     if proto == socket.IPPROTO_TCP else diag.TCP_CLOSE)
        table = tables.diag_table(peek, netns, family, proto)
        try:
            filtered = bool(sock.getsockopt(socket.SOL_SOCKET, SO_GET_FILTER, 8))
        except OSError:  # EINVAL: a filter longer than 1 instruction; EACCES: eBPF
            filtered = True
        unreadable = opts.unreadable(sock, values, proto)
        try:
            groups = mc.memberships(fd, family, tables.groups(peek, netns))
        except OSError as exc:  # cannot tell: refused, not guessed
            groups = ()
            unreadable += (f"multicast memberships ckpt could not read ({exc})",)
        ns = tables.foreign_netns(netns)
    options = tuple(opts.changed(values, dict(opts.defaults(family, type_, proto))).items())
    me = next((s for s in table if s.inode == info.st_ino), None)
    if me is not None and me.md5:
        unreadable += ("TCP-MD5 keys (TCP_MD5SIG)",)
    common: dict[str, Any] = {
        "options": options, "filtered": filtered, "memberships": groups,
        "unreadable": unreadable, "netns": ns}
    if me is None:
        state, shutdown = tables.unlisted(proto, tcp_state, local is not None or peer is not None)
        return InetState(family, type_, proto, state, local, peer, uid=uid,
                         shutdown=shutdown, **common)
    listening = proto == socket.IPPROTO_TCP and me.state == diag.TCP_LISTEN
    return InetState(family, type_, proto, me.state, local, peer,
                     backlog=me.wqueue if listening else 0, rqueue=me.rqueue,
                     wqueue=0 if listening else me.wqueue, uid=me.uid,
                     shutdown=me.shutdown,
                     pending=tables.pending_of(me, table) if listening else (), **common)


def refuse(info: FdInfo, s: InetState, flags: FdFlags) -> str | None:
    """Why this socket cannot be restored as it is, or None (pure)."""
    what = s.proto_name
    if s.netns and not flags.migrating:
        return (f"a {what} socket {s.local or '(not bound)'} of network namespace {s.netns}, "
                "not ckpt's: a restore makes sockets in ckpt's (run ckpt in that namespace, "
                "or migrate the process there)")
    if s.state < 0:
        return f"a {what} socket that inet_diag does not show: not supported yet"
    if s.filtered:
        return f"a {what} socket with a socket filter (SO_ATTACH_FILTER/BPF): not supported yet"
    if s.unreadable and not (s.is_connection and flags.tcp_close):
        return f"a {what} socket with {', '.join(s.unreadable)}: not supported yet"
    if s.unreplayable:
        return (f"a {what} socket with options a new socket does not take back as they were "
                f"({', '.join(s.unreplayable)}): not supported")
    if s.is_connection and not flags.tcp_close:
        if s.state == diag.TCP_CLOSE:
            return (f"a TCP connection from {s.local or '?'} that ended (reset, or closed "
                    "by both sides): restored only with --tcp-close (reset again)")
        state = diag.TCP_STATES.get(s.state, str(s.state))
        return (f"a TCP connection {s.local or '?'} -> {s.peer or '?'} ({state}): restored "
                "only closed, with --tcp-close")
    if s.state == diag.TCP_LISTEN and s.protocol == socket.IPPROTO_TCP \
            and (s.rqueue or s.pending) and not flags.tcp_close:
        names = f" ({', '.join(s.pending)})" if s.pending else ""
        return (f"a TCP listener on {s.local} with {max(s.rqueue, len(s.pending))} "
                f"connection(s) not accepted yet{names}: dropped only with --tcp-close")
    if s.protocol == socket.IPPROTO_UDP and s.rqueue:
        return (f"a UDP socket on {s.local or 'no address'} with {s.rqueue} bytes of "
                "datagrams queued: not supported yet (dump again once it has read them)")
    if s.protocol == socket.IPPROTO_UDP and s.wqueue:
        return (f"a UDP socket on {s.local or 'no address'} with {s.wqueue} bytes corked "
                "(UDP_CORK), not sent: not supported yet")
    return None


def _endpoint(out: pb.InetAddress, e: Endpoint) -> None:
    out.addr, out.port, out.scope_id = e.addr, e.port, e.scope_id


def collect(info: FdInfo, s: InetState, peek: Peek, out: pb.OpenFile) -> None:
    m = out.inet_socket
    m.family, m.type, m.protocol, m.state = s.family, s.type, s.protocol, s.state
    if s.local is not None:
        _endpoint(m.local, s.local)
    if s.peer is not None:
        _endpoint(m.peer, s.peer)
    m.backlog, m.uid, m.shutdown, m.closed = s.backlog, s.uid, s.shutdown, s.is_connection
    for name, value in s.options:
        if isinstance(value, bytes):
            m.options.add(name=name, raw=value)
        else:
            m.options.add(name=name, value=value)
    for g in s.memberships:
        m.memberships.add(family=g.family, group=g.group, ifindex=g.ifindex,
                          include=g.include, sources=g.sources)


# --------------------------------------------------------------------------- restore


def _where(ctx: RestoreCtx, f: pb.OpenFile) -> str:
    fds = ", ".join(str(fd.fd) for fd in ctx.entry.fds if fd.file_id == f.id)
    return f"fd {fds}"


def _read_endpoint(m: pb.InetAddress, family: int) -> Endpoint:
    if len(m.addr) != (4 if family == socket.AF_INET else 16) or m.port > 0xFFFF:
        raise ValueError("a malformed address")
    return Endpoint(m.addr, m.port, m.scope_id)


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    m = f.inet_socket
    where = _where(ctx, f)
    if m.family not in FAMILIES or (m.type, m.protocol) not in KINDS:
        raise RestoreError(f"{where}: an inet socket of family {m.family}, type {m.type}, "
                           f"protocol {m.protocol}, which ckpt does not make")
    try:
        local = _read_endpoint(m.local, m.family) if m.HasField("local") else None
        peer = _read_endpoint(m.peer, m.family) if m.HasField("peer") else None
    except ValueError as exc:
        raise RestoreError(f"{where}: {exc} in the image") from None
    owner = ctx.as_owner(m.uid)  # sk_uid: who may join its SO_REUSEPORT group
    sock = (reset_connection(m.family, owner) if m.closed
            else make_socket(m, local, peer, where, owner))
    sock.setblocking(not f.flags & os.O_NONBLOCK)
    return Opened(ctx.hold(sock.detach()))


def membership_of(g: pb.InetMembership) -> mc.Membership:
    """A membership of the image (its fields checked by ckpt.images.validate)."""
    return mc.Membership(g.family, g.group, g.ifindex, g.include, tuple(g.sources))


def make_socket(m: pb.InetSocket, local: Endpoint | None, peer: Endpoint | None,
                where: str, owner: AbstractContextManager[None]) -> socket.socket:
    """The socket ``m`` describes, made in the block ``owner`` (RestoreCtx.as_owner),
    bound, listening or connected as it was; RestoreError naming ``where`` (its fds) and
    the step that failed."""
    what = KINDS[m.type, m.protocol]
    with owner:
        sock = socket.socket(m.family, m.type | socket.SOCK_CLOEXEC, m.protocol)
    step = "setsockopt"
    tcp = m.protocol == socket.IPPROTO_TCP
    try:
        for o in m.options:
            step = f"setsockopt {o.name}"
            opts.apply(sock, o.name, o.raw if opts.is_raw(o.name) else o.value)
        for g in m.memberships:
            membership = membership_of(g)
            step = f"join multicast group {membership}"
            mc.join(sock, membership)
        if local is not None:
            step = f"bind to {what} {local}"
            sock.bind(local.sockaddr())
            if tcp and m.state == diag.TCP_LISTEN:
                step = f"listen on {what} {local}"
                sock.listen(m.backlog)
        if not tcp and peer is not None and m.state == diag.TCP_ESTABLISHED:
            step = f"connect to {what} {peer}"
            sock.connect(peer.sockaddr())
        if not tcp and m.shutdown & 3:
            with contextlib.suppress(OSError):  # ENOTCONN (unconnected): still recorded
                sock.shutdown((m.shutdown & 3) - 1)  # RCV 1, SEND 2 -> SHUT_RD 0, ...
    except KeyError as exc:
        sock.close()
        raise RestoreError(f"{where}: unknown socket option {exc} in the image") from None
    except (OverflowError, ValueError) as exc:  # a value no setsockopt takes
        sock.close()
        raise RestoreError(f"{where}: cannot {step}: {exc} (in the image)") from None
    except OSError as exc:
        sock.close()
        lingers = tcp and not any(o.name == "SO_REUSEADDR" and o.value for o in m.options)
        hint = (" (by another socket, or by a connection of the dumped process in "
                "TIME_WAIT: it had no SO_REUSEADDR)"
                if exc.errno == errno.EADDRINUSE and lingers else "")
        raise RestoreError(f"{where}: cannot {step}: {exc.strerror or exc}{hint}") from None
    return sock


def reset_connection(family: int, owner: AbstractContextManager[None]) -> socket.socket:
    """A TCP socket of ``family``, made in the block ``owner``, whose connection its peer
    reset: connected over loopback to a socket of ckpt's that then closes with SO_LINGER
    0 (a RST). Its pending error is ECONNRESET."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with owner:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as lst:
            lst.bind((host, 0))
            lst.listen(1)
            sock.connect(lst.getsockname())
            peer, _ = lst.accept()
            peer.setsockopt(socket.SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
    except OSError as exc:
        sock.close()
        raise RestoreError(f"cannot make a reset TCP connection over {host} (for "
                           f"--tcp-close): {exc.strerror or exc}") from None
    poll = select.poll()
    poll.register(sock, select.POLLERR | select.POLLHUP)
    if not poll.poll(RESET_WAIT_MS):
        sock.close()
        raise RestoreError(f"a TCP reset over {host} did not arrive (for --tcp-close)")
    return sock


KIND = FdKind("inet socket", pb.OpenFile.INET_SOCKET, claims, collect, restore,
              inspect=inspect, refuse=refuse, holders=Sharing.OBJECT)
