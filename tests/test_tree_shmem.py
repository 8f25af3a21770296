"""Anonymous shared memory (MAP_SHARED|MAP_ANONYMOUS) that members of a tree share after
fork(): stored once, in its owner's pages (the first member in pre-order), recorded on
every member's Vma (shmid, shm_owner, shm_start), and mapped again by the others from the
owner's restored object (ckpt.collect.shmem, ckpt.restore.mm). Memory shared with a
process outside the dump, or that members map in parts, is refused before the freeze.

The decisions are pure and tested on records; the end-to-end cases use
examples/targets/tree_shmem.py (a parent and 2 children passing rounds through 8 MiB).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    wait_for_line,
    wait_for_lines,
)
from test_refuse import FINE
from test_tree_restore import reap_members

from ckpt.collect.restorable import refusals
from ckpt.collect.shmem import (
    WHOLE,
    Placement,
    Seen,
    ShmMap,
    judge,
    not_owned,
    owned_whole,
    place,
    read_shmem_maps,
    refusal,
)
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.images import ImageDir
from ckpt.ranges import intersect, total

PAGE = 4096
A = 0x7F0000000000  # where the parent maps the object
MIB8 = 8 << 20


def shm(pid: int, start: int, length: int, pgoff: int = 0, inode: int = 9) -> ShmMap:
    return ShmMap(pid, start, start + length, pgoff, 1, inode)


def info(m: ShmMap) -> VmaInfo:
    return VmaInfo(start=m.start, end=m.end, prot=3, shared=True, kind=VmaKind.ANON_SHARED,
                   pgoff=m.pgoff, path="/dev/zero (deleted)", dev=m.dev, inode=m.inode,
                   vmflags=("rd", "wr", "sh", "mr", "mw", "me", "ms"))


# --------------------------------------------------------------------------- pure


def test_the_first_member_in_preorder_owns_memory_several_map() -> None:
    parent, child = shm(10, A, MIB8), shm(11, A, MIB8)
    alone = shm(11, A + MIB8, PAGE, inode=77)  # the child's own: restored as today
    placed = place([[parent], [child, alone], []])
    assert placed == {(10, A): Placement(9, 10, A), (11, A): Placement(9, 10, A)}
    mine = {start: p for (pid, start), p in placed.items() if pid == 11}
    assert not_owned(11, [info(child), info(alone)], mine) == [(A, A + MIB8)]
    theirs = {start: p for (pid, start), p in placed.items() if pid == 10}
    assert not_owned(10, [info(parent)], theirs) == []
    assert owned_whole(10, [info(parent)], theirs) == [(A, A + MIB8, WHOLE)]
    assert owned_whole(11, [info(child)], mine) == []


def test_shm_start_is_where_offset_zero_lies_in_the_owner() -> None:
    """The owner's VMA starts 2 pages into the object (it unmapped the first two); a
    child maps pages 3-5 elsewhere (mremap): shm_start + its pgoff is its memory in the
    owner."""
    owner = shm(10, A, 6 * PAGE, pgoff=2 * PAGE)
    child = shm(11, 0x5000_0000, 3 * PAGE, pgoff=3 * PAGE)
    got = place([[owner], [child]])[(11, child.start)]
    assert got == Placement(9, 10, A - 2 * PAGE)
    assert got.start + child.pgoff == A + PAGE  # in the owner: its VMA's second page
    assert judge(11, [child], [[owner], [child]], {}) == ((child.start, Seen((), (10,))),)


def test_memory_mapped_in_parts_by_different_members_is_refused() -> None:
    """The owner keeps the first 4 pages, a child still maps all 8: no owner VMA holds
    the child's pages; so is a child range split across two VMAs of the owner (each is
    restored as an object of its own)."""
    owner, child = shm(10, A, 4 * PAGE), shm(11, A, 8 * PAGE)
    members = [[owner], [child]]
    assert (11, A) not in place(members)
    seen = dict(judge(11, [child], members, {}))[A]
    assert seen == Seen((), (10,), covered=False)
    why = refusal(seen)
    assert why is not None and "process 10 of the dump" in why and "mapped in parts" in why
    lo, hi = shm(10, A, 4 * PAGE), shm(10, A + 4 * PAGE, 4 * PAGE, pgoff=4 * PAGE)
    assert not dict(judge(10, [lo, hi], [[lo, hi], [child]], {}))[A].covered
    assert dict(judge(10, [lo, hi], [[lo, hi], [shm(11, A, 4 * PAGE)]], {}))[A].covered


def test_memory_a_process_outside_the_dump_maps_too_is_refused_naming_it() -> None:
    me = shm(10, A, MIB8)
    seen = dict(judge(10, [me], [[me]], {(1, 9): [31, 30]}))[A]
    assert seen == Seen((30, 31), ())
    why = refusal(seen)
    assert why is not None and "processes 30, 31 outside the dump" in why
    assert refusal(Seen()) is None and refusal(None) is None


def test_the_restorable_table_names_process_address_and_the_others() -> None:
    v = info(shm(77, A, MIB8))
    target = replace(FINE, vmas=(*FINE.vmas, v), shmem=((A, Seen((4242,), ())),))
    found = [line for line in refusals(target) if "shared anonymous" in line]
    assert found == [f"process 77 maps shared anonymous memory at {A:#x} that process 4242 "
                     "outside the dump map too (inherited across fork()): a restore would "
                     "make a copy for this process alone, cut off from them: not supported "
                     "yet"]
    assert not [line for line in refusals(replace(target, shmem=((A, Seen((), (78,))),)))
                if "shared anonymous" in line]


MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234                       /usr/bin/python3
7f0000000000-7f0000800000 rw-s 00000000 00:01 999                        /dev/zero (deleted)
7f0000800000-7f0000801000 rw-s 00003000 00:01 1000                       [anon_shmem:pool]
7f0000900000-7f0000901000 rw-p 00000000 00:00 0
7f0000a00000-7f0000a01000 r--s 00000000 00:1a 77                         /dev/shm/x
"""


