"""One process of a dump (the target, or one member of a tree): what it needs before the
freeze, what it collects while frozen, and the images it writes (ckpt.actions.dump runs
these steps for every member in pre-order)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt.actions.core_image import ProcessInfo, build_core, ids_to_pb
from ckpt.actions.passes import (
    MemoryResult,
    Parent,
    apply_compare,
    chunks,
    pass_stats,
    reserve_snapshot,
    select_tracker,
    snapshot_pages,
    view_digests,
    write_memory,
)
from ckpt.collect import proc, shmem
from ckpt.collect.cgroups import cgroups_to_pb, read_cgroups
from ckpt.collect.cow import cow_shared_bytes
from ckpt.collect.creds import read_creds
from ckpt.collect.deletedcwd import collect_deleted_cwd
from ckpt.collect.files import FileRecord, collect_files
from ckpt.collect.holders import TreeView
from ckpt.collect.inject import find_gadgets
from ckpt.collect.mappedfiles import WHOLE as MAPPED_WHOLE
from ckpt.collect.mappedfiles import collect_mapped, shared_spans
from ckpt.collect.mlockall import refusal as mlockall_refusal
from ckpt.collect.pstate import collect_settings
from ckpt.collect.restorable import read_target, require_restorable
from ckpt.collect.sysvshm import attaches, collect_segments
from ckpt.collect.tasks import InjectedState, ThreadState, collect_injected, collect_thread
from ckpt.collect.vmas import VmaInfo, collect_vmas
from ckpt.errors import NoSuchProcess, NotDumpable
from ckpt.freeze.seize import Frozen
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.pb import image_pb2
from ckpt.images.siginfo import STOPPED_MARK
from ckpt.kernel import prctl
from ckpt.kernel.ptrace import Tracee
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.compare import DigestMap
from ckpt.pagecopy.incremental import PassPlan, pages, plan_pass
from ckpt.pagecopy.staging import Snap, Snapshot, assemble, live_coverage, merge_plans
from ckpt.ranges import Range
from ckpt.track import DirtySet, PassContext, Tracker
from ckpt.track.uffd_wp import ckpt_uffds

if TYPE_CHECKING:
    from ckpt.actions.dump import DumpOptions

SYSV_WHOLE = "System V shared memory: saved whole in the core image"
SMALL_COPY = 32 << 20  # bytes: read at once into memory, then stored


def hidden_fds(pid: int) -> set[int]:
    """userfaultfds earlier passes left in the target are ckpt's, not the process's."""
    return set(ckpt_uffds(pid))


def preflight(opts: DumpOptions, pid: int | None = None, tree: TreeView | None = None,
              memo: dict[Any, Any] | None = None) -> list[VmaInfo]:
    """Refuse what we cannot dump while the target still runs untouched."""
    pid = opts.pid if pid is None else pid
    if pid <= 0 or not proc.pid_exists(pid):
        raise NoSuchProcess(pid)
    if proc.is_kernel_thread(pid):
        raise NotDumpable(f"process {pid} is a kernel thread")
    if pid == os.getpid():
        raise NotDumpable("ckpt cannot dump itself")
    if proc.read_status(pid).state in ("Z", "X"):
        raise NotDumpable(f"process {pid} is a zombie")
    return require_restorable(read_target(pid, opts.shell_job, hidden_fds(pid),
                                          flags=opts.fd_flags, memo=memo, tree=tree))


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


@dataclass
class LivePass:
    plan: PassPlan  # what changed since the parent, planned while the target ran
    snap: Snap | None  # its pages, read while the target ran; None: too many to hold
    coverage: list[Range]  # what its layer would resolve: the frozen pass's parent


def live_pass(opts: DumpOptions, pid: int, tracker: Tracker | None, parent: Parent | None,
              ) -> LivePass | None:
    """The dump's pre-copy: with a tracker that re-arms atomically and needs no injected
    syscall (uffd-wp with its state intact), take what changed since the parent and read
    it with the target running. The frozen pass then copies only what is written after
    this (ckpt.pagecopy.staging merges the two)."""
    if (not opts.precopy or not opts.incremental or parent is None or tracker is None
            or not tracker.arms or tracker.begin_needs_freeze or tracker.prepare_needs_freeze()):
        return None
    ctx = PassContext(pid, None, collect_vmas(pid))
    tracker.prepare(ctx)
    dirty = tracker.begin(ctx)
    plan = plan_pass(pid, ctx.vmas, dirty, parent.has)
    buf = snapshot_pages(pid, plan, tolerate_unmapped=True)
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


class MemberDump:
    """One process of the dump, from its preflight to its images."""

    def __init__(self, opts: DumpOptions, pid: int, parent: Parent | None,
                 early_vmas: list[VmaInfo], memo: dict[Any, Any], start_time: int = -1,
                 ) -> None:
        self.opts, self.pid, self.parent = opts, pid, parent
        self.start_time = start_time  # at the checks (stat field 22)
        self.early_vmas, self.memo = early_vmas, memo
        self.tracker = select_tracker(opts.track, pid, parent) \
            if opts.incremental or opts.track_mem else None
        self.live: LivePass | None = None
        self.reserve: Any = None
        # collected while frozen
        self.vmas: list[VmaInfo] = []
        self.states: list[ThreadState] = []
        self.files: list[FileRecord] = []
        self.dirty = DirtySet()
        self.mem: MemoryResult | None = None
        self.cow: int | None = None  # None: not counted (the root's never is)
        self.shm: dict[int, shmem.Placement] = {}  # by VMA start: memory other members map

    @property
    def subreaper(self) -> bool:
        """PR_SET_CHILD_SUBREAPER, as read while frozen."""
        return bool(self.injected.settings.get("child_subreaper"))

    @property
    def tracker_name(self) -> str:
        return self.tracker.name if self.tracker else "none"

    @property
    def keep(self) -> bool:
        return self.opts.track_mem and self.opts.leave_running

    def before_freeze(self, limit: int) -> None:
        """The live pass (dump --incremental), the snapshot's memory (--leave-running),
        and the injection's gadgets looked for (the frozen injection checks them again)."""
        self.live = live_pass(self.opts, self.pid, self.tracker, self.parent)
        if self.opts.leave_running and self.parent is None:
            self.reserve = reserve_snapshot(self.pid, self.early_vmas, limit)
        find_gadgets(self.pid, self.early_vmas)

    def count_cow(self) -> None:
        """Private pages still shared copy-on-write with another member (after fork): a
        restore makes private copies (`ckpt show` says how much more memory). The root's
        are not counted: its copy is the one the others shared. Counted for every member
        before any is copied: reading pages with process_vm_readv pins them, and a
        read-only pin of a shared anonymous page unshares it (Linux 5.19+)."""
        self.cow = cow_shared_bytes(self.pid, self.early_vmas)

    def collect_frozen(self, frozen: Frozen, images: ImageDir, limit: int,
                       tree: TreeView | None) -> None:
        """Everything of the process, read while it (and its whole tree) is frozen."""
        pid, opts = self.pid, self.opts
        threads = frozen.threads()
        # The injections map a scratch page and unmap it again: the layout read
        # before them is the one after (but for VmFlags soft-dirty reads afresh).
        vmas = collect_vmas(pid, known=self.early_vmas)
        with frozen.near():  # ptrace round trips
            self.states = [collect_thread(t) for t in threads]
            self.injected: InjectedState = collect_injected(pid, threads, self.states, vmas)
        if why := mlockall_refusal(self.injected.mlockall):  # known only while frozen
            raise NotDumpable(f"process {pid}: {why}")
        if pid == opts.pid:  # the root: its restored parent is not its parent
            for state in self.states:
                if found := prctl.root_refused(state.settings):
                    raise NotDumpable(
                        f"thread {state.tid} has {found[0]}, which a restore cannot set "
                        "again (its parent would be ckpt): not supported")
        tracker = self.tracker
        if tracker is not None and tracker.needs_fresh_vmflags:
            vmas = collect_vmas(pid)
        self.vmas = vmas
        require_restorable(read_target(pid, opts.shell_job, hidden_fds(pid), vmas,
                                       opts.fd_flags, memo=self.memo, tree=tree))
        # anonymous shared memory other members map: the owner stores it whole, the
        # others not at all (ckpt.collect.shmem)
        self.shm = shm = shmem.placements(pid, vmas, tree.pids if tree else (pid,))
        theirs = shmem.not_owned(pid, vmas, shm)
        ctx = PassContext(pid, frozen, vmas)
        dirty = self.dirty = begin_tracking(tracker, ctx)
        dirty.whole = dirty.whole + shmem.owned_whole(pid, vmas, shm)
        try:
            base = self.live.coverage if self.live else self.parent.has if self.parent \
                else None
            plan = plan_pass(pid, [v for v in vmas if (v.start, v.end) not in theirs], dirty,
                             base)
            self.parent_digests = apply_compare(pid, plan, self.parent) \
                if dirty.compare else None
            # --leave-running: copy now, compress and write after the thaw. A small
            # copy is read in one go either way (no bounce buffers, no reader thread).
            snapshot = None
            if self.live or opts.leave_running or pages(plan.copy) * PAGE_SIZE <= SMALL_COPY:
                snapshot = snapshot_pages(pid, plan, reserve=self.reserve, limit=limit)
            self.layer = Layer(plan, snapshot, self.live)
            if not self.layer.in_memory or not opts.leave_running:
                self.store(images)
        finally:
            if tracker is not None:
                with frozen.near():
                    tracker.end(ctx, keep=self.keep)
        self.files = collect_files(pid, opts.shell_job, hidden_fds(pid), flags=opts.fd_flags,
                                   memo=self.memo, tree=tree)
        self.segments = collect_segments(vmas)
        self.mapped = collect_mapped(pid, vmas, self.files, tree)
        self.cgroups = cgroups_to_pb(read_cgroups(pid))
        self.info = collect_process(pid, frozen.leader, vmas, stopped=bool(frozen.stop_signal))
        self.deleted_cwd = collect_deleted_cwd(pid, self.info.cwd)

    def store(self, images: ImageDir) -> None:
        """Pages and pagemap, once (a --leave-running snapshot: after the thaw)."""
        if self.mem is None:
            self.mem = store_memory(images, self.pid, self.layer, self.opts.compress_level,
                                    self.dirty.compare, self.parent_digests)

    def write(self, images: ImageDir, frozen_ms: float, total_ms: float,
              ) -> image_pb2.DumpStats:
        """Everything after the pages: core and tracker state; this member's stats."""
        self.store(images)
        assert self.mem is not None
        core = build_core(self.pid, self.info, self.states, self.injected, self.vmas,
                          self.files)
        for v in core.vmas:
            if (placed := self.shm.get(v.start)) is not None:
                v.shmid, v.shm_owner, v.shm_start = placed.shmid, placed.owner, placed.start
        core.sysv_shm.extend(self.segments)
        core.cgroups.extend(self.cgroups)
        core.mapped_objects.extend(self.mapped)
        if self.deleted_cwd is not None:
            core.deleted_cwd.CopyFrom(self.deleted_cwd)
        s = self.info.stat
        core.exit_signal, core.start_time = s.exit_signal, s.starttime
        images.write_core(self.pid, core)
        if self.tracker is not None and self.keep:
            images.write_tracker(self.pid, self.tracker.state())
        stats = pass_stats(self.layer.plan, self.mem, frozen_ms, total_ms)
        stats.cow_shared_bytes = self.cow or 0
        for a in attaches(self.vmas):
            stats.whole_vmas.add(start=a.base, end=a.end, reason=SYSV_WHOLE)
        for start, end in shared_spans(self.vmas):
            stats.whole_vmas.add(start=start, end=end, reason=MAPPED_WHOLE)
        return stats

    def externals(self) -> list[tuple[int, str]]:
        return [(fd, f.payload.external) for f in self.files if f.payload is not None
                and f.payload.external for fd, _ in f.fds]


def zombie_core(pid: int) -> pb.ProcessEntry:
    """A zombie member: its ids, name, wait status, user and group ids (one ThreadCore
    with only tid and creds: /proc/Z/status still shows them), nothing else (it runs no
    more). Not its cgroups: /proc/Z/cgroup shows every root (restore puts it in its
    parent's, where it was most likely born)."""
    s = proc.read_stat(pid)
    ids = ids_to_pb(read_creds(pid, pid))
    return pb.ProcessEntry(pid=pid, ppid=s.ppid, pgid=s.pgrp, sid=s.session, comm=s.comm,
                           zombie=True, exit_status=s.exit_code, exit_signal=s.exit_signal,
                           start_time=s.starttime, threads=[pb.ThreadCore(tid=pid, creds=ids)])
