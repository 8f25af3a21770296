"""Warm restore: build the process while its source still runs, pass by pass.

A migration's destination receives pre-copy rounds long before the final freeze. Instead
of restoring the whole chain after it (seconds for GiBs, all of it downtime), a stub is
kept up to date with every pass as it lands:

    pass 1 (predump)   fork the stub, map the VMAs, fill every page          (source runs)
    pass k (predump)   ckpt.restore.layout: unmap / map fresh / mprotect what changed;
                       drop pages that no longer exist; write the pass's own pages;
                       refill unchanged pages whose mapping had to be recreated
    final (dump)       the same for the last few dirty pages, then the rest of a restore:
                       mm fields, files, threads, registers           (the only downtime)

The invariant: after a pass is applied, the stub's memory is exactly what a restore of
that pass's chain would produce. A pass that is not the child of the last one applied
starts the stub over. A pass of a process tree is refused (the tree is restored cold from
the final dump: ckpt.transfer.tree). Every operation happens on the thread that created the stub (it
is that thread's tracee).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ckpt.collect.vmas import VmaKind
from ckpt.errors import RestoreError
from ckpt.images import ImageDir, chain
from ckpt.images.pagemap import Pagemap
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import NR, PAGE_SIZE
from ckpt.ranges import Range, intersect, normalize, subtract, union
from ckpt.restore import mm
from ckpt.restore.files import check_inherit
from ckpt.restore.layout import plan_layout, vdso_moved
from ckpt.restore.pages import WritableIndex
from ckpt.restore.process import check_xstate, fill_layers, finish_process, prepare_stub
from ckpt.restore.stub import GADGET_LEN, Stub
from ckpt.restore.timers import check_timer_ids
from ckpt.restore.uffd_fill import CopyFill

MADV_DONTNEED, MADV_REMOVE = 4, 9
GADGET_SLACK = 1 << 20


@dataclass(frozen=True)
class Applied:
    """What applying one pass did."""

    name: str
    started: bool  # the stub was (re)built from this pass's whole chain
    pages_written: int
    pages_refilled: int  # unchanged pages whose mapping was recreated
    ms: float


class WarmRestore:
    """A stub following a chain of passes; finish() turns it into the process."""

    def __init__(self) -> None:
        self.stub: Stub | None = None
        self.pid = 0  # the pid in the images
        self.vmas: list[pb.Vma] = []  # the stub's layout (the last pass's VMAs)
        self.coverage: list[Range] = []  # pages that exist in the last pass's view
        self.applied = ""  # realpath of the last pass applied
        self.applied_id = ""  # ... and its identity (inventory.image_id)

    def apply(self, path: str | os.PathLike[str]) -> Applied:
        t0 = time.perf_counter()
        images = ImageDir.open(path)
        inv = images.read_inventory()
        if len(inv.pids) > 1:  # its stubs would have to be forked in tree shape
            self.kill()
            raise RestoreError("a process tree is not built ahead: it is restored from "
                               "the final dump")
        if self.stub is not None and (inv.root_pid != self.pid or
                                      not self._follows(images, inv.parent)
                                      or inv.parent_id != self.applied_id):
            self.kill()
        pid = inv.root_pid
        vmas = images.read_vmas(pid)
        _, pm = images.read_pagemap(pid)
        started = self.stub is None or vdso_moved(self.vmas, vmas)
        try:
            if started:
                self.kill()
                written, refilled = self._start(images, pid, vmas), 0
            else:
                written, refilled = self._update(images, pid, vmas, pm)
        except BaseException:
            self.kill()
            raise
        self.pid, self.vmas, self.coverage = pid, vmas, pm.covered
        self.applied = os.path.realpath(images.path)
        self.applied_id = inv.image_id
        return Applied(images.path.name, started, written // PAGE_SIZE, refilled // PAGE_SIZE,
                       (time.perf_counter() - t0) * 1000)

    def finish(self, path: str | os.PathLike[str], stopped: bool = False,
               inherit: dict[str, int] | None = None) -> tuple[int, list[int]]:
        """Apply the final dump and complete the process: (pid, thread ids)."""
        self.apply(path)
        return self.complete(path, stopped, inherit)

    def complete(self, path: str | os.PathLike[str], stopped: bool = False,
                 inherit: dict[str, int] | None = None) -> tuple[int, list[int]]:
        """Turn the stub, with the final dump at ``path`` applied, into the process. The
        stub is consumed either way; on failure it is killed. ``inherit``: --inherit-fd
        (ckpt.restore.files)."""
        images = ImageDir.open(path)
        inv = images.read_inventory()
        stub = self.stub
        if stub is None or self.applied != os.path.realpath(images.path) \
                or self.applied_id != inv.image_id:  # the same directory, rewritten since
            self.kill()
            raise RestoreError(f"{path} was not applied to the warm restore")
        try:
            if inv.kind != "dump":
                raise RestoreError(f"{path} holds a {inv.kind}, not a restorable dump")
            entry = images.read_core(inv.root_pid)
            check_inherit(entry, inherit or {})
            check_timer_ids(entry)
            same_tids = stub.pid == entry.pid and not any(
                os.path.exists(f"/proc/{t.tid}") for t in entry.threads[1:])
            with stub.colocated():
                check_xstate(stub, entry)
                mm.protect_late(stub, mm.late_protected(list(entry.vmas)))
                tids = finish_process(stub, entry, new_session=not inv.shell_job,
                                      same_tids=same_tids, stopped=stopped, inherit=inherit)
        except BaseException:
            self.kill()
            raise
        stub.close()
        self.stub = None
        self.applied = self.applied_id = ""
        return stub.pid, tids

    def kill(self) -> None:
        """Drop the stub, and with it what it was built from."""
        if self.stub is not None:
            self.stub.kill()
            self.stub = None
        self.applied = self.applied_id = ""

    # ------------------------------------------------------------------ internals
    def _follows(self, images: ImageDir, parent: str) -> bool:
        """Is this pass (whose inventory names ``parent``) the child of the last one
        applied?"""
        return bool(parent) and os.path.realpath(images.path / parent) == self.applied

    def _start(self, images: ImageDir, pid: int, vmas: list[pb.Vma]) -> int:
        layers = chain.resolve(images, pid)
        taken = os.path.exists(f"/proc/{pid}")
        stub = Stub.spawn(None if taken else pid)
        self.stub = stub
        copier = CopyFill()
        try:
            with stub.colocated():
                prepare_stub(stub, vmas)
                late = mm.map_vmas(stub, vmas)
                copier = CopyFill.open(stub, vmas)  # the first pass fills fresh memory only
            return fill_layers(stub, pid, layers, WritableIndex(vmas, late), copier=copier)
        finally:
            copier.close()

    def _update(self, images: ImageDir, pid: int, vmas: list[pb.Vma],
                pm: Pagemap) -> tuple[int, int]:
        stub = self.stub
        assert stub is not None
        change = plan_layout(self.vmas, vmas)
        with stub.colocated():
            busy = normalize((v.start, v.end) for v in vmas)
            if mm.overlaps(stub.gadget, stub.gadget + GADGET_LEN + GADGET_SLACK, busy):
                stub.move_gadget(mm.free_gadget_address(stub.pid, vmas))
            for a, b in change.unmap:
                stub.sc(NR.munmap, a, b - a, what=f"munmap {a:#x}")
            with mm.Backing(stub) as files:
                for p in change.fresh:
                    mm.map_range(stub, p.vma, p.start, p.end, files)
            for a, b, prot in change.protect:
                stub.sc(NR.mprotect, a, b - a, prot, what=f"mprotect {a:#x}")
            self._drop(vmas, intersect(change.kept, subtract(self.coverage, pm.covered)))
        index = WritableIndex(vmas, mm.late_protected(vmas))
        written = fill_layers(stub, pid, [chain.Layer(images, pm.present, pm.present)], index)
        unchanged = pm.in_parent
        refill = intersect(unchanged, union(change.fresh_ranges, subtract(unchanged,
                                                                           self.coverage)))
        refilled = 0
        if refill:
            refilled = fill_layers(stub, pid, chain.resolve(images, pid)[1:], index, only=refill)
        return written, refilled

    def _drop(self, vmas: list[pb.Vma], stale: list[Range]) -> None:
        """Pages the stub holds that the new pass says do not exist any more."""
        assert self.stub is not None
        for v in vmas:
            for a, b in intersect(stale, [(v.start, v.end)]):
                advice = MADV_REMOVE if VmaKind(v.kind) == VmaKind.ANON_SHARED else MADV_DONTNEED
                self.stub.sc(NR.madvise, a, b - a, advice, what=f"madvise {a:#x}")
