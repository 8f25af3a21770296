"""How the restored process makes its unix sockets (for ckpt.collect.fdkinds.unix_build):
socketpair(2), listen(2) and connect(2) record their caller for SO_PEERCRED, so the
process itself makes them, through injected syscalls, and ckpt works on copies."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator

from ckpt.collect.fdkinds.base import Remote
from ckpt.kernel.creds import SYS
from ckpt.kernel.sys import NR, pidfd_getfd, pidfd_open

KEEP = 0xFFFFFFFF  # (uid_t)-1: setresuid leaves this id as it is
GROUPS_AT = 4096  # where setgroups' array goes in the stub's scratch area (after a sockaddr)


def show_name(name: bytes) -> str:
    """A socket name as ss(8) shows it: an abstract one with "@" for its NUL."""
    return "@" + name[1:].decode(errors="replace") if name.startswith(b"\0") \
        else os.fsdecode(name)


class Maker:
    """Sockets of the process are made by the process: socketpair(2), listen(2) and
    connect(2) record their caller for SO_PEERCRED (pid, effective uid and gid) and
    SO_PEERGROUPS. The restored process (``ctx.remote``, still root: its ids come last)
    makes them, with the dumped effective ids and groups for the call; ckpt takes a copy of each
    (pidfd_getfd) for the rest; the process's own fds are closed once the group is built,
    and the copies are what it takes back."""

    def __init__(self, remote: Remote, ids: tuple[int, int] = (0, 0),
                 groups: tuple[int, ...] | None = None) -> None:
        self.remote, self.ids = remote, ids
        # SO_PEERGROUPS: the dumped supplementary groups; the process has ckpt's until then
        self.own_groups = tuple(os.getgroups())
        self.groups = self.own_groups if groups is None else groups
        self.pidfd = -1
        self.theirs: dict[int, int] = {}  # fd of ckpt -> the process's fd

    def _take(self, theirs: int) -> socket.socket:
        if self.pidfd < 0:
            self.pidfd = pidfd_open(self.remote.pid)
        ours = pidfd_getfd(self.pidfd, theirs, self.remote.pid)
        self.theirs[ours] = theirs
        return socket.socket(fileno=ours)

    def new(self, kind: int) -> socket.socket:
        return self._take(self.remote.sc(NR.socket, socket.AF_UNIX, kind | socket.SOCK_CLOEXEC,
                                         0, what="socket(AF_UNIX)"))

    def socketpair(self, kind: int) -> tuple[socket.socket, socket.socket]:
        addr = self.remote.put(bytes(8))
        with self._as_process():
            self.remote.sc(NR.socketpair, socket.AF_UNIX, kind | socket.SOCK_CLOEXEC, 0, addr,
                           what="socketpair(AF_UNIX)")
        with open(f"/proc/{self.remote.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(addr)
            a, b = struct.unpack("ii", mem.read(8))
        return self._take(a), self._take(b)

    def listen(self, s: socket.socket, backlog: int) -> None:
        with self._as_process():
            self.remote.sc(NR.listen, self.theirs[s.fileno()], backlog, what="listen")

    def connect(self, s: socket.socket, name: bytes) -> None:
        addr = self.remote.put(struct.pack("H", socket.AF_UNIX) + name)
        with self._as_process():
            self.remote.sc(NR.connect, self.theirs[s.fileno()], addr, 2 + len(name),
                           what=f"connect to {show_name(name)}")

    @contextlib.contextmanager
    def _as_process(self) -> Iterator[None]:
        """The dumped effective uid and gid and groups for one call (real and saved ids
        stay root's, so the process takes root's back)."""
        euid, egid = self.ids
        regroup = self.groups != self.own_groups
        if regroup:
            self._setgroups(self.groups)
        if euid or egid:
            self.remote.sc(SYS.setresgid, KEEP, egid, KEEP, what="setresgid (socket's owner)")
            self.remote.sc(SYS.setresuid, KEEP, euid, KEEP, what="setresuid (socket's owner)")
        try:
            yield
        finally:
            if euid or egid:
                self.remote.sc(SYS.setresuid, KEEP, 0, KEEP, what="setresuid (back)")
                self.remote.sc(SYS.setresgid, KEEP, 0, KEEP, what="setresgid (back)")
            if regroup:
                self._setgroups(self.own_groups)

    def _setgroups(self, groups: tuple[int, ...]) -> None:
        addr = self.remote.put(struct.pack(f"{len(groups)}I", *groups), GROUPS_AT) \
            if groups else 0
        self.remote.sc(SYS.setgroups, len(groups), addr, what="setgroups (socket's owner)")

    def close(self) -> None:
        for theirs in self.theirs.values():
            self.remote.sc(NR.close, theirs, check=False)
        self.theirs.clear()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
