"""Unix sockets between members of a tree (ckpt dump -t ROOT): a socketpair whose ends are
in a parent and its child is theirs, not external; each socket's queue is saved once, by
the member holding it; restore makes the pair once and gives each member its end
(ckpt/collect/fdkinds/unix.py, unix_build.py)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import (
    ID_TAKEN,
    TARGETS,
    Harness,
    assert_ckpt_ok,
    is_alive,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
)

from ckpt.collect.fdkinds.unix import socket_inodes
from ckpt.collect.fdkinds.unix_build import component
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import TreeView
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.unix_diag import ESTABLISHED, LISTEN

# --------------------------------------------------------------------------- pure


def sock_fd(n: int, ino: int) -> FdInfo:
    return FdInfo(fd=n, target=f"socket:[{ino}]", pos=0, flags=2, mnt_id=8, ino=ino,
                  st_mode=0o140777, st_dev=8, st_ino=ino, st_rdev=0, st_size=0)


def test_the_other_members_sockets_are_the_trees() -> None:
    tree = TreeView((10, 11, 12), {10: [sock_fd(3, 100)], 11: [sock_fd(4, 101)],
                                   12: [sock_fd(5, 102), FdInfo(
                                       fd=6, target="pipe:[9]", pos=0, flags=0, mnt_id=8,
                                       ino=9, st_mode=0o10600, st_dev=8, st_ino=9,
                                       st_rdev=0, st_size=0)]})
    assert socket_inodes(tree, 11) == {100, 102}
    assert socket_inodes(TreeView((10,), {10: [sock_fd(3, 100)]}), 10) == set()


def unix(fid: int, ino: int, peer: int = 0, name: bytes = b"", state: int = ESTABLISHED,
         shared_pid: int = 0) -> pb.OpenFile:
    f = pb.OpenFile(id=fid, type=pb.OpenFile.UNIX_SOCKET, object=ino, shared_pid=shared_pid)
    if not shared_pid:
        f.unix_socket.type, f.unix_socket.inode = socket.SOCK_STREAM, ino
        f.unix_socket.peer, f.unix_socket.name, f.unix_socket.state = peer, name, state
    return f


def test_a_pair_across_members_is_one_group_and_shares_are_left_out() -> None:
    # member 1: its end (100) and a listener; member 2: the other end (101), the
    # listener again (the same description: shared_pid) and a connection accepted from it
    parent = [unix(1, 100, peer=101), unix(2, 200, name=b"/run/x", state=LISTEN),
              unix(3, 300, peer=201)]
    child = [unix(1, 101, peer=100), unix(2, 0, shared_pid=10),
             unix(3, 201, peer=300, name=b"/run/x")]
    files = parent + child
    assert [f.unix_socket.inode for f in component(files, parent[0])] == [100, 101]
    assert [f.unix_socket.inode for f in component(files, child[2])] == [200, 300, 201]


# --------------------------------------------------------------------------- live


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


HOWS = ["dump", "predump+incremental"]


def dump_tree(harness: Harness, proc: subprocess.Popen[bytes], child: int, how: str) -> Path:
    """Dump the tree of ``proc`` (``how``: at once, or a predump and then an incremental
    dump over it), which kills it; reap both members; the final images."""
    images = harness.images()
    extra: tuple[str, ...] = ()
    if how == "predump+incremental":
        assert_ckpt_ok(run_ckpt("predump", "-t", str(proc.pid), "-D", images / "pre"))
        extra = ("--incremental", "--prev-images-dir", "../pre")
    harness.dump_and_reap(proc, images / "final", *extra)
    harness.kill(child)  # reparented to us (a subreaper) when the parent died
    return images / "final"


def restore_tree(harness: Harness, images: Path, root: int, child: int) -> None:
    """Restore the dumped ``root`` and ``child`` (both killed and reaped by then). A pid
    or tid of theirs taken meanwhile is another process's (the machine forks through
    its 32768 pids quickly): skipped, saying so; by one of our targets, a failure."""
    pidfile = harness.new_pidfile()
    res = run_ckpt("restore", "-D", images, "--restore-detached", "--pidfile", pidfile)
    taken = ID_TAKEN.search(res.stderr)
    if res.returncode and taken is not None:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{taken[1]}/cmdline").read_bytes()
            assert str(TARGETS).encode() not in cmdline, res.describe()
        pytest.skip(f"PID reuse between dump and restore: {res.stderr.strip()}")
    assert_ckpt_ok(res)  # (the pidfile's root is killed at teardown, its child too)
    harness.track(child)
    assert int(pidfile.read_text()) == root and is_alive(root) and is_alive(child)


KINDS = ["stream", "seqpacket", "listener"]


def talking(harness: Harness, kind: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    out = harness.tmp / "tree_unix.out"
    args = [kind, str(harness.tmp / "sock")] if kind == "listener" else [kind]
    proc = harness.launch([*py_target("tree_unix.py"), *args], out)
    child = wait_for(lambda: next(iter(children_of(proc.pid)), None), 10, "the child")
    for side in ("parent", "child"):  # each has read some and left LAG queued
        wait_for_line(out, f"{side} got 20".__eq__, 10, f"{side} got 20")
    return proc, child, out


def socks(entry: pb.ProcessEntry) -> list[pb.OpenFile]:
    return [f for f in entry.files if f.type == pb.OpenFile.UNIX_SOCKET]


@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_a_socketpair_between_parent_and_child_is_dumped_as_theirs(
        harness: Harness, kind: str) -> None:
    proc, child, _ = talking(harness, kind)
    parent = proc.pid
    images = harness.images()
    harness.dump(parent, images, "--leave-running")
    d = ImageDir.open(images)
    assert list(d.read_inventory().pids) == [parent, child]
    mine, theirs = socks(d.read_core(parent)), socks(d.read_core(child))
    assert not any(f.external for f in mine + theirs)
    if kind == "listener":  # the listener, the child's share of it and the accepted end
        listener, a = mine
        shared, b = theirs
        assert listener.unix_socket.state == LISTEN and shared.shared_pid == parent
        assert b.unix_socket.name == listener.unix_socket.name
    else:
        (a,), (b,) = mine, theirs
    assert (a.unix_socket.peer, b.unix_socket.peer) == (b.unix_socket.inode,
                                                        a.unix_socket.inode)
    # bytes in flight both ways, each queue saved with its own socket, whole records
    for f, sender in ((a, "child"), (b, "parent")):
        data = b"".join(m.data for m in f.unix_socket.queue)
        assert data and len(data) % 32 == 0 and data.startswith(sender.encode())
        assert not any(m.from_self for m in f.unix_socket.queue)
    assert run_ckpt("show", images).returncode == 0


@needs_root
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_socketpair_between_parent_and_child_talks_on_after_restore(
        harness: Harness, kind: str, how: str) -> None:
    proc, child, out = talking(harness, kind)
    parent = proc.pid
    images = dump_tree(harness, proc, child, how)
    dumped = len(read_lines(out))
    restore_tree(harness, images, parent, child)
    last = {s: max(int(line.split()[-1]) for line in read_lines(out)[:dumped]
                   if line.startswith(f"{s} got")) for s in ("parent", "child")}
    for side in ("parent", "child"):  # both read on past what they had: 40 more records
        want = f"{side} got {last[side] + 40}"
        wait_for_line(out, want.__eq__, 15, want)
    assert not [line for line in read_lines(out) if line.startswith("ERROR")]
