"""Pure decisions of a tree dump (ckpt dump -t ROOT: ROOT and its descendants): which
member carries a pipe between members, which open files a member shares with one dumped
before it, the pre-order, the pass's figures. No root needed."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_running_untraced,
    needs_root,
    run_ckpt,
    wait_for_lines,
)

from ckpt.actions.dump import merge_stats
from ckpt.collect.fdkinds.pipe import state_of
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import TreeView, shared_before
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
