"""userfaultfd write-protect in async mode + PAGEMAP_SCAN: soft-dirty that works here.

First pass (target frozen):
    inject userfaultfd() into the target    the uffd must live in the target's mm
    move it to a high fd, O_CLOEXEC         out of the way of the program's own fds
    pidfd_getfd → ckpt's copy               every ioctl from here on is ckpt's own
    UFFDIO_API(WP_ASYNC | WP_UNPOPULATED), REGISTER(WP) every trackable VMA, WRITEPROTECT
Later passes:
    PAGEMAP_SCAN WP_MATCHING on WRITTEN     get the written pages and re-arm, one ioctl
    PAGEMAP_SCAN inverted WPALLOWED         VMAs no longer registered: new, moved,
                                            replaced in place (maps can be identical!):
                                            copied whole, then registered and protected
Between passes the target's fd keeps tracking alive; tracker.img records its number and
inode so the next ckpt invocation can take it again, or see it is gone and fall back to
whole copies. The final pass closes it with an injected close(): no stray fd remains.
"""

from __future__ import annotations

import os
import sys

from ckpt import testpoint
from ckpt.collect import proc
from ckpt.collect.fds import list_fds
from ckpt.collect.inject import open_injector
from ckpt.collect.vmas import VmaInfo
from ckpt.errors import CkptError, KernelError
from ckpt.images.pb import image_pb2
from ckpt.kernel import pagemap as pm
from ckpt.kernel import uffd
from ckpt.kernel.sys import NR, PAGE_SIZE, pidfd_getfd, pidfd_open
from ckpt.pagecopy.plan import NO_PAGES, populated
from ckpt.ranges import Range, intersect, merge_sorted, normalize
from ckpt.track import ledger
from ckpt.track.base import DirtySet, PassContext, Tracker

F_DUPFD_CLOEXEC = 1030
HIGH_FD = 1000
USER_SPACE_END = (1 << 47) - 4096  # TASK_SIZE_MAX
UFFD_LINK = "anon_inode:[userfaultfd]"
HOLDS_DATA = pm.PAGE_IS_PRESENT | pm.PAGE_IS_SWAPPED
EXTENT = 2 << 20  # address space one page of PTEs maps
MARKER_BUDGET = 64 << 20  # page tables a pass may add to the process for its markers
DATA_MASK = HOLDS_DATA | pm.PAGE_IS_PFNZERO | pm.guard_category()


def holds_data(categories: int) -> bool:
    """Present or swapped, but not the shared zero page (a read fault's zeros) nor a guard
    region's marker (a swap-like entry that faults on any access)."""
    return bool(categories & HOLDS_DATA) and not categories & (pm.PAGE_IS_PFNZERO
                                                               | pm.PAGE_IS_GUARD)


def ckpt_uffds(pid: int) -> list[int]:
    """userfaultfds ckpt left in the target: at HIGH_FD and up (current or stale), and
    below it the one a ckpt killed before moving it left (see leftover_uffds)."""
    out = []
    for fd in list_fds(pid):
        if fd >= HIGH_FD:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == UFFD_LINK:
                    out.append(fd)
            except OSError:
                continue
    try:
        intent = ledger.uffd_intent(pid, proc.read_stat(pid).starttime)
    except CkptError:
        intent = False
    return out + (leftover_uffds(pid) if intent else [])


def uffd_without_api(fdinfo: str) -> bool:
    """An fdinfo of a userfaultfd on which UFFDIO_API was never called (``API:`` shows
    no features), opened O_CLOEXEC|O_NONBLOCK as ckpt opens its own."""
    fields = dict(line.split(":", 1) for line in fdinfo.splitlines() if ":" in line)
    try:
        flags = int(fields["flags"].strip(), 8)
        features = int(fields["API"].split(":")[1], 16)
    except (KeyError, ValueError, IndexError):
        return False
    want = os.O_CLOEXEC | os.O_NONBLOCK
    return flags & want == want and features == 0


def leftover_uffds(pid: int) -> list[int]:
    """Low-numbered userfaultfds that an earlier ckpt, killed between creating one and
    moving it to HIGH_FD, left behind (ckpt's intent is in the ledger: see _create)."""
    out = []
    for fd in list_fds(pid):
        if fd >= HIGH_FD:
            continue
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != UFFD_LINK:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                if uffd_without_api(f.read()):
                    out.append(fd)
        except OSError:
            continue
    return out


