"""`ckpt predump`: copy memory while the target runs; freeze only to arm tracking. The
target is a tree (``-t ROOT``: ROOT and its descendants); each step runs for every
member, in pre-order.

    check + parent     what the final dump would refuse (ckpt.collect.restorable), what
                       members share not refused (a TreeView); each member's parent (a
                       member new since the parent pass, or whose pid now names another
                       process, has none: a full copy), its tracker state (target untouched)
    freeze (if needed) one FrozenTree, only if a member's tracker needs it: soft-dirty reads
                       bits and clears them; uffd-wp injects userfaultfd() on a member's
                       first pass, later passes do not freeze at all
    arm                tracker.begin: what changed since the parent, tracking re-armed
                       (protect before copying), VMA list snapshot
    plan + copy        pages that changed or the parent lacks, read while it runs;
                       a page written during the copy is caught by the next pass;
                       anonymous shared memory several members map is left to the
                       dump (it stores it whole in its owner: no tracker sees it all)
    write images       per member: pages, pagemap, VMAs, tracker state; then the
                       inventory (kind "predump", pids: every live member in pre-order)

A member that exits during the pass is left out of it (but the root: the pass fails); one
forked after the listing is not in it either, and is copied whole by the next pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from ckpt import testpoint
from ckpt.actions.core_image import vma_to_pb
from ckpt.actions.dump import hidden_fds, merge_stats, refuse_sharing, tree_view
from ckpt.actions.passes import (
    Parent,
    apply_compare,
    describe,
    inventory,
    open_parent,
    pass_stats,
    refusals_of,
    select_tracker,
    view_digests,
    write_memory,
)
from ckpt.collect import proc, shmem
from ckpt.collect.fdkinds.base import GHOST_LIMIT, FdFlags
from ckpt.collect.holders import TreeView
from ckpt.collect.restorable import read_target, require_restorable
from ckpt.collect.shape import read_members, shape_refusal, zombie_children
from ckpt.collect.vmas import VmaInfo, collect_vmas
from ckpt.errors import NoSuchProcess, NotDumpable
from ckpt.freeze.tree import FrozenTree, list_tree
from ckpt.images import ImageDir
from ckpt.images.pb import image_pb2
from ckpt.kernel.creds import require_root
from ckpt.pagecopy.incremental import plan_pass
from ckpt.track import DirtySet, PassContext, Tracker

T = TypeVar("T")


@dataclass(frozen=True)
class PredumpOptions:
    pid: int
    images_dir: str
    prev_images_dir: str | None = None
    track: str = "auto"
    compress_level: int = -1
    overwrite: bool = False  # replace a complete pass already in images_dir
    ghost_limit: int = GHOST_LIMIT  # --ghost-limit: as the final dump's (FdFlags)
    tcp_close: bool = False  # --tcp-close: what the final dump will accept
    externals: bool = True  # as DumpOptions.externals (False: a round of migrate)
    migrating: bool = False  # as DumpOptions.migrating (True: a round of migrate)
    cold: bool = False  # as DumpOptions.cold


def check_target(pid: int, ghost_limit: int = GHOST_LIMIT, tcp_close: bool = False,
                 externals: bool = True, migrating: bool = False,
                 tree: TreeView | None = None, cold: bool = False) -> list[VmaInfo]:
    """Refuse, before anything touches the target, what the final dump would refuse: a
    pass of a process that cannot be restored is wasted. A terminal on fds 0-2 passes
    (the final dump decides, with or without --shell-job): Target.shell_job is True, and
    fd_flags.shell_job False, so that what --shell-job refuses (an fd owned by the
    process's group: ckpt.collect.fdkinds.fown) passes too. In a tree (``tree``), what
    members hold is no other process's."""
    if pid <= 0 or not proc.pid_exists(pid):
        raise NoSuchProcess(pid)
    if proc.is_kernel_thread(pid):
        raise NotDumpable(f"process {pid} is a kernel thread")
    flags = FdFlags(shell_job=False, tcp_close=tcp_close, ghost_limit=ghost_limit,
                    externals=externals, migrating=migrating, cold=cold)
    return require_restorable(read_target(pid, True, hidden_fds(pid), flags=flags,
                                          tree=tree))


@dataclass
class MemberPass:
    """One member of the pass: its parent, tracker, and what the tracker reported."""

    pid: int
    parent: Parent | None
    tracker: Tracker
    ctx: PassContext
    dirty: DirtySet = field(default_factory=DirtySet)

    @property
    def needs_freeze(self) -> bool:
        return self.tracker.begin_needs_freeze or self.tracker.prepare_needs_freeze()


def predump(opts: PredumpOptions) -> str:
    """Run one predump pass over the tree of opts.pid; return the line describing it."""
    root = opts.pid
    t0 = time.perf_counter()
    require_root("predump")
    if root <= 0 or not proc.pid_exists(root):
        raise NoSuchProcess(root)
    parent = open_parent(opts.images_dir, opts.prev_images_dir, root)
    pids = list_tree(root)
    if not pids:  # gone meanwhile
        raise NoSuchProcess(root)
    checked = prepare_members(opts, pids, parent)
    members = [MemberPass(pid, prev, select_tracker(opts.track, pid, prev),
                          PassContext(pid, None, vmas)) for pid, prev, vmas in checked]
    images = ImageDir.new_pass(opts.images_dir, opts.overwrite)
    try:
        return _predump(opts, images, members, parent, t0)
    except BaseException:
        images.abandon()
        raise


def prepare_members(opts: PredumpOptions, pids: list[int], parent: Parent | None,
                    ) -> list[tuple[int, Parent | None, list[VmaInfo]]]:
    """Every member checked, with its parent and VMAs, the tree running untouched."""
    tree = tree_view(pids) if len(pids) > 1 or proc.list_children(pids[0]) else None
    refuse_sharing(pids)
    if tree is not None and (why := shape_refusal(
            read_members(pids, zombie_children(pids)), shell_job=False)):
        raise NotDumpable(why)
    out = []
    for n, pid in enumerate(pids):
        with refusals_of(pid, tree is not None):
            vmas = check_target(pid, opts.ghost_limit, opts.tcp_close, opts.externals,
                                opts.migrating, tree, opts.cold)
        prev = parent if n == 0 else open_parent(opts.images_dir, opts.prev_images_dir, pid,
                                                 member=True)
        out.append((pid, prev, vmas))
    return out


def _predump(opts: PredumpOptions, images: ImageDir, members: list[MemberPass],
             parent: Parent | None, t0: float) -> str:
    root, listed = opts.pid, members
    frozen_ms = 0.0
    try:
        if any(m.needs_freeze for m in members):
            members, frozen_ms = arm_frozen(root, members)
        testpoint.pause_at("predump-begin")
        members = [m for m in members if unless_exited(root, m, partial(begin_running, m))]
    finally:
        for m in listed:
            m.tracker.close()
    testpoint.pause_at("predump-copy")
    pids = [m.pid for m in members]
    copied = [(m, s) for m in members if (s := unless_exited(
        root, m, partial(copy_member, opts, images, m, pids, frozen_ms))) is not None]
    members = [m for m, _ in copied]
    stats = merge_stats([s for _, s in copied])
    stats.total_ms = (time.perf_counter() - t0) * 1000
    inv = inventory(root, "predump", parent, members[0].tracker.name, stats)
    inv.pids[:] = [m.pid for m in members]
    images.write_inventory(inv)
    return describe("predump", root, members[0].tracker.name, stats) + tree_note(members)


def begin_running(m: MemberPass) -> bool:
    """Arm a tracker that needs no freeze (uffd-wp after its first pass), the member
    running: protect before copying."""
    if not m.tracker.begin_needs_freeze:
        m.dirty = m.tracker.begin(m.ctx)
    return True


def unless_exited(root: int, m: MemberPass, step: Callable[[], T]) -> T | None:
    """``step()`` for member ``m``; None if it failed because ``m`` (not the root) exited
    meanwhile: it is left out of this pass, as if it had exited before it."""
    try:
        return step()
    except Exception:
        if m.pid == root or not exited(m):
            raise
        return None


def exited(m: MemberPass) -> bool:
    """Is member ``m`` dead (gone, a zombie, or its pid another process's now)?"""
    try:
        stat = proc.read_stat(m.pid)
    except NoSuchProcess:
        return True
    return stat.state in ("Z", "X") or stat.starttime != m.tracker.start_time


def arm_frozen(root: int, members: list[MemberPass]) -> tuple[list[MemberPass], float]:
    """Freeze the tree once for the trackers that need it (a syscall injected, bits read
    and cleared). Returns the members still there (one that exited meanwhile is left
    out; one forked meanwhile waits for the next pass) and the frozen time in ms."""
    with FrozenTree(root) as frozen:
        live = set(frozen.pids)
        members = [m for m in members if m.pid in live]
        for m in members:
            if not m.needs_freeze:
                continue
            begin = m.tracker.begin_needs_freeze
            m.ctx = PassContext(m.pid, frozen.members[m.pid],
                                collect_vmas(m.pid, vmflags=begin))
            m.tracker.prepare(m.ctx)
            if begin:
                m.dirty = m.tracker.begin(m.ctx)
                m.tracker.end(m.ctx, keep=True)
            m.ctx.frozen = None
        frozen_ms = (time.perf_counter() - frozen.frozen_at) * 1000
    return members, frozen_ms


def copy_member(opts: PredumpOptions, images: ImageDir, m: MemberPass, tree: list[int],
                frozen_ms: float) -> image_pb2.DumpStats:
    """One member's pages (what changed or its parent lacks), pagemap, VMAs, tracker.
    Anonymous shared memory other members (``tree``) map too is left out: no tracker
    sees the writes made through another member's mapping, so the dump stores it whole
    in its owner anyway (ckpt.collect.shmem), and the others not at all."""
    pid, dirty, parent = m.pid, m.dirty, m.parent
    shared = shmem.placements(pid, m.ctx.vmas, tree)
    plan = plan_pass(pid, [v for v in m.ctx.vmas if v.start not in shared], dirty,
                     parent.has if parent else None)
    parent_digests = apply_compare(pid, plan, parent, True) if dirty.compare else None
    stored: list[bytes] | None = [] if dirty.compare else None
    mem = write_memory(images, pid, plan, opts.compress_level, True, stored)
    if stored is not None:
        images.write_digests(pid, view_digests(plan, b"".join(stored), parent_digests))
    images.write_vmas(pid, [vma_to_pb(v) for v in m.ctx.vmas])
    images.write_tracker(pid, m.tracker.state())
    return pass_stats(plan, mem, frozen_ms, 0.0)  # total_ms: the pass's, set by the caller


def tree_note(members: list[MemberPass]) -> str:
    """For a tree: how many members the pass holds, and how many of them an incremental
    pass copied whole (new since its parent, or their pid reused)."""
    if len(members) == 1:
        return ""
    new = sum(1 for m in members[1:] if m.parent is None) if members[0].parent else 0
    whole = f", {new} copied whole (new since the parent)" if new else ""
    return f"; {len(members)} processes{whole}"
