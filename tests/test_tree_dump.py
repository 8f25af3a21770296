"""Pure decisions of a tree dump (ckpt dump -t ROOT: ROOT and its descendants): which
member carries a pipe between members, which open files a member shares with one dumped
before it, the pre-order, the pass's figures. No root needed."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    dump_tree,
    needs_root,
    run_ckpt,
    track_tree,
    wait_for_lines,
)

from ckpt.actions.dump import merge_stats
from ckpt.collect.fdkinds.pipe import state_of
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import TreeView, shared_before
from ckpt.images import ImageDir
from ckpt.images.pb import image_pb2


def fd(n: int, target: str, flags: int = os.O_RDONLY, ino: int = 7, pos: int = 0) -> FdInfo:
    mode = stat.S_IFIFO | 0o600 if target.startswith("pipe:") else stat.S_IFREG | 0o644
    return FdInfo(fd=n, target=target, pos=pos, flags=flags, mnt_id=15, ino=ino,
                  st_mode=mode, st_dev=14, st_ino=ino, st_rdev=0, st_size=0)


def test_a_pipe_between_two_members_is_theirs_and_carried_by_the_first_reader() -> None:
    w = fd(4, "pipe:[7]", os.O_WRONLY)  # the producer's end, member 1
    r = fd(3, "pipe:[7]", os.O_RDONLY)  # the consumer's, member 2
    writer = state_of(w, [w], later=[r])
    reader = state_of(r, [r], earlier=[w])
    assert not writer.external and not reader.external
    assert reader.carrier and reader.saved and not writer.carrier
    # alone, each end leads outside: --inherit-fd
    assert state_of(r, [r]).external and state_of(w, [w]).external


def test_a_reader_in_an_earlier_member_carries_the_pipe() -> None:
    r1, r2 = fd(5, "pipe:[7]"), fd(3, "pipe:[7]")
    w = fd(4, "pipe:[7]", os.O_WRONLY)
    assert state_of(r1, [r1, w], later=[r2]).carrier
    assert not state_of(r2, [r2], earlier=[r1, w]).carrier
    other = fd(6, "pipe:[9]", ino=9)
    assert state_of(r2, [r2, w], earlier=[other]).carrier  # another pipe's reader


def test_an_open_file_is_shared_with_the_first_earlier_member_kcmp_confirms() -> None:
    mine = fd(3, "/tmp/log", os.O_WRONLY, pos=40)
    tree = TreeView((10, 11, 12), {
        10: [fd(5, "/tmp/log", os.O_WRONLY, pos=40), fd(3, "/tmp/log", os.O_WRONLY, pos=0)],
        11: [fd(7, "/tmp/log", os.O_WRONLY, pos=40)],
        12: [mine]})
    same = {(12, 3, 11, 7)}  # kcmp: only member 11's fd 7 is the same description
    assert shared_before(12, mine, tree, lambda *k: k in same) == (11, 7)
    assert shared_before(12, mine, tree, lambda *k: False) is None
    assert shared_before(10, tree.fds[10][0], tree, lambda *k: True) is None  # the first
    assert shared_before(12, mine, None) is None


def test_merged_figures_add_up_and_keep_one_frozen_time() -> None:
    a = image_pb2.DumpStats(pages_written=3, bytes_written=10, frozen_ms=5.0, total_ms=9.0)
    b = image_pb2.DumpStats(pages_written=4, bytes_written=1, frozen_ms=5.0, total_ms=9.0)
    b.whole_vmas.add(start=0, end=4096, reason="x")
    m = merge_stats([a, b])
    assert (m.pages_written, m.bytes_written, m.frozen_ms, len(m.whole_vmas)) == (7, 11, 5.0, 1)
    assert merge_stats([a]) is a


def test_members_sharing_kernel_objects_are_refused_naming_both() -> None:
    from ckpt.collect.treecheck import read_sharing, sharing_refusal
    from ckpt.kernel.sys import KCMP_FILES, KCMP_VM

    shared = {(12, 10, KCMP_FILES)}
    found = read_sharing([10, 11, 12], lambda a, b, w: (a, b, w) in shared)
    assert found == [(12, 10, KCMP_FILES)]
    msg = sharing_refusal(found)
    assert msg is not None and "process 12" in msg and "process 10" in msg
    assert "CLONE_FILES" in msg
    assert sharing_refusal([]) is None
    assert "vfork" in (sharing_refusal([(3, 2, KCMP_VM)]) or "")


COW_TARGET = """
import os, sys, time
data = bytearray(os.urandom(16 << 20))  # 16 MiB, written before the fork: shared after it
if os.fork() == 0:
    while True:
        time.sleep(1)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@needs_root