def marker_tables(pid: int, start: int, end: int, limit: int) -> int:
    """Bytes of page tables that write-protecting [start, end) adds to the process: with
    WP_UNPOPULATED every empty PTE gets a marker, so every 2 MiB extent without a page
    table gets one (4 KiB). Little for ordinary VMAs, but a sparse reservation of many
    GiB (a runtime's heap, ASan's shadow) costs 2 MiB per GiB. The upper bound when it
    is within ``limit``; else exactly, with the extents that hold a page (PAGEMAP_SCAN)."""
    extents = -(-end // EXTENT) - start // EXTENT
    if extents * PAGE_SIZE <= limit:
        return extents * PAGE_SIZE
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        found = populated(fd, start, end)
    finally:
        os.close(fd)
    used: set[int] = set()
    for lo, hi in found:
        used.update(range(lo // EXTENT, -(-hi // EXTENT)))
    return (extents - len(used)) * PAGE_SIZE


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def trackable(vmas: list[VmaInfo]) -> list[Range]:
    return normalize((v.start, v.end) for v in vmas if v.kind not in NO_PAGES)


class UffdWpTracker(Tracker):
    name = "uffd-wp"

    def __init__(self, pid: int, state: image_pb2.TrackerState | None) -> None:
        super().__init__(pid, state)
        self.fd = -1  # ckpt's copy of the uffd
        self.target_fd = -1
        self.inode = 0
        self.lost = ""

    # Scans re-arm atomically per page and registration works on a running target: only
    # creating the uffd (an injected syscall) needs the target stopped.
    begin_needs_freeze = False

    def prepare_needs_freeze(self) -> bool:
        return bool(self._lost())

    def prepare(self, ctx: PassContext) -> None:
        """Take the uffd the previous pass left in the target, or create one (frozen)."""
        self.lost = self._lost()
        if self.lost:
            self._create(ctx)
        else:
            self._take()

    # ------------------------------------------------------------------ pass
    def _begin(self, ctx: PassContext) -> DirtySet:
        if self.fd < 0:
            self.prepare(ctx)
        lost = self.lost
        scan_fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        try:
            if lost:
                out = DirtySet(all_dirty=lost)
                out.whole = self._arm(trackable(ctx.vmas), ctx.vmas)
                return out
            # Written pages, re-armed in the same ioctl; PRESENT/SWAPPED say which of them
            # hold data (a written page that is neither was dropped: MADV_DONTNEED).
            written = pm.pagemap_scan(scan_fd, 0, USER_SPACE_END, flags=pm.PM_SCAN_WP_MATCHING,
                                      category_mask=pm.PAGE_IS_WRITTEN,
                                      return_mask=pm.PAGE_IS_WRITTEN | DATA_MASK)
            untracked = pm.pagemap_scan(scan_fd, 0, USER_SPACE_END,
                                        category_inverted=pm.PAGE_IS_WPALLOWED,
                                        category_mask=pm.PAGE_IS_WPALLOWED,
                                        return_mask=pm.PAGE_IS_WPALLOWED)
            fresh = intersect(normalize((s, e) for s, e, _ in untracked), trackable(ctx.vmas))
            # Unregistered VMAs carry no PTE markers yet: PRESENT/SWAPPED are exact there.
            data = [(s, e) for s, e, c in written if holds_data(c)]
            for lo, hi in fresh:
                data += ((s, e) for s, e, c in pm.pagemap_scan(
                    scan_fd, lo, hi, category_anyof_mask=HOLDS_DATA, return_mask=DATA_MASK)
                    if holds_data(c))
        finally:
            os.close(scan_fd)
        failed = self._arm(fresh, ctx.vmas)
        bad = {(s, e) for s, e, _ in failed}
        whole = [(s, e, "not tracked: new, moved or replaced VMA") for s, e in fresh
                 if (s, e) not in bad]
        # PAGEMAP_SCAN reports regions in address order, disjoint: already normalized
        # but for neighbours that differ only in categories, which merge here cheaply.
        return DirtySet(dirty=merge_sorted([(s, e) for s, e, _ in written]),
                        whole=whole + failed, tracks_existence=True,
                        changed_data=normalize(data) if fresh else merge_sorted(data))

    def end(self, ctx: PassContext, keep: bool) -> None:
        if not keep and self.target_fd >= 0:
            self._inject(ctx, NR.close, self.target_fd, what="close(uffd)")
            self.target_fd = -1

    def close(self) -> None:
        """Drop ckpt's copy. If it was the last reference, the kernel unregisters and
        unprotects all memory, which costs time in proportion to its size: done after
        the thaw, never while the target is frozen."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


    def state(self) -> image_pb2.TrackerState:
        st = super().state()
        st.target_fd, st.uffd_inode = self.target_fd, self.inode
        return st

    # ------------------------------------------------------------------ setup
    def _lost(self) -> str:
        """'' if the previous pass's uffd is still in the target, else why not."""
        why = self.continuity()
        st = self.prev
        if why or st is None:
            return why
        link = f"/proc/{self.pid}/fd/{st.target_fd}"
        try:
            if os.readlink(link) != UFFD_LINK or os.stat(link).st_ino != st.uffd_inode:
                return f"tracking state lost (fd {st.target_fd} is no longer ckpt's userfaultfd)"
        except OSError:
            return f"tracking state lost (fd {st.target_fd} was closed)"
        return ""

    def _take(self) -> None:
        st = self.prev
        assert st is not None
        pidfd = pidfd_open(self.pid)
        try:
            self.fd = pidfd_getfd(pidfd, st.target_fd, self.pid)
        finally:
            os.close(pidfd)
        self.target_fd, self.inode = st.target_fd, st.uffd_inode

    def _create(self, ctx: PassContext) -> None:
        # A stale tracker of an earlier chain still holds VMAs registered (a VMA takes one
        # uffd only): close it so that the new one can register them.
        for stale in ckpt_uffds(self.pid):
            self._inject(ctx, NR.close, stale, what="close(stale uffd)")
            if stale < HIGH_FD:
                print(f"ckpt: closed fd {stale} of process {self.pid}: a userfaultfd an "
                      "earlier ckpt created and was killed before it moved it",
                      file=sys.stderr)
        # Born close-on-exec; should ckpt die before it reaches HIGH_FD, the intent noted
        # here lets the next pass recognise it (leftover_uffds) and close it.
        ledger.note_uffd_intent(self.pid, self.start_time)
        fd = self._inject(ctx, NR.userfaultfd, uffd.UFFD_CREATE_FLAGS, what="userfaultfd")
        testpoint.pause_at("uffd-created")
        high = self._inject(ctx, NR.fcntl, fd, F_DUPFD_CLOEXEC, HIGH_FD, what="fcntl",
                            check=False)
        if high >= 0:
            self._inject(ctx, NR.close, fd, what="close")
            fd = high
        ledger.clear_uffd_intent(self.pid, self.start_time)
        self.target_fd = fd
        pidfd = pidfd_open(self.pid)
        try:
            self.fd = pidfd_getfd(pidfd, fd, self.pid)
        finally:
            os.close(pidfd)
        self.inode = os.fstat(self.fd).st_ino
        uffd.uffd_api(self.fd, uffd.WP_ASYNC_FEATURES)

    def _arm(self, ranges: list[Range], vmas: list[VmaInfo]) -> list[tuple[int, int, str]]:
        """Register and write-protect; ranges that cannot be tracked come back as whole.
        So do ranges whose markers would cost the process more page tables than
        MARKER_BUDGET allows for this pass (see marker_tables): a range over it is
        decided VMA by VMA, so that a dense heap next to a huge sparse reservation of the
        same runtime is still tracked."""
        failed: list[tuple[int, int, str]] = []
        budget = MARKER_BUDGET
        for start, end in ranges:
            cost = marker_tables(self.pid, start, end, budget)
            if cost <= budget:
                budget -= cost
                failed += self._protect(start, end)
                continue
            for a, b in ((max(start, v.start), min(end, v.end)) for v in vmas
                         if v.start < end and v.end > start):
                cost = marker_tables(self.pid, a, b, budget)
                if cost > budget:
                    failed.append((a, b, f"not tracked: write-protecting {_size(b - a)} of "
                                   f"mostly empty address space would add {_size(cost)} of "
                                   "page tables to the process"))
                    continue
                budget -= cost
                failed += self._protect(a, b)
        return failed

    def _protect(self, start: int, end: int) -> list[tuple[int, int, str]]:
        """Register and write-protect one range; [why not] if the kernel refuses."""
        try:
            uffd.uffd_register_wp(self.fd, start, end - start)
            uffd.uffd_writeprotect(self.fd, start, end - start)
        except KernelError as exc:
            return [(start, end, f"cannot be tracked ({os.strerror(exc.errno)})")]
        return []

    def _inject(self, ctx: PassContext, nr: int, *args: int, what: str, check: bool = True,
                ) -> int:
        if ctx.frozen is None:
            raise CkptError("internal: uffd-wp injects syscalls only into a frozen target")
        leader = ctx.frozen.leader
        inj = open_injector(self.pid, leader, leader.getregs(), ctx.vmas)
        try:
            return inj(nr, *args, what=what) if check else inj.raw(nr, *args)
        finally:
            inj.restore()
