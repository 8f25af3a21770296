"""`ckpt dump`: a consistent checkpoint of one process, as a straight checklist.

    parent + preflight (target runs)   parent chain valid, pid, kernel thread, and what a
                                       restore could not bring back (ckpt.collect.restorable)
    freeze                             seize + interrupt every thread
    collect                            threads, injected state, VMAs; restorable again
    live pass (--incremental, uffd-wp) tracker.begin with the target running: read what
                                       changed since the parent (pagecopy.staging)
    track (--incremental/--track-mem)  tracker.begin: dirty pages (since the live pass, if
                                       any), whole VMAs
    copy                               plan (copy / in parent / hole) → process_vm_readv →
                                       zstd pages, pagemap; tracker.end (kept armed only
                                       with --leave-running --track-mem)
    collect files, /proc               after the tracker closed its fd in the target
    write images                       core, tracker, inventory (last: marks it complete)
    release                            kill (default) or detach (--leave-running)

Any failure before release leaves the target running and untraced (see ckpt.freeze).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckpt.actions.core_image import ProcessInfo, build_core
from ckpt.actions.passes import (
    MemoryResult,
    Parent,
    apply_compare,
    chunks,
    describe,
    inventory,
    open_parent,
    pass_stats,
    reserve_snapshot,
    select_tracker,
    snapshot_limit,
    snapshot_pages,
    view_digests,
    write_memory,
)
from ckpt.collect import proc
from ckpt.collect.cgroups import cgroups_to_pb, read_cgroups
from ckpt.collect.deletedcwd import collect_deleted_cwd
from ckpt.collect.fdkinds.base import GHOST_LIMIT, FdFlags
from ckpt.collect.files import collect_files
from ckpt.collect.mappedfiles import WHOLE as MAPPED_WHOLE
from ckpt.collect.mappedfiles import collect_mapped, shared_spans
from ckpt.collect.mlockall import refusal as mlockall_refusal
from ckpt.collect.pstate import collect_settings
from ckpt.collect.restorable import read_target, require_restorable
from ckpt.collect.sysvshm import attaches, collect_segments
from ckpt.collect.tasks import collect_injected, collect_thread
from ckpt.collect.vmas import VmaInfo, collect_vmas
from ckpt.errors import CkptError, NoSuchProcess, NotDumpable
from ckpt.freeze.seize import Frozen
from ckpt.images import ImageDir
from ckpt.images.pb import image_pb2
from ckpt.images.siginfo import STOPPED_MARK
from ckpt.kernel.creds import require_root
from ckpt.kernel.ptrace import Tracee
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.compare import DigestMap
from ckpt.pagecopy.incremental import PassPlan, pages, plan_pass
from ckpt.pagecopy.staging import Snap, Snapshot, assemble, live_coverage, merge_plans
from ckpt.ranges import Range
from ckpt.track import DirtySet, PassContext, Tracker
from ckpt.track.uffd_wp import ckpt_uffds

SYSV_WHOLE = "System V shared memory: saved whole in the core image"
SMALL_COPY = 32 << 20  # bytes: read at once into memory, then stored


@dataclass(frozen=True)
class DumpOptions:
    pid: int
    images_dir: str
    leave_running: bool = False
    shell_job: bool = False
    compress_level: int = -1
    incremental: bool = False
    prev_images_dir: str | None = None
    track: str = "auto"
    track_mem: bool = False  # keep tracking armed (with --leave-running): snapshot chains
    # --incremental: read what changed since the parent before freezing, when the tracker
    # can re-arm with the target running (uffd-wp); the freeze copies only what is
    # written after that
    precopy: bool = True
    overwrite: bool = False  # replace a complete pass already in images_dir
    tcp_close: bool = False  # --tcp-close: established TCP connections restored closed
    ghost_limit: int = GHOST_LIMIT  # --ghost-limit: largest deleted file or memfd saved
    externals: bool = True  # external pipes/sockets recorded (False: migrate refuses them)
    migrating: bool = False  # set by migrate only (FdFlags.migrating)
    # Called with the images complete and the target still frozen, before it is killed;
    # raising keeps the target alive (it is thawed). Migration hands over here.
    before_kill: Callable[[], None] | None = None
    # Called once the SIGKILL is queued (it can never run again), before the exit is
    # waited for: migration lets the copy run here.
    after_kill: Callable[[], None] | None = None


    @property
    def fd_flags(self) -> FdFlags:
        """What the fd kinds (ckpt.collect.fdkinds) accept under these options."""
        return FdFlags(shell_job=self.shell_job, tcp_close=self.tcp_close,
                       ghost_limit=self.ghost_limit, externals=self.externals,
                       migrating=self.migrating)


@dataclass(frozen=True)
class DumpResult:
    pid: int
    threads: int
    vmas: int
    line: str  # what the pass cost and stored, for the user
    frozen_at: float  # time.perf_counter() when the target was frozen
    # (fd, object) of each fd whose object leads outside the dump: restore --inherit-fd
    externals: tuple[tuple[int, str], ...] = ()


def preflight(opts: DumpOptions, hidden_fds: set[int]) -> list[VmaInfo]:
    """Refuse what we cannot dump while the target still runs untouched."""
    pid = opts.pid
    if pid <= 0 or not proc.pid_exists(pid):
        raise NoSuchProcess(pid)
    if proc.is_kernel_thread(pid):
        raise NotDumpable(f"process {pid} is a kernel thread")
    if pid == os.getpid():
        raise NotDumpable("ckpt cannot dump itself")
    if proc.read_status(pid).state in ("Z", "X"):
        raise NotDumpable(f"process {pid} is a zombie")
    return require_restorable(read_target(pid, opts.shell_job, hidden_fds,
                                          flags=opts.fd_flags))


def collect_process(pid: int, leader: Tracee, vmas: list[VmaInfo], stopped: bool = False,
                    ) -> ProcessInfo:
    with proc.proc_errors(pid, "personality"), open(f"/proc/{pid}/personality") as f:
        personality = int(f.read(), 16)
    with proc.proc_errors(pid, "cwd"):
        cwd = os.stat(f"/proc/{pid}/cwd")
    return ProcessInfo(
        stat=proc.read_stat(pid), umask=proc.read_status(pid).umask or 0o022,
        auxv=proc.read_auxv(pid), exe=proc.read_exe(pid), cwd=proc.read_cwd(pid),
        cwd_id=(cwd.st_dev, cwd.st_ino), comm=proc.read_comm(pid),
        cmdline=proc.read_cmdline(pid), personality=personality,
        rlimits=proc.read_limits(pid),
        shared_pending=leader.pending_signals(shared=True) + ([STOPPED_MARK] if stopped else []),
        settings=collect_settings(pid, vmas))


def hidden_fds(pid: int) -> set[int]:
    """userfaultfds earlier passes left in the target are ckpt's, not the process's."""
    return set(ckpt_uffds(pid))


def dump(opts: DumpOptions) -> DumpResult:
    pid = opts.pid
    t_start = time.perf_counter()
    require_root("dump")
    if opts.incremental and not opts.prev_images_dir:
        raise CkptError("--incremental needs --prev-images-dir")
    if opts.track_mem and not opts.leave_running:
        raise CkptError("--track-mem needs --leave-running (a dump without it kills the "
                        "process: there is nothing left to track)")
    parent = open_parent(opts.images_dir, opts.prev_images_dir, pid)
    early_vmas = preflight(opts, hidden_fds(pid) if proc.pid_exists(pid) else set())
    tracker = select_tracker(opts.track, pid, parent) if opts.incremental or opts.track_mem \
        else None
    name = tracker.name if tracker else "none"
    keep = opts.track_mem and opts.leave_running
    images = ImageDir.new_pass(opts.images_dir, opts.overwrite)

    def finish(mem: MemoryResult, frozen_ms: float) -> image_pb2.DumpStats:
        """Everything after the pages: core, tracker state, and the inventory, last."""
        core = build_core(pid, info, states, injected, vmas, files)
        core.sysv_shm.extend(segments)
        core.cgroups.extend(cgroups)
        core.mapped_objects.extend(mapped)
        if deleted_cwd is not None:
            core.deleted_cwd.CopyFrom(deleted_cwd)
        images.write_core(pid, core)
        if tracker is not None and keep:
            images.write_tracker(pid, tracker.state())
        stats = pass_stats(layer.plan, mem, frozen_ms, (time.perf_counter() - t_start) * 1000)
        for a in attaches(vmas):
            stats.whole_vmas.add(start=a.base, end=a.end, reason=SYSV_WHOLE)
        for start, end in shared_spans(vmas):
            stats.whole_vmas.add(start=start, end=end, reason=MAPPED_WHOLE)
        images.write_inventory(inventory(pid, "dump", parent, name, stats,
                                         len(states[0].xstate), opts.shell_job))
        return stats

    try:
        live = live_pass(opts, tracker, parent)
        limit = snapshot_limit()  # read before the freeze, not in it
        # --leave-running full dump: the snapshot's memory is taken before the freeze
        reserve = reserve_snapshot(pid, early_vmas, limit) \
            if opts.leave_running and parent is None else None
        with Frozen(pid) as frozen:
            threads = frozen.threads()
            # The injections map a scratch page and unmap it again: the layout read
            # before them is the one after (but for VmFlags soft-dirty reads afresh).
            vmas = collect_vmas(pid, known=early_vmas)
            with frozen.near():  # ptrace round trips
                states = [collect_thread(t) for t in threads]
                injected = collect_injected(pid, threads, states, vmas)
            if why := mlockall_refusal(injected.mlockall):  # known only while frozen
                raise NotDumpable(f"process {pid}: {why}")
            if tracker is not None and tracker.needs_fresh_vmflags:
                vmas = collect_vmas(pid)
            seen: dict[Any, Any] = {}  # the fd kinds' reads, shared with the collection
            require_restorable(read_target(pid, opts.shell_job, hidden_fds(pid), vmas,
                                           opts.fd_flags, memo=seen))
            ctx = PassContext(pid, frozen, vmas)
            dirty = begin_tracking(tracker, ctx)
            try:
                base = live.coverage if live else parent.has if parent else None
                plan = plan_pass(pid, vmas, dirty, base)
                parent_digests = apply_compare(pid, plan, parent) if dirty.compare else None
                # --leave-running: copy now, compress and write after the thaw. A small
                # copy is read in one go either way (no bounce buffers, no reader thread).
                snapshot = None
                if live or opts.leave_running or pages(plan.copy) * PAGE_SIZE <= SMALL_COPY:
                    snapshot = snapshot_pages(pid, plan, reserve=reserve, limit=limit)
                layer = Layer(plan, snapshot, live)
                if not layer.in_memory or not opts.leave_running:
                    mem = store_memory(images, pid, layer, opts.compress_level, dirty.compare,
                                       parent_digests)
            finally:
                if tracker is not None:
                    with frozen.near():
                        tracker.end(ctx, keep=keep)
            files = collect_files(pid, opts.shell_job, hidden_fds(pid), flags=opts.fd_flags,
                                  memo=seen)
            segments = collect_segments(vmas)
            mapped = collect_mapped(pid, vmas, files)
            cgroups = cgroups_to_pb(read_cgroups(pid))
            info = collect_process(pid, frozen.leader, vmas, stopped=bool(frozen.stop_signal))
            deleted_cwd = collect_deleted_cwd(pid, info.cwd)
            frozen_at = frozen.frozen_at
            frozen_ms = (time.perf_counter() - frozen_at) * 1000
            if not opts.leave_running:
                stats = finish(mem, frozen_ms)
                if opts.before_kill is not None:
                    opts.before_kill()
                frozen.kill(then=opts.after_kill)
                if tracker is not None:
                    tracker.forget()
        if opts.leave_running:
            if layer.in_memory:
                mem = store_memory(images, pid, layer, opts.compress_level, dirty.compare,
                                   parent_digests)
            stats = finish(mem, frozen_ms)
    except BaseException:
        images.abandon()  # a directory it made is not left behind empty or incomplete
        raise
    finally:
        if tracker is not None:
            tracker.close()  # after the thaw: dropping the last uffd reference unprotects
    externals = tuple((fd, f.payload.external) for f in files if f.payload is not None
                      and f.payload.external for fd, _ in f.fds)
    return DumpResult(pid=pid, threads=len(states), vmas=len(vmas),
                      line=describe("dump", pid, name, stats), frozen_at=frozen_at,
                      externals=externals)


@dataclass
class LivePass:
    plan: PassPlan  # what changed since the parent, planned while the target ran
    snap: Snap | None  # its pages, read while the target ran; None: too many to hold
    coverage: list[Range]  # what its layer would resolve: the frozen pass's parent


def live_pass(opts: DumpOptions, tracker: Tracker | None, parent: Parent | None,
              ) -> LivePass | None:
    """The dump's pre-copy: with a tracker that re-arms atomically and needs no injected
    syscall (uffd-wp with its state intact), take what changed since the parent and read
    it with the target running. The frozen pass then copies only what is written after
    this (ckpt.pagecopy.staging merges the two)."""
    if (not opts.precopy or not opts.incremental or parent is None or tracker is None
            or not tracker.arms or tracker.begin_needs_freeze or tracker.prepare_needs_freeze()):
        return None
    ctx = PassContext(opts.pid, None, collect_vmas(opts.pid))
    tracker.prepare(ctx)
    dirty = tracker.begin(ctx)
    plan = plan_pass(opts.pid, ctx.vmas, dirty, parent.has)
    buf = snapshot_pages(opts.pid, plan, tolerate_unmapped=True)
    # range arithmetic over every changed run: done now, while the target runs
    return LivePass(plan, Snap(plan.copy, buf) if buf is not None else None,
                    live_coverage(plan))


class Layer:
    """What this dump stores, and where its bytes come from: the frozen pass's snapshot
    (``in_memory``), merged with the live pass's when there was one, or the frozen
    process itself (read while it still is)."""

    def __init__(self, frozen: PassPlan, snapshot: Snapshot | None, live: LivePass | None,
                 ) -> None:
        self.frozen, self.snapshot, self.live = frozen, snapshot, live
        self.in_memory = snapshot is not None and (live is None or live.snap is not None)
        self._plan: PassPlan | None = None if live else frozen

    @property
    def plan(self) -> PassPlan:
        """The merge is range arithmetic, left for after the thaw when it can wait."""
        if self._plan is None:
            assert self.live is not None
            self._plan = merge_plans(self.live.plan, self.frozen)
        return self._plan

    def views(self) -> Iterable[memoryview] | None:
        """The stored pages' bytes in order, or None: read them from the process."""
        if not self.in_memory:
            return None
        assert self.snapshot is not None
        if self.live is None:
            return chunks(self.snapshot)
        assert self.live.snap is not None
        return assemble(self.plan.copy, Snap(self.frozen.copy, self.snapshot), self.live.snap)


def begin_tracking(tracker: Tracker | None, ctx: PassContext) -> DirtySet:
    if tracker is None:
        return DirtySet(all_dirty="full dump")
    try:
        return tracker.begin(ctx)
    except BaseException:
        tracker.end(ctx, keep=False)
        raise


def store_memory(images: ImageDir, pid: int, layer: Layer, level: int, compare: bool,
                 parent_digests: DigestMap | None) -> MemoryResult:
    """Pages and pagemap (and, for compare, the digests of what was stored)."""
    stored: list[bytes] | None = [] if compare else None
    plan = layer.plan
    mem = write_memory(images, pid, plan, level, digests=stored, views=layer.views())
    if stored is not None:
        images.write_digests(pid, view_digests(plan, b"".join(stored), parent_digests))
    return mem
