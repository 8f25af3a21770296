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
                       a page written during the copy is caught by the next pass
    write images       per member: pages, pagemap, VMAs, tracker state; then the
                       inventory (kind "predump", pids: every live member in pre-order)

A member that exited before the freeze is left out of this pass; one forked after the
listing is not in it either, and is copied whole by the next pass (the dump's parent
pass then holds no pages for it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ckpt.actions.core_image import vma_to_pb
from ckpt.actions.dump import hidden_fds, merge_stats, refuse_sharing, tree_view
from ckpt.actions.passes import (
    Parent,
    apply_compare,
    describe,
    inventory,
    open_parent,
    pass_stats,
    select_tracker,
    view_digests,
    write_memory,
)
from ckpt.collect import proc
from ckpt.collect.fdkinds.base import GHOST_LIMIT, FdFlags, TreeView
from ckpt.collect.restorable import read_target, require_restorable
from ckpt.collect.vmas import VmaInfo, collect_vmas
from ckpt.errors import NoSuchProcess, NotDumpable
from ckpt.freeze.tree import FrozenTree, list_tree
from ckpt.images import ImageDir
from ckpt.images.pb import image_pb2
from ckpt.kernel.creds import require_root
from ckpt.pagecopy.incremental import plan_pass
from ckpt.track import DirtySet, PassContext, Tracker


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


def check_target(pid: int, ghost_limit: int = GHOST_LIMIT, tcp_close: bool = False,
                 externals: bool = True, migrating: bool = False,
                 tree: TreeView | None = None) -> list[VmaInfo]:
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
                    externals=externals, migrating=migrating)
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
    out = []
    for n, pid in enumerate(pids):
        vmas = check_target(pid, opts.ghost_limit, opts.tcp_close, opts.externals,
                            opts.migrating, tree)
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
        for m in members:
            if not m.tracker.begin_needs_freeze:
                m.dirty = m.tracker.begin(m.ctx)  # protect before copying, it running
    finally:
        for m in listed:
            m.tracker.close()
    stats = merge_stats([copy_member(opts, images, m, frozen_ms) for m in members])
    stats.total_ms = (time.perf_counter() - t0) * 1000
    inv = inventory(root, "predump", parent, members[0].tracker.name, stats)
    inv.pids[:] = [m.pid for m in members]
    images.write_inventory(inv)
    return describe("predump", root, members[0].tracker.name, stats) + tree_note(members)


def arm_frozen(root: int, members: list[MemberPass]) -> tuple[list[MemberPass], float]:
    """Freeze the tree once for the trackers that need it (a syscall injected, bits read
    and cleared). Returns the members still there (one that exited meanwhile is left
    out; one forked meanwhile waits for the next pass) and the frozen time in ms."""
    with FrozenTree(root) as frozen:
        members = [m for m in members if m.pid in frozen.members]
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


def copy_member(opts: PredumpOptions, images: ImageDir, m: MemberPass, frozen_ms: float,
                ) -> image_pb2.DumpStats:
    """One member's pages (what changed or its parent lacks), pagemap, VMAs, tracker."""
    pid, dirty, parent = m.pid, m.dirty, m.parent
    plan = plan_pass(pid, m.ctx.vmas, dirty, parent.has if parent else None)
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
