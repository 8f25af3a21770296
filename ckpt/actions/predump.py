"""`ckpt predump`: copy memory while the target runs; freeze only to arm tracking.

    check + parent     what the final dump would refuse (ckpt.collect.restorable); the
                       chain valid, its tracker state                 (target untouched)
    freeze (if needed) soft-dirty: read bits and clear them; uffd-wp: only to inject
                       userfaultfd() on the first pass, later passes do not freeze at all
    arm                tracker.begin: what changed since the parent, tracking re-armed
                       (protect before copying), VMA list snapshot
    plan + copy        pages that changed or the parent lacks, read while it runs;
                       a page written during the copy is caught by the next pass
    write images       pages, pagemap, tracker state, inventory (kind "predump")
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ckpt.actions.core_image import vma_to_pb
from ckpt.actions.dump import hidden_fds
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
from ckpt.collect.fdkinds.base import GHOST_LIMIT, FdFlags
from ckpt.collect.restorable import read_target, require_restorable
from ckpt.collect.vmas import VmaInfo, collect_vmas
from ckpt.errors import NoSuchProcess, NotDumpable
from ckpt.freeze.seize import Frozen
from ckpt.images import ImageDir
from ckpt.kernel.creds import require_root
from ckpt.pagecopy.incremental import plan_pass
from ckpt.track import PassContext, Tracker


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
                 externals: bool = True, migrating: bool = False) -> list[VmaInfo]:
    """Refuse, before anything touches the target, what the final dump would refuse: a
    pass of a process that cannot be restored is wasted. A terminal on fds 0-2 passes
    (the final dump decides, with or without --shell-job): Target.shell_job is True, and
    fd_flags.shell_job False, so that what --shell-job refuses (an fd owned by the
    process's group: ckpt.collect.fdkinds.fown) passes too."""
    if pid <= 0 or not proc.pid_exists(pid):
        raise NoSuchProcess(pid)
    if proc.is_kernel_thread(pid):
        raise NotDumpable(f"process {pid} is a kernel thread")
    flags = FdFlags(shell_job=False, tcp_close=tcp_close, ghost_limit=ghost_limit,
                    externals=externals, migrating=migrating)
    return require_restorable(read_target(pid, True, hidden_fds(pid), flags=flags))


def predump(opts: PredumpOptions) -> str:
    """Run one predump pass; return the line describing it."""
    pid = opts.pid
    t0 = time.perf_counter()
    require_root("predump")
    vmas = check_target(pid, opts.ghost_limit, opts.tcp_close, opts.externals,
                        opts.migrating)
    parent = open_parent(opts.images_dir, opts.prev_images_dir, pid)
    tracker = select_tracker(opts.track, pid, parent)
    images = ImageDir.new_pass(opts.images_dir, opts.overwrite)
    try:
        return _predump(opts, images, parent, tracker, vmas, t0)
    except BaseException:
        images.abandon()
        raise


def _predump(opts: PredumpOptions, images: ImageDir, parent: Parent | None, tracker: Tracker,
             vmas: list[VmaInfo], t0: float) -> str:
    pid = opts.pid
    frozen_ms = 0.0
    try:
        ctx = PassContext(pid, None, vmas)
        if tracker.begin_needs_freeze or tracker.prepare_needs_freeze():
            with Frozen(pid) as frozen:
                ctx = PassContext(pid, frozen, collect_vmas(pid, vmflags=False)
                                  if not tracker.begin_needs_freeze else collect_vmas(pid))
                tracker.prepare(ctx)
                if tracker.begin_needs_freeze:
                    dirty = tracker.begin(ctx)
                    tracker.end(ctx, keep=True)
                frozen_ms = (time.perf_counter() - frozen.frozen_at) * 1000
            ctx.frozen = None
        if not tracker.begin_needs_freeze:
            dirty = tracker.begin(ctx)  # protect before copying, the target running
    finally:
        tracker.close()
    plan = plan_pass(pid, ctx.vmas, dirty, parent.has if parent else None)
    parent_digests = apply_compare(pid, plan, parent, True) if dirty.compare else None
    stored: list[bytes] | None = [] if dirty.compare else None
    mem = write_memory(images, pid, plan, opts.compress_level, True, stored)
    if stored is not None:
        images.write_digests(pid, view_digests(plan, b"".join(stored), parent_digests))
    images.write_vmas(pid, [vma_to_pb(v) for v in ctx.vmas])
    images.write_tracker(pid, tracker.state())
    stats = pass_stats(plan, mem, frozen_ms, (time.perf_counter() - t0) * 1000)
    images.write_inventory(inventory(pid, "predump", parent, tracker.name, stats))
    return describe("predump", pid, tracker.name, stats)
