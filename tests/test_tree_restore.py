"""Restoring process trees: the shape built over stubs from synthetic members (forks with
chosen pids, sessions, groups, helpers, zombies), then whole trees dumped and restored."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, Harness, assert_one_error_line, needs_root, run_ckpt, wait_for

from ckpt.errors import KernelError, RestoreError
from ckpt.images import ImageDir
from ckpt.kernel.prctl import PR_GET_CHILD_SUBREAPER
from ckpt.kernel.sys import NR, WALL, prctl
from ckpt.restore.mm import free_gadget_address
from ckpt.restore.stub import NS_LAST_PID, Stub
from ckpt.restore.tree import TreeStubs, check_tree_ids_free, subreaper
from ckpt.tree import Fork, Member, Tree, plan_restore

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
    got = stub.sc(NR.wait4, child, stub.scratch + 512, os.WNOHANG | WALL, 0, what="wait4")
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
    stubs.exited.pop(z).close()


@needs_root
def test_zombie_killed_by_a_signal_keeps_its_status(built: list[TreeStubs]) -> None:
    r, z = free_run(2)
    stubs = build(built, [Member(r, 0, r, r),
                          Member(z, r, r, r, zombie=True, exit_status=signal.SIGTERM)])
    assert stat_of(z)[0] == "Z"
    status = wait_status(stubs, r, z)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not status & 0x80  # no core dump
    stubs.exited.pop(z).close()


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
def test_a_zombie_session_leader_leaves_its_member_to_the_subreaper(
        built: list[TreeStubs]) -> None:
    r, s, m = free_run(3)
    build(built, [Member(r, 0, r, r, subreaper=True),
                  Member(s, r, s, s, zombie=True, exit_status=1 << 8, comm="sh"),
                  Member(m, r, s, s)])
    assert stat_of(s) == ("Z", r, s, s)
    assert stat_of(m)[1:] == (r, s, s)
    assert wait_status_of(s) == 1 << 8


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
    stubs = build(built, [Member(r, 0, r, r), Member(a, r, r, r)])
    with pytest.raises(RestoreError, match=rf"pid {me} is taken by process {me}"):
        stubs.step(Fork(a, me, signal.SIGCHLD))
    built.remove(stubs)
    stubs.kill()
    assert not Path(f"/proc/{r}").exists() and not Path(f"/proc/{a}").exists()


# --------------------------------------------------------------------------- end to end
# counting into a file of the folder argv[1], one number a line, forever
COUNT = r'''
import ctypes, os, signal, sys, time
out = sys.argv[1]

def count(name):
    n = 0
    with open(os.path.join(out, name), "w", buffering=1) as f:
        while True:
            f.write(f"{n}\n")
            n += 1
            time.sleep(0.01)
'''

TREE_TARGET = COUNT + r'''
z = os.fork()
if z == 0:
    ctypes.CDLL(None).prctl(15, b"zed", 0, 0, 0)  # PR_SET_NAME
    os._exit(7)
a = os.fork()
if a == 0:
    if len(sys.argv) > 2:
        os.chdir(sys.argv[2])
    import threading
    threading.Thread(target=count, args=("at",), daemon=True).start()
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


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def launch_tree(harness: Harness, *cwd: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """TREE_TARGET, counting into files of a folder (returned); child a in ``cwd``."""
    out = harness.images("out")
    script = harness.tmp / "tree.py"
    script.write_text(TREE_TARGET)
    return harness.launch([PYTHON, script, out, *cwd], harness.tmp / "log"), out


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


def reap_members(pids: list[int], harness: Harness | None = None) -> None:
    """Dumped (killed) members reparented to us, the harness being a subreaper; no longer
    tracked by ``harness``: another process may take their pids now (a race the harness
    skips on, unless the holder is one it tracks). A restore's are tracked again."""
    if harness is not None:
        harness._pids.difference_update(pids)
    for pid in pids:
        wait_for(lambda p=pid: _reaped(p), 10, f"member {pid} gone")  # type: ignore[misc]


