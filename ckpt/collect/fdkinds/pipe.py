"""Pipes and named FIFOs: the bytes they buffer, their size and their ends' flags.

A pipe is one object (its inode, ``OpenFile.object``) of one or more open files: the
read end, the write end, an O_RDWR reopen through /proc/PID/fd/N. Which of them the
process holds decides what the dump does:

    pipe                              dump                          restore
    anonymous, a read and a write     size, bytes (packets in       one new pipe (pipe2),
    end in the process                O_DIRECT mode) with the       refilled before the
                                      lowest fd that reads          process runs
      ... and held by another         refused, naming the pids: a new pipe would cut
      process too                     the other process off
    anonymous, one end only           external "pipe:[INODE]",      --inherit-fd
                                      nothing saved                 fd[N]:pipe:[INODE]
    a named FIFO (a path)             size and bytes, unless        the path reopened
                                      another process holds it     (ckpt holds it O_RDWR
                                                                    meanwhile: no open
                                                                    blocks), refilled

Decisions the kernel leaves open:
- "External" is decided by the ends, not by who else holds the pipe: one end alone is
  external even when nothing outside is seen holding the other (it may be in another
  pid namespace, or in flight in a unix socket). A process that forgot a pipe inherited
  from its launcher (this machine's tool harness leaves one on fd 251) dumps, and its
  restore stops, before building anything, naming the fd and ``--inherit-fd``: any fd of
  the restoring ckpt will do (``3>/dev/null``).
- The fd given for an external pipe gets the dumped end's O_NONBLOCK and O_DIRECT (its
  open file is shared with whoever gave it); its access mode must allow the end's use.
- Bytes buffered in an external pipe belong to the outside: the dump neither saves nor
  consumes them (tee, not read). Those the process wrote are read by the outside, those
  for the process stay in the old pipe for whoever hands it back.
- A FIFO other processes hold open is reopened by its path and its bytes are left in
  it (the other processes keep the pipe alive); a FIFO only the process holds is
  refilled. Its path must name the same FIFO (inode) at restore.
- The restored pipe is filled with one write (one per packet): a pipe whose buffers were
  partly consumed may take a few more bytes before its writer blocks than it would
  have.
- In packet mode (an end O_DIRECT) every buffer is saved as a packet, also one written
  before the mode was set.
- Other processes holding a pipe are found by Peek.holders (ckpt.collect.holders: one
  scan of /proc/*/fd per look, before the freeze and again frozen); a FIFO's holders by
  its inode.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import termios
from collections.abc import Iterable
from dataclasses import dataclass

from ckpt.collect.fdkinds.base import FdFlags, FdKind, Opened, Peek, RestoreCtx
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import Sharing
from ckpt.errors import NotDumpable, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import tee

#: status flags of an end that a restore sets again (F_SETFL)
END_FLAGS = os.O_NONBLOCK | os.O_DIRECT
PACKET_MAX = 4096  # a packet-mode write is split into buffers of at most a page
DELETED = " (deleted)"

Key = tuple[int, int]  # (st_dev, st_ino) of the pipe


@dataclass(frozen=True)
class PipeState:
    """What the dump knows about one fd's pipe before collecting it."""

    ino: int
    fifo: bool
    reads: bool  # some fd of the process reads this pipe
    writes: bool  # ... writes it
    carrier: bool  # this fd carries the pipe's size and bytes (lowest fd that reads)
    packet: bool  # an end is in packet mode (O_DIRECT)
    outside: tuple[int, ...] = ()  # pids outside the dump holding the pipe

    @property
    def external(self) -> bool:
        """Only one end in the process: restore takes the pipe from --inherit-fd."""
        return not self.fifo and not (self.reads and self.writes)

    @property
    def saved(self) -> bool:
        """Does the dump save the pipe's size and bytes with this fd?"""
        return self.carrier and not self.external and not (self.fifo and self.outside)


def is_pipe(info: FdInfo) -> bool:
    return info.target.startswith("pipe:[") or stat.S_ISFIFO(info.st_mode)


def key_of(info: FdInfo) -> Key:
    return info.st_dev, info.st_ino


