"""`ckpt dump`: a consistent checkpoint of a process and its descendants (a tree: each
step runs for every member, in pre-order; ckpt.actions.member), as a straight checklist.

    parent + preflight (target runs)   parent chain valid, pid, kernel thread, and what a
                                       restore could not bring back (ckpt.collect.restorable)
    freeze                             seize + interrupt every thread of every member
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

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckpt.actions.member import MemberDump, hidden_fds, preflight, zombie_core
from ckpt.actions.passes import (
    Parent,
    describe,
    inventory,
    open_parent,
    refusals_of,
    snapshot_limit,
)
from ckpt.collect import proc
from ckpt.collect.fdkinds.base import GHOST_LIMIT, FdFlags
from ckpt.collect.fds import read_fds
from ckpt.collect.holders import TreeView
from ckpt.collect.shape import read_members, shape_refusal, zombie_children
from ckpt.collect.treecheck import read_sharing, sharing_refusal
from ckpt.errors import CkptError, NoSuchProcess, NotDumpable
from ckpt.freeze.tree import FrozenTree, list_tree
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.pb import image_pb2
from ckpt.kernel.creds import require_root
from ckpt.tree import preorder

__all__ = ["DumpOptions", "DumpResult", "dump", "hidden_fds", "preflight"]


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
    cold: bool = False  # ... restored cold at the destination: a tree (FdFlags.cold)
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
                       migrating=self.migrating, cold=self.cold)


@dataclass(frozen=True)
class DumpResult:
    pid: int
    threads: int
    vmas: int
    line: str  # what the pass cost and stored, for the user
    frozen_at: float  # time.perf_counter() when the target was frozen
    # (fd, object) of each fd whose object leads outside the dump: restore --inherit-fd
    externals: tuple[tuple[int, str], ...] = ()
    pids: tuple[int, ...] = ()  # every member of the dump, pre-order, root first


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
    if not proc.pid_exists(pid):
        raise NoSuchProcess(pid)
    members = prepare_members(opts, list_tree(pid), parent)
    everyone = list(members)  # with members forked during the freeze: trackers to close
    images = ImageDir.new_pass(opts.images_dir, opts.overwrite)
    root = members[0]
    try:
        limit = snapshot_limit()  # read before the freeze, not in it
        for m in members[1:]:  # a statistic: counted with the tree running, before the
            m.count_cow()  # live pass reads (and unshares) any page
        for m in members:
            m.before_freeze(limit)
        with FrozenTree(pid) as frozen:
            tree = tree_view(frozen.pids) if len(frozen.pids) > 1 or frozen.zombies else None
            # forks, exits (and pids reused) since the checks
            members = settle_members(opts, members, frozen.pids, tree)
            everyone += [m for m in members if m not in everyone]
            refuse_sharing(frozen.pids)
            for m in members[1:]:
                if m.cow is None:  # forked since the checks
                    m.count_cow()
            for m in members:
                m.collect_frozen(frozen.members[m.pid], images, limit, tree)
            zombies = [zombie_core(z) for z in frozen.zombies]
            if tree is not None and (why := shape_refusal(read_members(
                    frozen.pids, frozen.zombies, {m.pid: m.subreaper for m in members}),
                    opts.shell_job)):  # exact now: the subreapers are known
                raise NotDumpable(why)
            order = preorder(pid, {p: frozen.ppid[p] for p in [*frozen.pids, *frozen.zombies]})
            frozen_at = frozen.frozen_at
            frozen_ms = (time.perf_counter() - frozen_at) * 1000
            if not opts.leave_running:
                stats = finish(opts, images, members, zombies, order, parent, frozen_ms,
                               t_start)
                if opts.before_kill is not None:
                    opts.before_kill()
                frozen.kill(then=opts.after_kill)
                for m in members:
                    if m.tracker is not None:
                        m.tracker.forget()
        if opts.leave_running:
            stats = finish(opts, images, members, zombies, order, parent, frozen_ms, t_start)
    except BaseException:
        images.abandon()  # a directory it made is not left behind empty or incomplete
        raise
    finally:
        for m in everyone:
            if m.tracker is not None:
                m.tracker.close()  # after the thaw: dropping the last uffd reference unprotects
    return DumpResult(pid=pid, threads=sum(len(m.states) for m in members),
                      vmas=sum(len(m.vmas) for m in members),
                      line=describe("dump", pid, root.tracker_name, stats), frozen_at=frozen_at,
                      externals=tuple(e for m in members for e in m.externals()),
                      pids=tuple(order))


def prepare_members(opts: DumpOptions, pids: list[int], parent: Parent | None,
                    ) -> list[MemberDump]:
    """Every member's preflight and parent, the tree still running untouched."""
    tree = tree_view(pids) if len(pids) > 1 or proc.list_children(pids[0]) else None
    refuse_sharing(pids)
    if tree is not None and (why := shape_refusal(
            read_members(pids, zombie_children(pids)), opts.shell_job)):
        raise NotDumpable(why)
    return [check_member(opts, member, tree, parent, root=n == 0)
            for n, member in enumerate(pids)]


