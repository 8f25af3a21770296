"""Predump and `dump --incremental` over a process tree (issue 11 W9): every member
tracked and copied per pass, in one pass over the tree; a member new since the parent
pass (or whose pid now names another process) copied whole, one that exited absent.

The target (examples/targets/tree_worker.py): a parent and 2 workers, each with its own
32 MiB of a pattern of its own, stamping one page per step and printing the crc32 of its
32 MiB (a pure function of worker and step: tree_worker.expected)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import zlib
from pathlib import Path
from types import ModuleType

import pytest
from conftest import (
    TARGETS,
    Harness,
    assert_ckpt_ok,
    assert_running_untraced,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
)
from test_killsafe import pause_ckpt_at
from test_tree_restore import reap_members
from test_tree_shmem import MIB8, rounds, start_tree, wait_rounds

from ckpt.actions.passes import member_parent_refused, of_member, open_parent
from ckpt.collect import proc
from ckpt.images import ImageDir
from ckpt.images.chain import resolve
from ckpt.images.pagemap import Pagemap
from ckpt.images.pb.image_pb2 import Inventory, PagemapHead, TrackerState
from ckpt.ranges import intersect, total

MIB = 1 << 20
WORKER = 32 * MIB  # each worker's region
SMALL = 4 * MIB  # what an incremental pass may store per member, at most


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tree_worker", TARGETS / "tree_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- pure

def test_a_member_uses_its_parent_pass_only_if_it_is_the_same_process() -> None:
    assert member_parent_refused(True, 1234, 1234) == ""
    assert "new" in member_parent_refused(False, 0, 1234)
    assert "reused" in member_parent_refused(True, 1234, 5678)
    # a parent pass that recorded no start time: the tracker's own check decides
    assert member_parent_refused(True, 0, 5678) == ""


def parent_pass(path: Path, pids: list[int], start_time: int) -> None:
    """A predump pass of ``pids`` with no pages, each member's tracking state saying it
    started at ``start_time``."""
    d = ImageDir.create(path)
    for pid in pids:
        d.write_pagemap(pid, PagemapHead(pid=pid), Pagemap([], []))
        with d.pages_writer(pid):
            pass
        d.write_tracker(pid, TrackerState(backend="uffd-wp", pid=pid, start_time=start_time))
    d.write_inventory(Inventory(root_pid=pids[0], pids=pids, kind="predump",
                                tracker="uffd-wp", image_id="1" * 32))


def test_a_member_whose_pid_names_another_process_gets_no_parent(tmp_path: Path) -> None:
    """A member's pid in the parent pass, recorded with another start time: another
    process took it since; its pages there are not its own (a full copy)."""
    me = os.getpid()
    mine = proc.read_stat(me).starttime
    parent_pass(tmp_path / "same", [1, me], mine)
    parent_pass(tmp_path / "other", [1, me], mine + 1)
    parent_pass(tmp_path / "without", [1], mine)
    here = str(tmp_path / "next")
    same = open_parent(here, "../same", me, member=True)
    assert same is not None and same.tracker_state is not None
    assert open_parent(here, "../other", me, member=True) is None
    assert open_parent(here, "../without", me, member=True) is None
    # the root is not a member: its parent is its own (the tracker checks the process)
    assert open_parent(here, "../other", me) is not None


def test_a_member_refusal_names_the_member_once() -> None:
    assert of_member(12, "fd 3 is a FIFO") == "process 12: fd 3 is a FIFO"
    assert of_member(12, "process 12 has a timer") == "process 12 has a timer"
    assert of_member(12, "process 123 has a timer") == "process 12: process 123 has a timer"


def test_the_worker_crc_is_a_function_of_worker_and_step() -> None:
    worker = load_worker()
    assert worker.expected(0, 3) != worker.expected(1, 3)
    assert worker.expected(0, 3) != worker.expected(0, 4)


# --------------------------------------------------------------------------- live

def children(pid: int) -> list[int]:
    return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def last_step(out: Path, child: int) -> int:
    steps = [int(line.split()[1]) for line in read_lines(out) if line.startswith(f"c{child} ")]
    return steps[-1] if steps else 0


def advance(out: Path, workers: list[int], steps: int = 2) -> None:
    """Wait until each worker made ``steps`` more steps (pages written between passes)."""
    for child in workers:
        start = last_step(out, child)
        wait_for(lambda c=child, s=start: last_step(out, c) >= s + steps, 30,  # type: ignore[misc]
                 f"worker {child} to step on")


def stored(images: Path, pid: int) -> tuple[int, int]:
    """(bytes stored in this pass, bytes left in the parent chain) for member ``pid``."""
    _, pm = ImageDir.open(str(images)).read_pagemap(pid)
    return total(pm.present), total(pm.in_parent)


def chain_memory(images: Path, pid: int, start: int, size: int) -> bytes:
    """Member ``pid``'s bytes at [start, start + size) as a restore from ``images`` would
    map them: each page from the pass of the chain that owns it (a hole: zeros)."""
    out = bytearray(size)
    for layer in resolve(ImageDir.open(str(images)), pid):
        with layer.images.pages_reader(pid) as r:
            data = b"".join(r.iter_chunks())
        at = 0
        for s, e in layer.stream:
            for lo, hi in intersect(intersect([(s, e)], layer.owned),
                                    [(start, start + size)]):
                out[lo - start : hi - start] = data[at + lo - s : at + hi - s]
            at += e - s
    return bytes(out)


def assert_memory_of_a_step(images: Path, out: Path, pid: int, child: int, last: int) -> None:
    """Worker ``child``'s 32 MiB in the chain of ``images`` are those after one of its
    steps, none before ``last`` (printed before the pass) nor after what it printed since."""
    line = next(x for x in read_lines(out) if x.startswith(f"a{child} "))
    crc = zlib.crc32(chain_memory(images, pid, int(line.split()[1], 16), WORKER))
    worker = load_worker()
    mem = bytearray(worker.initial(child))
    for step in range(1, last_step(out, child) + 2):  # + 1: stamped, not printed yet
        worker.stamp(mem, step)
        if step >= last and zlib.crc32(mem) == crc:
            return
    pytest.fail(f"worker {child}'s memory in {images.name} is that of no step from {last}")


def pids_of(images: Path) -> list[int]:
    return list(ImageDir.open(str(images)).read_inventory().pids)


def start(harness: Harness, out: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    proc = harness.launch([*py_target("tree_worker.py"), "0.1"], out)
    wait_for_line(out, lambda line: line == "ready", 60, "the workers")
    kids = [worker_pid(out, 0), worker_pid(out, 1)]  # by worker, not by pid (pids wrap)
    assert children(proc.pid) == sorted(kids)
    return proc, kids


def worker_pid(out: Path, child: int) -> int:
    """Worker ``child``'s pid, from its first line."""
    line = wait_for_line(out, lambda x: x.startswith(f"a{child} "), 30, f"worker {child}")
    return int(line.split()[2])


