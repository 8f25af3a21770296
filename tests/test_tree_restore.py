"""Restoring process trees: the shape built over stubs from synthetic members (forks with
chosen pids, sessions, groups, helpers, zombies), then whole trees dumped and restored."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, Harness, assert_one_error_line, needs_root, run_ckpt, wait_for

from ckpt.errors import RestoreError
from ckpt.restore.mm import free_gadget_address
from ckpt.restore.stub import Stub
from ckpt.restore.tree import TreeStubs, check_tree_ids_free, subreaper
from ckpt.tree import Member, Tree, plan_restore

PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())


def stat_of(pid: int) -> tuple[str, int, int, int]:
    """(state, ppid, pgid, sid) of /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rfind(")") + 2:].split()
    return f[0], int(f[1]), int(f[2]), int(f[3])


def stat_field(pid: int, n: int) -> int:
    """Field n (1-based, as proc(5) numbers them) of /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2:].split()[n - 3])


def exit_signal_of(pid: int) -> int:
    return stat_field(pid, 38)


def wait_status_of(pid: int) -> int:
    return stat_field(pid, 52)


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
    try:
        check_tree_ids_free(tree, plan)
        root = Stub.spawn(tree.root.pid, max(m.pid for m in members))
        stubs = TreeStubs(root)
        made.append(stubs)
        root.install_gadget(free_gadget_address(root.pid, []))
        stubs.run(plan)
    except RestoreError as exc:  # pid_max is small here and others fork all the time
        if "taken" in str(exc) or "could not obtain pid" in str(exc):
            pytest.skip(f"PID race with another process: {exc}")
        raise
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


# --------------------------------------------------------------------------- end to end
TREE_TARGET = r'''
import os, sys, time
out = sys.argv[1]

def count(name):
    n = 0
    with open(os.path.join(out, name), "w", buffering=1) as f:
        while True:
            f.write(f"{n}\n")
            n += 1
            time.sleep(0.01)

z = os.fork()
if z == 0:
    os._exit(7)
a = os.fork()
if a == 0:
    count("a")
b = os.fork()
if b == 0:
    os.setpgid(0, 0)
    count("b")
with open(os.path.join(out, "pids.tmp"), "w") as f:
    f.write(f"{z} {a} {b}\n")
os.rename(os.path.join(out, "pids.tmp"), os.path.join(out, "pids"))
count("p")
'''


def launch_tree(harness: Harness) -> tuple[subprocess.Popen[bytes], Path]:
    """TREE_TARGET, counting into files of a folder (returned)."""
    out = harness.images("out")
    script = harness.tmp / "tree.py"
    script.write_text(TREE_TARGET)
    return harness.launch([PYTHON, script, out], harness.tmp / "log"), out


def member_pids(out: Path) -> list[int]:
    """The zombie's, a's and b's pids, as the target wrote them."""
    text = wait_for(lambda: ((out / "pids").exists() and (out / "pids").read_text()) or None, 10,
                    "the tree's pids")
    return [int(x) for x in text.split()]


def counted(path: Path) -> list[int]:
    """The numbers a counter wrote, checked to run 0, 1, 2, ... without a gap."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    nums = [int(x) for x in lines[:-1]]  # the last line may be half written
    assert nums == list(range(len(nums))), f"{path.name}: not 0..n: {nums[-5:]}"
    return nums


def reap_members(pids: list[int]) -> None:
    """Dumped (killed) members reparented to us, the harness being a subreaper."""
    for pid in pids:
        wait_for(lambda p=pid: _reaped(p), 10, f"member {pid} gone")  # type: ignore[misc]


def _reaped(pid: int) -> bool | None:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists() or None
    return True if done == pid else None


@needs_root
def test_tree_with_a_group_of_its_own_and_a_zombie_restores_whole(harness: Harness) -> None:
    proc, out = launch_tree(harness)
    r = proc.pid
    z, a, b = member_pids(out)
    for pid in (a, b):
        harness.track(pid)
    for name in ("a", "b", "p"):
        wait_for(lambda n=name: len(counted(out / n)) > 5 or None, 10,  # type: ignore[misc]
                 f"{name} counting")
    wait_for(lambda: (stat_of(b)[2] == b and stat_of(z)[0] == "Z") or None, 10, "b's group")
    before = {pid: stat_of(pid) for pid in (r, z, a, b)}
    images = harness.images()
    harness.dump_and_reap(proc, images)
    reap_members([z, a, b])
    seen = {n: len(counted(out / n)) for n in ("a", "b", "p")}
    pid = harness.restore_detached(images)
    assert pid == r
    after = {p: stat_of(p) for p in (r, z, a, b)}
    assert {p: s[1:] for p, s in after.items() if p != r} == {
        p: s[1:] for p, s in before.items() if p != r}
    assert after[r][2:] == before[r][2:]
    assert after[z][0] == "Z" and after[b][2] == b
    assert wait_status_of(z) == 7 << 8  # what its parent will reap
    for name in ("a", "b", "p"):
        wait_for(lambda n=name: len(counted(out / n)) > seen[n] + 5 or None, 10,  # type: ignore[misc]
                 f"{name} counting on after the restore")
    assert Path(f"/proc/{z}/comm").read_text() == Path(f"/proc/{r}/comm").read_text()


@needs_root
def test_new_pid_on_a_tree_is_refused_in_one_line(harness: Harness) -> None:
    proc, out = launch_tree(harness)
    for p in member_pids(out)[1:]:
        harness.track(p)
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    res = run_ckpt("restore", "-D", images, "--new-pid", "-d")
    assert "a tree is restored with its own pids" in assert_one_error_line(res)