def test_shmem_vmas_are_read_from_maps(tmp_path: Path) -> None:
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "maps").write_text(MAPS)
    dev = os.makedev(0, 1)
    assert read_shmem_maps(123, root=str(tmp_path)) == [
        ShmMap(123, A, A + MIB8, 0, dev, 999), ShmMap(123, A + MIB8, A + MIB8 + PAGE, 0x3000,
                                                      dev, 1000)]
    assert read_shmem_maps(124, root=str(tmp_path)) == []  # gone


# --------------------------------------------------------------------------- live


def start_tree(harness: Harness, *mode: str, out_name: str = "tree_shmem.out",
               ) -> tuple[subprocess.Popen[bytes], Path, list[int]]:
    """examples/targets/tree_shmem.py: the parent and its children's pids (child 0, 1)."""
    out = harness.tmp / out_name
    proc = harness.launch([*py_target("tree_shmem.py"), *mode], out)
    wait_for_line(out, lambda line: line == "ready", 20, "ready")
    kids = [int(pid) for _, pid in sorted(line.split()[1:] for line in read_lines(out)
                                          if line.startswith("child "))]
    assert len(kids) == 2, read_lines(out)
    return proc, out, kids


def rounds(out: Path) -> int:
    lines = read_lines(out)
    assert not [line for line in lines if line.startswith("BAD")], lines
    return sum(1 for line in lines if line.startswith("round "))


def wait_rounds(out: Path, more: int) -> None:
    """``more`` rounds beyond those printed so far: the three pass them only while they
    share the memory."""
    lines = read_lines(out)
    wait_for_lines(out, len(lines) + more, timeout=20)
    rounds(out)


def shmem_inodes(pid: int) -> set[int]:
    """The shmem objects ``pid`` maps read-write."""
    return {int(line.split()[4]) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if line.endswith("/dev/zero (deleted)") and re.match(r"\S+ rw-s", line)}


