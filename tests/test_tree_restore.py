"""Restoring process trees: the shape built over stubs from synthetic members (forks with
chosen pids, sessions, groups, helpers, zombies), then whole trees dumped and restored."""

from __future__ import annotations

import os
import random
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt.errors import RestoreError
from ckpt.restore.mm import free_gadget_address
from ckpt.restore.stub import Stub
from ckpt.restore.tree import TreeStubs, check_tree_ids_free, subreaper
from ckpt.tree import Member, Tree, plan_restore
from tests.conftest import needs_root

PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())


def stat_of(pid: int) -> tuple[str, int, int, int]:
    """(state, ppid, pgid, sid) of /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rfind(")") + 2:].split()
    return f[0], int(f[1]), int(f[2]), int(f[3])


def exit_signal_of(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2:].split()[35])


def free_run(n: int) -> list[int]:
    """n consecutive pids no task holds now."""
    taken = {int(d) for d in os.listdir("/proc") if d.isdigit()}
    for _ in range(1000):
        base = random.randrange(1000, PID_MAX - n - 1)
        run = list(range(base, base + n))
        if not taken & set(run):
            return run
    pytest.skip("no run of free pids")


@pytest.fixture
def built() -> Iterator[list[TreeStubs]]:
    """Trees of stubs a test builds; killed (and reaped) at the end."""
    made: list[TreeStubs] = []
    with subreaper():
        try:
            yield made
        finally:
            for t in made:
                t.kill()


def build(made: list[TreeStubs], members: list[Member], shell_job: bool = False) -> TreeStubs:
    tree = Tree(members)
    plan = plan_restore(tree, shell_job)
    check_tree_ids_free(tree, plan)
    root = Stub.spawn(tree.root.pid, max(m.pid for m in members))
    stubs = TreeStubs(root)
    made.append(stubs)
    root.install_gadget(free_gadget_address(root.pid, []))
    stubs.run(plan)
    return stubs


def wait_status(stubs: TreeStubs, parent: int, child: int) -> int:
    """The status the parent's own wait4(child, WNOHANG) sees (it reaps the child)."""
    stub = stubs.stubs[parent]
    got = stub.sc(61, child, stub.scratch + 512, 1 | 0x40000000, 0, what="wait4")
    assert got == child
    return int(struct.unpack("i", os.pread(stub.mem_fd(), 4, stub.scratch + 512))[0])


@needs_root
def test_tree_of_stubs_gets_pids_parents_sessions_groups_and_a_zombie(
        built: list[TreeStubs]) -> None:
    r, a, b, c, z = free_run(5)
    stubs = build(built, [
        Member(r, 0, r, r),
        Member(a, r, b, r),  # in b's group
        Member(b, r, b, r, exit_signal=0),
        Member(c, b, c, c),  # a session of its own
        Member(z, r, r, r, zombie=True, exit_status=7 << 8, comm="zed"),
    ])
    assert stat_of(r)[2:] == (r, r)
    assert stat_of(a)[1:] == (r, b, r)
    assert stat_of(b)[1:] == (r, b, r)
    assert exit_signal_of(b) == 0
    assert stat_of(c)[1:] == (b, c, c)
    assert stat_of(z) == ("Z", r, r, r)
    assert Path(f"/proc/{z}/comm").read_text() == "zed\n"
    status = wait_status(stubs, r, z)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    stubs.exited.remove(z)


@needs_root
def test_zombie_killed_by_a_signal_keeps_its_status(built: list[TreeStubs]) -> None:
    r, z = free_run(2)
    stubs = build(built, [Member(r, 0, r, r),
                          Member(z, r, r, r, zombie=True, exit_status=signal.SIGTERM)])
    assert stat_of(z)[0] == "Z"
    status = wait_status(stubs, r, z)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not status & 0x80  # no core dump
    stubs.exited.remove(z)


@needs_root
def test_helpers_rebuild_a_gone_session_leader_and_a_gone_group_leader(
        built: list[TreeStubs]) -> None:
    r, s, m, g, n = free_run(5)
    build(built, [
        Member(r, 0, r, r, subreaper=True),
        Member(m, r, s, s),  # its session's leader s is gone; reparented to r
        Member(n, r, g, r),  # its group's leader g is gone
    ])
    assert stat_of(m)[1:] == (r, s, s)
    assert stat_of(n)[1:] == (r, g, r)
    assert not Path(f"/proc/{s}").exists() and not Path(f"/proc/{g}").exists()


@needs_root
def test_child_forked_before_its_parents_setsid_keeps_the_older_session(
        built: list[TreeStubs]) -> None:
    r, a, b = free_run(3)
    build(built, [Member(r, 0, r, r), Member(a, r, a, a), Member(b, a, r, r)])
    assert stat_of(a)[1:] == (r, a, a)
    assert stat_of(b)[1:] == (a, r, r)


@needs_root
def test_a_taken_member_pid_is_refused_naming_its_holder(built: list[TreeStubs]) -> None:
    r, a = free_run(2)
    tree = Tree([Member(r, 0, r, r), Member(os.getpid(), r, r, r), Member(a, r, r, r)])
    with pytest.raises(RestoreError, match=rf"pid {os.getpid()} is taken by process "
                                           rf"{os.getpid()} \(python"):
        check_tree_ids_free(tree, plan_restore(tree, False))


@needs_root
def test_fork_child_into_a_taken_pid_names_the_holder_and_kills_every_stub(
        built: list[TreeStubs]) -> None:
    r, a = free_run(2)
    me = os.getpid()
    tree = Tree([Member(r, 0, r, r), Member(a, r, r, r), Member(me, a, r, r)])
    root = Stub.spawn(r, a)
    stubs = TreeStubs(root)
    built.append(stubs)
    root.install_gadget(free_gadget_address(root.pid, []))
    with pytest.raises(RestoreError, match=rf"pid {me} is taken by process {me}"):
        stubs.run(plan_restore(tree, False))
    built.remove(stubs)
    stubs.kill()
    assert not Path(f"/proc/{r}").exists() and not Path(f"/proc/{a}").exists()