@contextlib.contextmanager
def restored_members(harness: Harness, root: int, pids: list[int]) -> Iterator[None]:
    """Track the members a restore (in the block) brought back under ``root``, even if it
    failed half-way; never a process that merely took one of their pids."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                if stat_of(pid)[1] == root:
                    harness.track(pid)


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
    for name in ("a", "at", "b", "p"):
        wait_for(lambda n=name: len(counted(out / n)) > 5 or None, 10,  # type: ignore[misc]
                 f"{name} counting")
    wait_for(lambda: (stat_of(b)[2] == b and stat_of(z)[0] == "Z") or None, 10, "b's group")
    before = {pid: stat_of(pid) for pid in (r, z, a, b)}
    a_threads = thread_count(a)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    reap_members([z, a, b], harness)
    seen = {n: len(counted(out / n)) for n in ("a", "at", "b", "p")}
    with restored_members(harness, r, [a, b]):
        pid = harness.restore_detached(images)
    assert pid == r
    after = {p: stat_of(p) for p in (r, z, a, b)}
    assert {p: s[1:] for p, s in after.items() if p != r} == {
        p: s[1:] for p, s in before.items() if p != r}
    assert after[r][2:] == before[r][2:]
    assert after[z][0] == "Z" and after[b][2] == b
    assert wait_status_of(z) == 7 << 8  # what its parent will reap
    assert thread_count(a) == a_threads == 2
    for name in ("a", "at", "b", "p"):
        wait_for(lambda n=name: len(counted(out / n)) > seen[n] + 5 or None, 10,  # type: ignore[misc]
                 f"{name} counting on after the restore")
    assert Path(f"/proc/{z}/comm").read_text() == "zed\n"


@needs_root
def test_new_pid_on_a_tree_is_refused_in_one_line(harness: Harness) -> None:
    proc, out = launch_tree(harness)
    for p in member_pids(out)[1:]:
        harness.track(p)
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    res = run_ckpt("restore", "-D", images, "--new-pid", "-d")
    assert "a tree is restored with its own pids" in assert_one_error_line(res)


ORPHANS_TARGET = COUNT + r'''
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back here

def orphan(name, own):  # a child that leaves a counting grandchild behind and exits
    r, w = os.pipe()
    c = os.fork()
    if c == 0:
        os.close(r)
        own()
        if os.fork() == 0:
            os.close(w)
            count(name)
        os._exit(0)  # closes w
    os.close(w)
    os.read(r, 1)  # EOF: the grandchild exists and its parent is gone
    os.close(r)
    os.waitpid(c, 0)
    return c

s = orphan("m", os.setsid)  # m's session leader s is gone
g = orphan("n", lambda: os.setpgid(0, 0))  # n's group leader g is gone
z = os.fork()
if z == 0:
    signal.pause()
os.kill(z, signal.SIGTERM)
while open(f"/proc/{z}/stat").read().split(") ")[1][0] != "Z":
    time.sleep(0.01)
with open(os.path.join(out, "pids.tmp"), "w") as f:
    f.write(f"{s} {g} {z}\n")
os.rename(os.path.join(out, "pids.tmp"), os.path.join(out, "pids"))
count("p")
'''


def children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return sorted(int(x) for x in text.split())


@needs_root
def test_orphans_of_a_gone_session_and_group_leader_come_back_with_helpers(
        harness: Harness) -> None:
    out = harness.images("out")
    script = harness.tmp / "orphans.py"
    script.write_text(ORPHANS_TARGET)
    proc = harness.launch([PYTHON, script, out], harness.tmp / "log")
    r = proc.pid
    s, g, z = member_pids(out)
    kids = wait_for(lambda: (len(children_of(r)) == 3 and children_of(r)) or None, 10, "kids")
    m, n = (k for k in kids if k != z)
    for pid in (m, n):
        harness.track(pid)
    for name in ("m", "n", "p"):
        wait_for(lambda x=name: len(counted(out / x)) > 5 or None, 10,  # type: ignore[misc]
                 f"{name} counting")
    before = {pid: stat_of(pid) for pid in (r, m, n, z)}
    assert before[m][1:] == (r, s, s) and before[n][1:] == (r, g, r)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    reap_members([z, m, n], harness)
    seen = {x: len(counted(out / x)) for x in ("m", "n", "p")}
    with restored_members(harness, r, [m, n]):
        assert harness.restore_detached(images) == r
    assert {pid: stat_of(pid)[1:] for pid in (r, m, n, z)} == {
        pid: ids[1:] for pid, ids in before.items()}
    assert stat_of(z)[0] == "Z"
    assert wait_status_of(z) == signal.SIGTERM
    assert not Path(f"/proc/{s}").exists() and not Path(f"/proc/{g}").exists()
    for x in ("m", "n", "p"):
        wait_for(lambda y=x: len(counted(out / y)) > seen[y] + 5 or None, 10,  # type: ignore[misc]
                 f"{x} counting on after the restore")


@needs_root
def test_restore_over_the_running_tree_names_a_holder_and_leaves_nothing(
        harness: Harness) -> None:
    proc, out = launch_tree(harness)
    z, a, b = member_pids(out)
    for p in (a, b):
        harness.track(p)
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    res = run_ckpt("restore", "-D", images, "-d")
    line = assert_one_error_line(res)
    assert f"pid {proc.pid} is taken by process {proc.pid}" in line
    assert children_of(proc.pid) == sorted([z, a, b])


@needs_root
def test_a_member_failing_after_the_forks_kills_the_whole_tree(harness: Harness) -> None:
    cwd = harness.images("cwd")
    proc, out = launch_tree(harness, cwd)
    z, a, b = member_pids(out)
    for p in (a, b):
        harness.track(p)
    wait_for(lambda: len(counted(out / "a")) > 2 or None, 10, "a counting")
    images = harness.images()
    harness.dump_and_reap(proc, images)
    reap_members([z, a, b], harness)
    cwd.rmdir()  # a's working directory: its chdir fails once every stub is forked
    res = run_ckpt("restore", "-D", images, "-d")
    harness.skip_if_ids_reused(res)
    assert "chdir" in assert_one_error_line(res)
    assert not [p for p in (proc.pid, z, a, b) if Path(f"/proc/{p}").exists()]


@needs_root
def test_shell_job_tree_stays_in_the_restoring_session_and_group(harness: Harness) -> None:
    """--shell-job: the root (a job leader of our session) stays in the restoring ckpt's
    session and group, the members of its group with it; b leads its own group again."""
    out = harness.images("out")
    script = harness.tmp / "tree.py"
    script.write_text(TREE_TARGET)
    with open(harness.tmp / "log", "wb") as log:
        proc = subprocess.Popen([PYTHON, script, out], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, process_group=0)
    harness._children.append(proc)
    r = proc.pid
    z, a, b = member_pids(out)
    for p in (a, b):
        harness.track(p)
    wait_for(lambda: stat_of(b)[2] == b or None, 10, "b's group")
    assert stat_of(r)[2:] == (r, os.getsid(0)) and stat_of(a)[2] == r
    images = harness.images()
    harness.dump_and_reap(proc, images, "--shell-job")
    reap_members([z, a, b], harness)
    with restored_members(harness, r, [a, b]):
        assert harness.restore_detached(images) == r
    mine = (os.getpgid(0), os.getsid(0))  # run_ckpt's ckpt is in our group
    assert stat_of(r)[2:] == mine
    assert stat_of(a)[1:] == (r, *mine) and stat_of(z) == ("Z", r, *mine)
    assert stat_of(b)[1:] == (r, b, mine[1])


@needs_root
def test_a_tree_shape_restore_cannot_build_is_refused_in_one_line(harness: Harness) -> None:
    proc, out = launch_tree(harness)
    z, a, b = member_pids(out)
    for p in (a, b):
        harness.track(p)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    reap_members([z, a, b], harness)
    imgs = ImageDir.open(images)
    core = imgs.read_core(a)
    core.sid = core.pgid = 1  # a session no member leads or was born in
    imgs.write_core(a, core)
    res = run_ckpt("restore", "-D", images, "-d")
    assert f"process {a} is in session 1, which no process of the tree leads" in (
        assert_one_error_line(res))
    assert not [p for p in (proc.pid, z, a, b) if Path(f"/proc/{p}").exists()]


def test_subreaper_is_set_meanwhile_and_a_failed_prctl_raises() -> None:
    was = ctypes.c_int(-1)
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(was))
    with subreaper():
        now = ctypes.c_int(-1)
        prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(now))
        assert now.value == 1
    after = ctypes.c_int(-1)
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(after))
    assert after.value == was.value
    with pytest.raises(KernelError, match="prctl"):
        prctl(1 << 20)  # no such option: EINVAL


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and stat_of(pid)[0] != "Z"


@needs_root
def test_a_stub_gone_and_reaped_never_kills_the_process_that_took_its_pid() -> None:
    """Stub.kill signals through the pidfd of its fork: a released process that exited
    and was reaped may have its pid taken by another, which must live on."""
    pid = free_run(1)[0]
    try:
        gone = Stub.spawn(pid)
    except RestoreError as exc:
        pytest.skip(f"PID race with another process: {exc}")
    os.kill(pid, signal.SIGKILL)  # as if released, exited and reaped
    os.waitpid(pid, 0)
    try:
        other = Stub.spawn(pid)
    except RestoreError as exc:
        gone.close()
        pytest.skip(f"PID race with another process: {exc}")
    try:
        gone.kill()
        assert alive(pid)
    finally:
        other.kill()
    assert not Path(f"/proc/{pid}").exists()


@needs_root
def test_a_reaped_zombie_is_not_killed_by_pid_when_the_tree_fails(
        built: list[TreeStubs]) -> None:
    r, z = free_run(2)
    stubs = build(built, [Member(r, 0, r, r),
                          Member(z, r, r, r, zombie=True, exit_status=3 << 8)])
    wait_status(stubs, r, z)  # its parent reaped it: pid z is free again
    try:
        other = Stub.spawn(z)
    except RestoreError as exc:
        pytest.skip(f"PID race with another process: {exc}")
    try:
        stubs.kill()
        assert alive(z) and not Path(f"/proc/{r}").exists()
    finally:
        other.kill()


@needs_root
def test_a_stub_does_not_keep_ns_last_pid_locked(built: list[TreeStubs]) -> None:
    """fork_stub flocks ns_last_pid while it forks: a stub (and the tree forked from it)
    that kept its copy would make every other restore wait as long as it lives."""
    r, a = free_run(2)
    build(built, [Member(r, 0, r, r), Member(a, r, r, r)])
    for pid in (r, a):
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert NS_LAST_PID not in fds