@needs_root
@pytest.mark.parametrize("mode", ["", "split"])
def test_shared_memory_is_stored_once_by_its_owner_and_shared_again_after_restore(
        harness: Harness, mode: str) -> None:
    """split: the second child maps the object's second half as a VMA of its own (at
    offset 4 MiB): mapped again at that offset of the owner's new object."""
    proc, out, kids = start_tree(harness, *[mode] if mode else [])
    images = harness.images()
    harness.dump_and_reap(proc, images)
    reap_members(kids)
    res = run_ckpt("show", "--json", images)
    assert_ckpt_ok(res)
    shown = json.loads(res.stdout)
    shared = shown["shared"]["memory"]
    assert len(shared) == 1 and shared[0]["owner"] == proc.pid, shared
    assert {m["pid"] for m in shared[0]["mappings"]} == {proc.pid, *kids}
    pages = {p["pid"]: [v["pages"] for v in p["vmas"] if "shm" in v]
             for p in shown["processes"]}
    split = [0, 0] if mode == "split" else [0]
    assert pages == {proc.pid: [MIB8 // PAGE], kids[0]: [0], kids[1]: split}, pages
    start = shared[0]["owner_start"]
    assert {(m["pid"], m["start"] - start, m["pgoff"]) for m in shared[0]["mappings"]} == {
        (p, 0, 0) for p in (proc.pid, *kids)} | ({(kids[1], MIB8 // 2, MIB8 // 2)} if split[1:]
                                                else set())
    before = rounds(out)
    pid = harness.restore_detached(images)
    assert pid == proc.pid
    for kid in kids:
        harness.track(kid)
    wait_rounds(out, 5)  # the parent sees the children's acks, they see its rounds
    assert rounds(out) >= before + 5
    assert len(set().union(*(shmem_inodes(p) for p in (pid, *kids)))) == 1  # one object
    for p in (pid, *kids):
        assert_running_untraced(p)


@needs_root
def test_memory_shared_with_a_process_outside_the_dump_is_refused_naming_it(
        harness: Harness) -> None:
    """The first child alone: its parent and its sibling map the memory too."""
    proc, out, kids = start_tree(harness)
    res = run_ckpt("dump", "-t", str(kids[0]), "-D", harness.images(), "--leave-running")
    line = assert_one_error_line(res)
    assert f"process {kids[0]} maps shared anonymous memory at 0x" in line, line
    assert f"that processes {min(proc.pid, kids[1])}, {max(proc.pid, kids[1])} outside " \
           "the dump map too" in line, line
    for p in (proc.pid, *kids):
        assert_running_untraced(p)
    wait_rounds(out, 3)


@needs_root
def test_memory_members_map_in_parts_is_refused_naming_them(harness: Harness) -> None:
    """The parent (the owner) unmapped the last page the children still map."""
    proc, out, kids = start_tree(harness, "parts")
    res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images(), "--leave-running")
    line = assert_one_error_line(res)
    assert f"process {proc.pid} maps shared anonymous memory at 0x" in line, line
    assert f"that processes {min(kids)}, {max(kids)} of the dump map too, mapped in parts" \
           in line, line
    for p in (proc.pid, *kids):
        assert_running_untraced(p)
    wait_rounds(out, 3)


@needs_root
@pytest.mark.parametrize("first_pass", ["predump", "dump"])
def test_incremental_pass_saves_shared_memory_whole_in_its_owner(
        harness: Harness, first_pass: str) -> None:
    """The owner's dirty tracking (uffd-wp) misses the children's writes (each writes a
    page the parent never does): every pass stores the memory whole, and a restore of the
    chain (after a predump, or a dump that left the tree running) gives each child its
    own count back."""
    proc, out, kids = start_tree(harness)
    first, second = harness.images("first"), harness.images("second")
    if first_pass == "predump":
        assert_ckpt_ok(run_ckpt("predump", "-t", str(proc.pid), "-D", first))
    else:
        harness.dump(proc.pid, first, "--leave-running", "--track-mem")
    wait_rounds(out, 3)
    harness.dump_and_reap(proc, second, "--incremental", "--prev-images-dir", "../first")
    reap_members(kids)
    res = run_ckpt("show", "--json", second)
    assert_ckpt_ok(res)
    shown = json.loads(res.stdout)
    pages = {p["pid"]: [v["pages"] for v in p["vmas"] if "shm" in v]
             for p in shown["processes"]}
    assert pages == {proc.pid: [MIB8 // PAGE], kids[0]: [0], kids[1]: [0]}, pages
    start = shown["shared"]["memory"][0]["mappings"][0]["start"]
    _, pagemap = ImageDir.open(str(second)).read_pagemap(proc.pid)
    stored = total(intersect(pagemap.present, [(start, start + MIB8)]))
    assert stored == MIB8, f"the owner stored {stored} bytes of it, not all"
    stats = shown["inventory"]["stats"]
    assert WHOLE in {w["reason"] for w in stats.get("whole_vmas", ())}, stats
    before = rounds(out)
    pid = harness.restore_detached(second)
    for kid in kids:
        harness.track(kid)
    wait_rounds(out, 5)
    assert pid == proc.pid and rounds(out) >= before + 5


@needs_root
def test_an_image_naming_another_process_as_owner_maps_nothing_of_it(
        harness: Harness) -> None:
    """Vma.shm_owner of a crafted image names a process outside the restore that maps
    shared memory at shm_start: the restore fails in one line, that process runs on."""
    proc, _, kids = start_tree(harness)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    reap_members(kids)
    other, other_out, other_kids = start_tree(harness, out_name="other.out")
    start = int(next(line for line in Path(f"/proc/{other.pid}/maps").read_text().splitlines()
                     if line.endswith("/dev/zero (deleted)")).split("-")[0], 16)
    d = ImageDir.open(images)
    core = d.read_core(kids[0])
    for v in core.vmas:
        if v.shmid:
            v.shm_owner, v.shm_start = other.pid, start
    d.write_core(kids[0], core)
    for p in (proc.pid, *kids):
        harness.track(p)  # killed at the end, should the restore wrongly succeed
    res = run_ckpt("restore", "-D", images, "--restore-detached")
    line = assert_one_error_line(res)
    assert f"shared anonymous memory of process {other.pid}, which is no process of this " \
           "restore" in line, line
    for p in (proc.pid, *kids):
        assert not Path(f"/proc/{p}").exists() or Path(f"/proc/{p}/stat").read_text().split()[
            2] == "Z", f"{p} left behind"
    for p in (other.pid, *other_kids):
        assert_running_untraced(p)
    wait_rounds(other_out, 3)