def test_a_leave_running_tree_dump_counts_copy_on_write_and_both_run_on(
        harness: Harness, tmp_path: Path) -> None:
    """Pages a child still shares copy-on-write with its parent are counted (before the
    copy unshares them) and shown; both processes run on untraced."""
    out = tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", COW_TARGET], out)
    wait_for_lines(out, 1)
    child = int((Path(f"/proc/{proc.pid}/task/{proc.pid}/children")).read_text().split()[0])
    images = harness.images()
    assert_ckpt_ok(run_ckpt("dump", "-t", str(proc.pid), "-D", images, "--leave-running"))
    res = run_ckpt("show", "--json", images)
    assert_ckpt_ok(res)
    shown = json.loads(res.stdout)
    assert [row["pid"] for row in shown["tree"]] == [proc.pid, child]
    assert shown["shared"]["cow_shared_bytes"] >= 16 << 20, shown["shared"]
    for pid in (proc.pid, child):
        assert_running_untraced(pid)


def test_close_on_exec_is_the_fds_not_the_descriptions() -> None:
    """A child's dup2 of an inherited O_CLOEXEC fd clears the flag on its copy: still
    the parent's open file description."""
    mine = fd(9, "/tmp/log", os.O_WRONLY, pos=40)
    tree = TreeView((10, 11), {10: [fd(3, "/tmp/log", os.O_WRONLY | os.O_CLOEXEC, pos=40)],
                               11: [mine]})
    assert shared_before(11, mine, tree, lambda *k: True) == (10, 3)


def test_a_shape_restore_cannot_build_or_a_core_dumped_zombie_is_refused() -> None:
    from ckpt.collect.shape import shape_refusal
    from ckpt.tree import Member

    root = Member(pid=10, ppid=1, pgid=10, sid=10)
    # the child stayed in the session its parent left (setsid after the fork): no process
    # of the tree leads it, and its parent is no subreaper
    left = [Member(pid=10, ppid=5, pgid=10, sid=10), Member(pid=11, ppid=10, pgid=5, sid=5)]
    assert shape_refusal([root], False) is None
    assert shape_refusal([root, Member(pid=11, ppid=10, pgid=10, sid=10)], False) is None
    why = shape_refusal(left, False)
    assert why is not None and "11" in why, why
    cored = Member(pid=12, ppid=10, pgid=10, sid=10, zombie=True, exit_status=0x86)
    assert "dumped core" in (shape_refusal([root, cored], False) or "")


SETSID_TREE = """
import os, sys, time
if os.fork() == 0:  # R: not a group leader, so it may setsid after forking C
    out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    if os.fork() == 0:  # C stays in the session R leaves
        while True:
            time.sleep(1)
    time.sleep(0.2)
    os.setsid()
    print("R", os.getpid(), flush=True)
    while True:
        time.sleep(1)
while True:
    time.sleep(1)
"""


@needs_root
def test_a_tree_whose_shape_restore_cannot_build_is_refused_before_the_freeze(
        harness: Harness, tmp_path: Path) -> None:
    """R forked C, then left its session: no process of the tree leads C's session and
    R is no subreaper (known once frozen), so a restore could not put C back in it: the
    dump refuses before anything is written, naming C, and the tree runs on."""
    out, r_out = tmp_path / "out.txt", tmp_path / "r.txt"
    harness.launch([sys.executable, "-c", SETSID_TREE, r_out], out)
    r = int(wait_for_lines(r_out, 1)[0].split()[1])
    child = int(Path(f"/proc/{r}/task/{r}/children").read_text().split()[0])
    harness.track(r)
    harness.track(child)
    images = harness.images()
    msg = assert_one_error_line(run_ckpt("dump", "-t", str(r), "-D", images))
    assert f"process {child}" in msg and "session" in msg, msg
    assert not (images / "inventory.img").exists()
    for pid in (r, child):
        assert_running_untraced(pid)