def reads(flags: int) -> bool:
    return flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)


def writes(flags: int) -> bool:
    return flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def external_name(ino: int) -> str:
    return f"pipe:[{ino}]"


def state_of(info: FdInfo, fds: Iterable[FdInfo], outside: tuple[int, ...] = (),
             earlier: Iterable[FdInfo] = (), later: Iterable[FdInfo] = ()) -> PipeState:
    """The :class:`PipeState` of ``info`` among the process's ``fds``; in a tree dump,
    ``earlier`` and ``later`` are the fds of the members before and after it in
    pre-order: a pipe whose ends are held by several members is theirs, carried by the
    lowest fd that reads it in the first member holding one."""
    def ends(of: Iterable[FdInfo]) -> list[FdInfo]:
        return [i for i in of if is_pipe(i) and key_of(i) == key_of(info)]

    same, before, after = ends(fds), ends(earlier), ends(later)
    everywhere = same + before + after
    readers = [i.fd for i in same if reads(i.flags)]
    return PipeState(ino=info.st_ino, fifo=not info.target.startswith("pipe:["),
                     reads=any(reads(i.flags) for i in everywhere),
                     writes=any(writes(i.flags) for i in everywhere),
                     carrier=bool(readers) and info.fd == min(readers)
                     and not any(reads(i.flags) for i in before),
                     packet=any(i.flags & os.O_DIRECT for i in everywhere), outside=outside)


def claims(info: FdInfo, peek: Peek | None) -> bool:
    return is_pipe(info)


def inspect(info: FdInfo, peek: Peek) -> PipeState:
    fifo = not info.target.startswith("pipe:[")
    outside = peek.holders(info, Sharing.INODE if fifo else Sharing.OBJECT)
    tree = peek.tree.pids
    at = tree.index(peek.pid) if peek.pid in tree else 0
    earlier = [i for p in tree[:at] for i in peek.tree.fds.get(p, ())]
    later = [i for p in tree[at + 1:] for i in peek.tree.fds.get(p, ())]
    return state_of(info, peek.fds.values(), outside, earlier, later)


def refuse(info: FdInfo, state: PipeState, flags: FdFlags) -> str | None:
    pids = ", ".join(map(str, state.outside))
    if state.fifo and info.target.endswith(DELETED):
        return "a FIFO that was deleted (nothing to reopen): not supported yet"
    if state.fifo and not info.target.startswith("/"):
        return "a FIFO with no path a restore can open: not supported yet"
    if not state.fifo and state.reads and state.writes and state.outside:
        return (f"a pipe with both ends in the process, also held by process {pids} outside "
                "the dump (a restore would cut it off): not supported yet")
    if not flags.externals and (state.external or state.outside):
        other = "its other end is" if state.external else f"process {pids} holds it"
        return (f"{other} outside the process: this cannot be connected on another host "
                "(restore's --inherit-fd)")
    return None


def collect(info: FdInfo, state: PipeState, peek: Peek, out: pb.OpenFile) -> None:
    out.object = state.ino
    out.pipe.fifo = state.fifo
    if state.external:
        out.external = external_name(state.ino)
    if not state.saved:
        return
    with peek.getfd(info.fd) as fd:
        out.pipe.size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        chunks = buffered(fd, out.pipe.size, state.packet)
    if state.packet:
        out.pipe.packets.extend(chunks)
    else:
        out.pipe.data = b"".join(chunks)


def buffered(fd: int, size: int, packet: bool) -> list[bytes]:
    """What pipe ``fd`` (of ``size`` bytes) buffers, left in place: tee(2) into a pipe of
    ckpt's of the same size, read from there. In packet mode, one item per packet."""
    n = queued(fd)
    if not n:
        return []
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)  # as many buffers as the pipe has
        got = tee(fd, w, n)
        if got != n:
            raise NotDumpable(f"fd {fd}: tee took {got} of the {n} bytes buffered in the pipe")
        out = []
        while got:
            chunk = os.read(r, PACKET_MAX if packet else got)
            got -= len(chunk)
            out.append(chunk)
        return out
    finally:
        os.close(r)
        os.close(w)


