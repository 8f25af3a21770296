"""memfds and deleted files (a /dev/shm file unlinked, as multiprocessing's POSIX
semaphores are) mapped or held by several members of a tree: their contents are saved
once, by the first member in pre-order that maps or holds one, and a tree's restore makes
each once, every member mapping and opening the same file (ckpt/collect/mappedfiles.py:
earlier_holder, make_objects with the tree's registry)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
)
from test_tree_unix import HOWS, children_of, dump_tree, restore_tree

from ckpt.collect.fdkinds.base import TreeScope
from ckpt.collect.fds import FdInfo
from ckpt.collect.holders import TreeView
from ckpt.collect.mappedfiles import earlier_holder, make_objects
from ckpt.errors import RestoreError
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb

# --------------------------------------------------------------------------- pure


def memfd_fd(n: int, ino: int) -> FdInfo:
    return FdInfo(fd=n, target="/memfd:x (deleted)", pos=0, flags=2, mnt_id=1, ino=ino,
                  st_mode=stat.S_IFREG | 0o600, st_dev=1, st_ino=ino, st_rdev=0, st_size=0)


def test_the_first_member_that_maps_or_holds_the_file_carries_it() -> None:
    tree = TreeView((10, 11, 12, 13), {10: [], 11: [memfd_fd(5, 77)], 12: [], 13: []})
    maps = {10: {(1, 99)}, 11: set(), 12: {(1, 77)}, 13: {(1, 77), (1, 99)}}
    # mapped by 12 and 13, held open by 11 (an fd, no mapping): 11 carries it
    assert earlier_holder(13, (1, 77), (1, 77), tree, maps.__getitem__) == 11
    assert earlier_holder(12, (1, 77), (1, 77), tree, maps.__getitem__) == 11
    assert earlier_holder(11, (1, 77), (1, 77), tree, maps.__getitem__) is None
    assert earlier_holder(13, (1, 99), (5, 99), tree, maps.__getitem__) == 10  # a mapping
    assert earlier_holder(10, (1, 99), (5, 99), tree, maps.__getitem__) is None  # the first
    assert earlier_holder(13, (1, 55), (1, 55), tree, maps.__getitem__) is None  # its own
    assert earlier_holder(13, (1, 77), (1, 77), None, maps.__getitem__) is None


def mapping(pid: int, carries: bool) -> pb.ProcessEntry:
    """A member mapping one memfd (Vma dev 1, inode 77): with its contents, or naming
    member 10 as the one that carries it."""
    e = pb.ProcessEntry(pid=pid)
    f = e.mapped_objects.add(dev=1, inode=77).file
    f.id, f.type, f.path, f.dev, f.inode, f.object = 1, pb.OpenFile.MEMFD, \
        "/memfd:x (deleted)", 9, 77, 77
    if carries:
        f.size, f.mode = 8, stat.S_IFREG | 0o600
        f.memfd.name, f.memfd.uid, f.memfd.gid = "x", os.getuid(), os.getgid()
        f.memfd.data.add(offset=0, data=b"contents")
    else:
        f.shared_pid = 10
    return e


def test_a_trees_members_map_one_file_made_once() -> None:
    scope = TreeScope()
    first = make_objects(mapping(10, carries=True), scope)
    second = make_objects(mapping(11, carries=False), scope)
    try:
        fd = first.by_vma[(1, 77)]
        assert second.by_vma[(1, 77)] == fd and os.pread(fd, 8, 0) == b"contents"
        assert second.owned == [] and first.owned == [fd]
        second.close()  # closes nothing of the first's
        assert os.fstat(fd).st_size == 8
    finally:
        first.close()
        scope.close()
    alone = mapping(10, carries=True)  # no tree: made for the process alone, as before
    made = make_objects(alone)
    assert made.owned == [made.by_vma[(1, 77)]]
    made.close()


def test_a_file_an_earlier_member_carries_must_have_been_made() -> None:
    with pytest.raises(RestoreError, match="process 10 carries it"):
        make_objects(mapping(11, carries=False), TreeScope())


# --------------------------------------------------------------------------- live


def playing(harness: Harness) -> tuple[subprocess.Popen[bytes], int, Path]:
    out = harness.tmp / "tree_mapped.out"
    shm = Path("/dev/shm") / f"ckpt-test-{os.getpid()}-{harness.tmp.name}"
    proc = harness.launch([*py_target("tree_mapped.py"), str(shm)], out)
    child = wait_for(lambda: next(iter(children_of(proc.pid)), None), 10, "the child")
    for side in ("parent", "child"):
        wait_for_line(out, f"{side} round 50".__eq__, 10, f"{side} round 50")
    return proc, child, out


@needs_root
def test_files_mapped_by_parent_and_child_are_saved_once(harness: Harness) -> None:
    proc, child, _ = playing(harness)
    parent = proc.pid
    images = harness.images()
    harness.dump(parent, images, "--leave-running")
    d = ImageDir.open(images)
    mine, theirs = d.read_core(parent), d.read_core(child)
    assert len(mine.mapped_objects) == len(theirs.mapped_objects) == 2
    carried = [o for o in mine.mapped_objects if not o.HasField("file_id")]
    assert [o.file.type for o in carried] == [pb.OpenFile.GHOST]  # the memfd: its fd's
    assert all(len(o.file.memfd.data) for o in carried)
    for o in theirs.mapped_objects:  # the parent's, named, no contents
        assert not o.HasField("file_id") and o.file.shared_pid == parent
        assert not o.file.memfd.data
    # the memfd's fd: the one description the parent has (contents saved there)
    (m,) = [f for f in mine.files if f.type == pb.OpenFile.MEMFD]
    (c,) = [f for f in theirs.files if f.type == pb.OpenFile.MEMFD]
    assert len(m.memfd.data) and c.shared_pid == parent
    res = run_ckpt("show", images, "--json")  # the child's mappings: the parent's files
    assert_ckpt_ok(res)
    shown = {p["pid"]: p for p in json.loads(res.stdout)["processes"]}
    objects = {v["object"] for v in shown[child]["vmas"] if "object" in v}
    assert objects == {f"process {parent}'s (saved there)"}


@needs_root
@pytest.mark.parametrize("how", HOWS)
def test_parent_and_child_share_their_mapped_files_after_restore(harness: Harness,
                                                                  how: str) -> None:
    proc, child, out = playing(harness)
    parent = proc.pid
    images = dump_tree(harness, proc, child, how)
    dumped = read_lines(out)
    restore_tree(harness, images, parent, child)
    for side in ("parent", "child"):  # both play on: 100 rounds more each
        last = max(int(line.split()[-1]) for line in dumped if line.startswith(side))
        want = f"{side} round {last + 100}"
        wait_for_line(out, want.__eq__, 15, want)
    assert not [line for line in read_lines(out) if line.startswith("ERROR")]