LOCK_TREE = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
if os.fork() == 0:  # the child locks bytes 0-9 of the file it inherited (POSIX: its own)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    print("locked", os.getpid(), flush=True)
    while True:
        time.sleep(1)
while True:
    time.sleep(1)
"""


def posix_lockers(path: Path) -> set[int]:
    ino = os.stat(path).st_ino
    return {int(line.split()[4]) for line in Path("/proc/locks").read_text().splitlines()
            if "POSIX" in line and "->" not in line and f":{ino} " in line}


@needs_root
def test_a_childs_posix_lock_on_an_inherited_open_file_comes_back(
        harness: Harness, tmp_path: Path) -> None:
    """The child's open file is its parent's (one description: no state of its own), but
    its POSIX lock is the child's: restored in the child."""
    path, out = tmp_path / "locked", tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", LOCK_TREE, path], out)
    child = int(wait_for_lines(out, 1)[0].split()[1])
    assert posix_lockers(path) == {child}
    images = dump_tree(harness, proc, "dump")
    assert posix_lockers(path) == set()
    root = harness.restore_detached(images)
    track_tree(harness, root)
    assert posix_lockers(path) == {child}


@needs_root
@pytest.mark.parametrize("who", ["stranger", "later member"])
def test_an_image_taking_an_fd_from_a_process_not_restored_before_is_refused(
        harness: Harness, tmp_path: Path, who: str) -> None:
    """OpenFile.shared_pid/shared_fd of a crafted image name a process outside the
    restore (here: the test itself, holding a secret file) or one not restored yet: the
    restore fails in one line, takes nothing, leaves no process."""
    path, out = tmp_path / "locked", tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", LOCK_TREE, path], out)
    child = int(wait_for_lines(out, 1)[0].split()[1])
    images = dump_tree(harness, proc, "dump")
    secret = os.open(tmp_path / "secret", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        d = ImageDir.open(images)
        victim, owner = (child, os.getpid()) if who == "stranger" else (proc.pid, child)
        core = d.read_core(victim)
        f = next(f for f in core.files if f.path == str(path))
        f.shared_pid, f.shared_fd = owner, secret if who == "stranger" else 3
        d.write_core(victim, core)
        msg = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached"))
        assert f"process {owner}, which is no member of this restore restored before" in msg
    finally:
        os.close(secret)
    for pid in (proc.pid, child):
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"{pid} left behind"


SHMEM_TREE = """
import mmap, os, sys, time
m = mmap.mmap(-1, 64 * 4096, mmap.MAP_SHARED)  # the parent never touches its pages
if os.fork() == 0:
    m[40 * 4096:40 * 4096 + 5] = b"child"  # only the child maps (and writes) this page
    os.write(1, b"written\\n")
    while True:
        time.sleep(1)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
os.write(1, m[40 * 4096:40 * 4096 + 5] + b"\\n")
while True:
    time.sleep(1)
"""


@needs_root
def test_shared_memory_only_a_child_wrote_comes_back(harness: Harness, tmp_path: Path,
                                                     ) -> None:
    """A page of MAP_SHARED|MAP_ANONYMOUS memory only the child wrote is not in its owner's
    (the parent's) page tables: it is saved from the shared object itself."""
    go, out = tmp_path / "go", tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", SHMEM_TREE, go], out)
    wait_for_lines(out, 1)
    images = dump_tree(harness, proc, "dump")
    root = harness.restore_detached(images)
    track_tree(harness, root)
    go.touch()
    assert wait_for_lines(out, 2)[1] == "child"