def predump(images: Path, root: int, prev: str | None = None) -> str:
    res = run_ckpt("predump", "-t", str(root), "-D", images,
                   *(("--prev-images-dir", prev) if prev else ()))
    assert_ckpt_ok(res)
    return res.stderr  # the line describing the pass


@needs_root
def test_predump_predump_incremental_dump_of_a_tree_store_only_what_changed(
        harness: Harness, tmp_path: Path) -> None:
    """Each pass covers every member; the second predump and the dump store much less
    than 32 MiB per worker (the rest is in the parent); each worker's memory, resolved
    through the chain, is that of one of its steps; restored, the workers go on from
    there, each step's crc that of an uninterrupted run."""
    out = tmp_path / "out.txt"
    proc, kids = start(harness, out)
    root = proc.pid
    p1, p2, final = harness.images("p1"), harness.images("p2"), harness.images("dump")
    line = predump(p1, root)
    assert "3 processes" in line, line
    assert pids_of(p1) == [root, *sorted(kids)]
    for kid in kids:
        own, _ = stored(p1, kid)
        assert own >= WORKER, (kid, own)
    advance(out, [0, 1])
    predump(p2, root, "../p1")
    for pid in (root, *kids):
        assert_running_untraced(pid)
    advance(out, [0, 1])
    before = [last_step(out, child) for child in (0, 1)]
    harness.dump_and_reap(proc, final, "--incremental",
                          "--prev-images-dir", "../p2")
    for pid in kids:  # orphaned as they died: reparented to us (a subreaper), reaped
        harness.kill(pid)
    for child, kid in enumerate(kids):  # the dump's view through the chain
        assert_memory_of_a_step(final, out, kid, child, before[child])
    for images in (p2, final):
        assert pids_of(images) == [root, *sorted(kids)]
        for pid in (root, *kids):
            own, in_parent = stored(images, pid)
            assert own < SMALL, (images.name, pid, own)
            if pid != root:
                assert in_parent >= WORKER - SMALL, (images.name, pid, in_parent)
    dumped = [last_step(out, child) for child in (0, 1)]
    assert harness.restore_detached(final) == root
    for kid in kids:
        harness.track(kid)
    assert children(root) == sorted(kids)
    advance(out, [0, 1], 3)
    worker = load_worker()
    for child in (0, 1):
        mem = bytearray(worker.initial(child))
        steps = {int(x.split()[1]): int(x.split()[2]) for x in read_lines(out)
                 if x.startswith(f"c{child} ")}
        for step in range(1, max(steps) + 1):
            worker.stamp(mem, step)
            if step > dumped[child]:
                assert steps[step] == zlib.crc32(mem), (child, step)