def check_member(opts: DumpOptions, member: int, tree: TreeView | None,
                 parent: Parent | None, root: bool) -> MemberDump:
    """One member's preflight (naming it) and parent pass (the root's: ``parent``)."""
    started = start_time(member)  # first: a pid reused meanwhile shows at the freeze
    memo: dict[Any, Any] = {}  # the fd kinds' reads, shared with the frozen collection
    with refusals_of(member, tree is not None):  # say which member
        early = preflight(opts, member, tree, memo)
    prev = parent if root else open_parent(opts.images_dir, opts.prev_images_dir, member,
                                            member=True)
    return MemberDump(opts, member, prev, early, memo, started)


def start_time(pid: int) -> int:
    try:
        return proc.read_stat(pid).starttime
    except NoSuchProcess:
        return -1


def settle_members(opts: DumpOptions, members: list[MemberDump], frozen: list[int],
                   tree: TreeView | None) -> list[MemberDump]:
    """The members the freeze found, in its pre-order. One that exited since the checks
    is left out (the freeze recorded it as a zombie, or it is gone); one forked since,
    or under the pid of one that exited (another start time), is checked now, frozen:
    the same refusals, and a full copy (no parent pass has it)."""
    known = {m.pid: m for m in members}
    return [known[p] if p in known and known[p].start_time == start_time(p)
            else check_member(opts, p, tree, None, root=False) for p in frozen]


def refuse_sharing(pids: list[int]) -> None:
    """Members sharing an address space, fd table or fs state (ckpt.collect.treecheck)."""
    if len(pids) > 1 and (why := sharing_refusal(read_sharing(pids))):
        raise NotDumpable(why)


def tree_view(pids: list[int]) -> TreeView:
    """The members and their fd records, for the fd kinds (ckpt.collect.fdkinds)."""
    return TreeView(tuple(pids), {p: [i for i in read_fds(p) if i.fd not in hidden_fds(p)]
                                  for p in pids})


def finish(opts: DumpOptions, images: ImageDir, members: list[MemberDump],
           zombies: list[pb.ProcessEntry], order: list[int], parent: Parent | None,
           frozen_ms: float, t_start: float) -> image_pb2.DumpStats:
    """Every member's core and tracker state, then the inventory, last."""
    total = (time.perf_counter() - t_start) * 1000
    saved: set[int] = set()  # System V segments: saved once, by the first member
    for m in members:
        m.segments = [s for s in m.segments if s.shmid not in saved]
        saved |= {s.shmid for s in m.segments}
    each = [m.write(images, frozen_ms, total) for m in members]
    for z in zombies:
        images.write_core(z.pid, z)
    stats = merge_stats(each)
    root = members[0]
    inv = inventory(opts.pid, "dump", parent, root.tracker_name, stats,
                    len(root.states[0].xstate), opts.shell_job)
    inv.pids[:] = order
    images.write_inventory(inv)
    return stats


def merge_stats(each: list[image_pb2.DumpStats]) -> image_pb2.DumpStats:
    """One pass's figures over every member (frozen time: the tree's, once)."""
    if len(each) == 1:
        return each[0]
    out = image_pb2.DumpStats(frozen_ms=each[0].frozen_ms, total_ms=each[0].total_ms)
    for s in each:
        out.pages_scanned += s.pages_scanned
        out.pages_written += s.pages_written
        out.pages_in_parent += s.pages_in_parent
        out.bytes_written += s.bytes_written
        out.copy_ms += s.copy_ms
        out.pages_precopied += s.pages_precopied
        out.cow_shared_bytes += s.cow_shared_bytes
        out.whole_vmas.extend(s.whole_vmas)
    return out