def queued(fd: int) -> int:
    """Bytes buffered in pipe ``fd`` (FIONREAD)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


# --------------------------------------------------------------------------- restore


@dataclass
class _Pipe:
    """A pipe made at restore: ckpt's ends, and which ones an open file already took."""

    read: int
    write: int
    taken: set[int]


def restore(ctx: RestoreCtx, f: pb.OpenFile) -> Opened:
    if f.external:
        fd = ctx.inherit[f.external]  # there: ckpt.restore.files.check_inherit
        set_end_flags(fd, f.flags)
        return Opened(fd)
    key = (f"fifo:{f.path}" if f.pipe.fifo else "pipe", f.object)
    made = ctx.objects.get(key)
    if made is None:
        made = ctx.objects[key] = make(ctx, f)
    mode = f.flags & os.O_ACCMODE
    end = made.read if mode == os.O_RDONLY else made.write if mode == os.O_WRONLY else -1
    if f.pipe.fifo:  # every open file is its own open of the path
        fd = ctx.hold(os.open(f.path, mode | os.O_CLOEXEC | os.O_NONBLOCK))
    elif end < 0 or end in made.taken:  # another open file of the pipe (O_RDWR reopen)
        with ctx.as_owner():
            fd = ctx.hold(os.open(f"/proc/self/fd/{made.read}", mode | os.O_CLOEXEC))
    else:
        fd = end
    made.taken.add(fd)
    set_end_flags(fd, f.flags)
    return Opened(fd)


def make(ctx: RestoreCtx, f: pb.OpenFile) -> _Pipe:
    """The pipe of ``f`` and of every other open file of its object, filled."""
    ends = [g for g in ctx.all_files if g.type == pb.OpenFile.PIPE and g.object == f.object
            and g.pipe.fifo == f.pipe.fifo and g.path == f.path]
    state = next((g.pipe for g in ends if g.pipe.size), None)
    packet = any(g.flags & os.O_DIRECT for g in ends)
    if f.pipe.fifo:
        check_fifo(f)
        rw = ctx.hold(os.open(f.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK))
        made = _Pipe(rw, rw, {rw})
    else:
        with ctx.as_owner():
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK | (os.O_DIRECT if packet else 0))
        made = _Pipe(ctx.hold(r), ctx.hold(w), set())
    if state is not None:
        fill(made.write, state, f.path)
    return made


def check_fifo(f: pb.OpenFile) -> None:
    try:
        st = os.stat(f.path)
    except OSError:
        raise RestoreError(f"FIFO {f.path} (open at dump time) is missing") from None
    if not stat.S_ISFIFO(st.st_mode):
        raise RestoreError(f"FIFO {f.path} (open at dump time) is not a FIFO now")
    if f.inode and (st.st_dev, st.st_ino) != (f.dev, f.inode):
        raise RestoreError(f"FIFO {f.path} was replaced since the dump (inode {f.inode} is "
                           f"now {st.st_ino})")


def fill(w: int, state: pb.PipeFile, what: str) -> None:
    """Size the pipe and write its bytes back (through ``w``, non-blocking)."""
    try:
        if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) != state.size:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, state.size)
        if state.packets:  # one buffer per write (a FIFO's O_RDWR open is not in that mode)
            set_end_flags(w, os.O_NONBLOCK | os.O_DIRECT)
        for chunk in state.packets or ([state.data] if state.data else []):
            if os.write(w, chunk) != len(chunk):
                raise OSError(errno.EAGAIN, "the pipe is full")
    except OSError as exc:
        raise RestoreError(f"cannot refill the pipe {what} (size {state.size}): "
                           f"{os.strerror(exc.errno or 0)}") from None


def set_end_flags(fd: int, flags: int) -> None:
    """The end's O_NONBLOCK and O_DIRECT (packet mode) as dumped; its other status flags
    are kept."""
    now = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = (now & ~END_FLAGS) | (flags & END_FLAGS)
    if want != now:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)


KIND = FdKind("pipe", pb.OpenFile.PIPE, claims, collect, restore, inspect, refuse,
              holders=Sharing.OWN)