@needs_root
def test_a_member_forked_after_a_predump_is_copied_whole_and_one_that_exited_is_absent(
        harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    proc, kids = start(harness, out)
    root = proc.pid
    p1, p2, final = harness.images("p1"), harness.images("p2"), harness.images("dump")
    predump(p1, root)
    os.kill(root, signal.SIGUSR1)  # a third worker
    wait_for_line(out, lambda line: line.startswith("c2 "), 30, "the third worker")
    new = worker_pid(out, 2)
    os.kill(kids[0], signal.SIGKILL)  # the first one gone (its parent reaps it)
    wait_for(lambda: kids[0] not in children(root), 10, "the first worker to be reaped")
    line = predump(p2, root, "../p1")
    assert "1 copied whole" in line, line
    assert pids_of(p2) == [root, *sorted((kids[1], new))]  # children by pid
    own, in_parent = stored(p2, new)
    assert own >= WORKER and not in_parent, own
    own, in_parent = stored(p2, kids[1])
    assert own < SMALL and in_parent >= WORKER - SMALL, (own, in_parent)
    os.kill(root, signal.SIGUSR1)  # a fourth, new in the dump (it too holds a copy of
    # the userfaultfd the predumps left in its parent: ckpt's, not dumped)
    wait_for_line(out, lambda line: line.startswith("c3 "), 30, "the fourth worker")
    newer = worker_pid(out, 3)
    advance(out, [1, 2, 3])
    before = {child: last_step(out, child) for child in (1, 2, 3)}
    assert_ckpt_ok(run_ckpt("dump", "-t", str(root), "-D", final, "--incremental",
                            "--prev-images-dir", "../p2", "--leave-running"))
    assert pids_of(final) == [root, *sorted((kids[1], new, newer))]
    for child, pid in ((1, kids[1]), (2, new), (3, newer)):
        assert_memory_of_a_step(final, out, pid, child, before[child])
    for pid in (kids[1], new):
        own, in_parent = stored(final, pid)
        assert own < SMALL and in_parent >= WORKER - SMALL, (pid, own, in_parent)
    own, in_parent = stored(final, newer)
    assert own >= WORKER and not in_parent, own
    for pid in (root, kids[1], new, newer):
        assert_running_untraced(pid)


@needs_root
def test_a_member_whose_pid_was_reused_between_passes_is_copied_whole(
        harness: Harness, tmp_path: Path) -> None:
    """Worker 0 killed and another worker forked under its pid between two predumps:
    the second pass does not take the old process's pages for that pid, it copies the
    new one whole; the dump after it is incremental again."""
    out = tmp_path / "out.txt"
    proc, kids = start(harness, out)
    root = proc.pid
    p1, p2, final = harness.images("p1"), harness.images("p2"), harness.images("dump")
    predump(p1, root)
    os.kill(root, signal.SIGUSR2)
    said = wait_for_line(out, lambda line: line.startswith(("reused", "not reused")), 30,
                         "worker 0 replaced")
    if said == "not reused":
        pytest.skip("other processes took the freed pid each time the worker asked for it")
    assert said == f"reused {kids[0]}"
    wait_for_line(out, lambda line: line.startswith("c2 "), 30, "the new worker")
    line = predump(p2, root, "../p1")
    assert "1 copied whole" in line, line
    assert pids_of(p2) == [root, *sorted(kids)]
    own, in_parent = stored(p2, kids[0])
    assert own >= WORKER and not in_parent, (own, in_parent)
    started = [ImageDir.open(str(d)).read_tracker(kids[0]) for d in (p1, p2)]
    assert started[0] and started[1] and started[0].start_time != started[1].start_time
    advance(out, [1, 2])
    before = {child: last_step(out, child) for child in (1, 2)}
    assert_ckpt_ok(run_ckpt("dump", "-t", str(root), "-D", final, "--incremental",
                            "--prev-images-dir", "../p2", "--leave-running"))
    for child, pid in ((2, kids[0]), (1, kids[1])):  # worker 2 under worker 0's pid
        assert_memory_of_a_step(final, out, pid, child, before[child])
    for pid in kids:
        own, in_parent = stored(final, pid)
        assert own < SMALL and in_parent >= WORKER - SMALL, (pid, own, in_parent)


def shm_span(pid: int) -> tuple[int, int]:
    """Where ``pid`` maps the tree's shared anonymous memory (tree_shmem.py: one VMA)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith("/dev/zero (deleted)"):
            lo, hi = line.split()[0].split("-")
            return int(lo, 16), int(hi, 16)
    raise AssertionError(f"process {pid} maps no shared anonymous memory")


@needs_root
def test_predumps_leave_memory_members_share_to_the_dump_which_stores_it_in_its_owner(
        harness: Harness) -> None:
    """MAP_SHARED|MAP_ANONYMOUS memory the three members map (tree_shmem.py): no
    tracker sees the writes through another member's mapping, so a predump stores none
    of it and the dump all of it in its owner; restored, the members still share it
    (their rounds go on, each checking the others' writes)."""
    proc, out, kids = start_tree(harness)
    spans = {pid: shm_span(pid) for pid in (proc.pid, *kids)}
    p1, p2, final = harness.images("p1"), harness.images("p2"), harness.images("dump")
    predump(p1, proc.pid)
    wait_rounds(out, 2)
    predump(p2, proc.pid, "../p1")
    wait_rounds(out, 2)
    for images in (p1, p2):
        for pid, span in spans.items():
            _, pm = ImageDir.open(str(images)).read_pagemap(pid)
            assert not intersect(pm.covered, [span]), (images.name, pid)
    harness.dump_and_reap(proc, final, "--incremental", "--prev-images-dir", "../p2")
    reap_members(kids)
    _, pm = ImageDir.open(str(final)).read_pagemap(proc.pid)
    assert total(intersect(pm.present, [spans[proc.pid]])) == MIB8
    before = rounds(out)
    assert harness.restore_detached(final) == proc.pid
    for kid in kids:
        harness.track(kid)
    wait_rounds(out, 5)
    assert rounds(out) >= before + 5


@needs_root
@pytest.mark.parametrize("point", ["predump-begin", "predump-copy"])
def test_a_member_that_exits_during_a_predump_is_left_out_of_it(harness: Harness,
                                                                 tmp_path: Path,
                                                                 point: str) -> None:
    """Worker 0 killed while a second predump is at ``point`` (tracking armed with the
    tree running, or its pages about to be copied): the pass completes without it."""
    out = tmp_path / "out.txt"
    proc, kids = start(harness, out)
    p1, p2 = harness.images("p1"), harness.images("p2")
    predump(p1, proc.pid)
    ckpt = pause_ckpt_at(point, "predump", "-t", str(proc.pid), "-D", p2,
                         "--prev-images-dir", "../p1")
    os.kill(kids[0], signal.SIGKILL)  # its parent reaps it
    wait_for(lambda: kids[0] not in children(proc.pid), 10, "worker 0 to be reaped")
    ckpt.send_signal(signal.SIGCONT)
    _, err = ckpt.communicate(timeout=60)
    assert ckpt.returncode == 0, err
    assert pids_of(p2) == [proc.pid, kids[1]]
    own, in_parent = stored(p2, kids[1])
    assert own < SMALL and in_parent >= WORKER - SMALL, (own, in_parent)
    for pid in (proc.pid, kids[1]):
        assert_running_untraced(pid)
