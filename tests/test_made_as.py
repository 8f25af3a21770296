"""Objects a restore makes in ckpt (pipes, sockets, eventfds, ...) carry the restored
process's ids and groups, not root's: their file's f_cred (what xt_owner's --gid-owner
and --suppl-groups match), their inode's owner, the real uid per-user limits charge
(ckpt.kernel.creds.made_as, RestoreCtx.as_owner). Needs root."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Asker, Harness, require_reachable_by_others

from ckpt.collect.fdkinds import (
    epoll,
    eventfd,
    inet,
    inotify,
    memfd,
    pipe,
    signalfd,
    timerfd,
)
from ckpt.collect.fdkinds.base import RestoreCtx
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import made_as, thread_groups

UID, GID, GROUPS = 65534, 65533, (100, 65533)  # as the kernel shows them: sorted


def ids(caps: bool = False) -> dict[str, list[int]]:
    """The calling thread's Uid, Gid (real, effective, saved, fs), Groups (and CapEff)."""
    with open("/proc/thread-self/status") as f:
        lines = dict(line.split(":", 1) for line in f.read().splitlines())
    out = {k: [int(x) for x in lines[k].split()] for k in ("Uid", "Gid", "Groups")}
    if caps:
        out["CapEff"] = [int(lines["CapEff"], 16)]
    return out


def test_made_as_switches_this_thread_only() -> None:
    """Real uid, fsuid, fsgid and groups change in the calling thread only (raw
    syscalls; glibc's would change all of ckpt's threads), effective ids stay root's,
    and every one comes back after."""
    before = ids(caps=True)
    seen: list[dict[str, list[int]]] = []
    go, done = threading.Event(), threading.Event()

    def other() -> None:
        go.wait(10)
        seen.append(ids(caps=True))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with made_as(UID, UID, GID, GROUPS):
        inside = ids()
        r, w = os.pipe()
        go.set()
        done.wait(10)
    thread.join()
    try:
        assert (os.fstat(r).st_uid, os.fstat(r).st_gid) == (UID, GID)
    finally:
        os.close(r)
        os.close(w)
    assert inside == {"Uid": [UID, 0, 0, UID], "Gid": [0, 0, 0, GID], "Groups": [*GROUPS]}
    assert seen == [before] and ids(caps=True) == before
    assert thread_groups() == tuple(before["Groups"])


def test_made_as_puts_back_after_an_error() -> None:
    before = ids(caps=True)
    with pytest.raises(RuntimeError), made_as(UID, UID, GID, GROUPS):
        raise RuntimeError("boom")
    assert ids(caps=True) == before


def ctx_for(f: pb.OpenFile) -> RestoreCtx:
    entry = pb.ProcessEntry(pid=4242, comm="x", cwd="/")
    c = entry.threads.add(tid=4242).creds
    c.uid = c.euid = c.suid = c.fsuid = UID
    c.gid = c.egid = c.sgid = c.fsgid = GID
    c.groups.extend(GROUPS)
    entry.files.append(f)
    return RestoreCtx(remote=None, entry=entry)  # type: ignore[arg-type]


def opened(type_: pb.OpenFile.Type, **payload: Any) -> pb.OpenFile:
    return pb.OpenFile(**{"id": 1, "type": type_, "flags": os.O_RDWR, "object": 7, **payload})


CASES: list[tuple[str, Any, str, pb.OpenFile]] = [
    ("pipe", pipe, "os.pipe2", opened(pb.OpenFile.PIPE, flags=os.O_RDONLY)),
    ("eventfd", eventfd, "os.eventfd", opened(pb.OpenFile.EVENTFD)),
    ("epoll", epoll, "ckpt.collect.fdkinds.epoll.syscall", opened(pb.OpenFile.EPOLL)),
    ("timerfd", timerfd, "ckpt.collect.fdkinds.timerfd.timerfd_create",
     opened(pb.OpenFile.TIMERFD, timerfd=pb.TimerFd(clockid=1))),
    ("signalfd", signalfd, "ckpt.collect.fdkinds.signalfd.signalfd4",
     opened(pb.OpenFile.SIGNALFD, signalfd=pb.SignalFd(mask=1 << 9))),
    ("inotify", inotify, "ckpt.collect.fdkinds.inotify.inotify_init1",
     opened(pb.OpenFile.INOTIFY)),
    ("memfd", memfd, "os.memfd_create",
     opened(pb.OpenFile.MEMFD, mode=0o100600, memfd=pb.MemFd(name="m", uid=UID, gid=GID))),
    ("inet", inet, "socket.socket",
     opened(pb.OpenFile.INET_SOCKET, inet_socket=pb.InetSocket(
         family=2, type=2, protocol=17, state=7, uid=UID))),
]


@pytest.mark.parametrize(("name", "module", "maker", "f"), CASES, ids=[c[0] for c in CASES])
def test_kinds_make_objects_as_the_process(monkeypatch: pytest.MonkeyPatch, name: str,
                                           module: Any, maker: str, f: pb.OpenFile) -> None:
    """Each kind's restore makes its object while ckpt's thread has the process's ids."""
    modname, _, attr = maker.rpartition(".")
    target = {"os": os, "socket": socket}.get(modname) or __import__(modname, fromlist=[attr])
    real: Callable[..., Any] = getattr(target, attr)
    during: list[dict[str, list[int]]] = []

    def spy(*args: Any, **kw: Any) -> Any:
        during.append(ids())
        return real(*args, **kw)

    monkeypatch.setattr(target, attr, spy)
    ctx = ctx_for(f)
    try:
        module.restore(ctx, f)
    finally:
        monkeypatch.undo()
        ctx.close()
    assert during, f"{maker} was not called"
    assert during[0] == {"Uid": [UID, 0, 0, UID], "Gid": [0, 0, 0, GID], "Groups": [*GROUPS]}


def test_restored_pipe_belongs_to_the_process(harness: Harness) -> None:
    """A process of uid 65534 (groups 65534, 100) with a pipe: its restored pipe's inode
    is owned by 65534:65534 (the fsuid and fsgid it was made with), as the original's
    was, not by root; the bytes in it survive."""
    require_reachable_by_others()
    # CAP_DAC_READ_SEARCH: it finds its control files in the test's private directory
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--groups", "65534,100",
              "--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]
    target = Asker(harness, "fd_pipe.py", "nonblock", prefix=nobody)
    before = target.ask()
    owners = pipe_owners(target.proc.pid)
    assert owners == {(65534, 65534)}, owners
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    pid = harness.restore_detached(images)
    assert pipe_owners(pid) == owners
    assert target.ask() == before


def pipe_owners(pid: int) -> set[tuple[int, int]]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        if os.readlink(path).startswith("pipe:"):
            st = os.stat(path)
            out.add((st.st_uid, st.st_gid))
    return out
