"""What predump and incremental dump share: the parent link, the tracker, the memory of
one pass (pages + pagemap) and its statistics."""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ckpt.collect import proc
from ckpt.collect.vmas import VmaInfo
from ckpt.errors import ImageError, NotDumpable
from ckpt.images import FORMAT_VERSION, ImageDir
from ckpt.images.chain import parent_coverage
from ckpt.images.pagemap import Pagemap
from ckpt.images.pb import image_pb2
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.compare import NO_DIGEST, DigestMap, dedupe, digest_pages, digest_view
from ckpt.pagecopy.copy import copy_runs, read_into
from ckpt.pagecopy.incremental import PassPlan, pages
from ckpt.pagecopy.plan import NO_PAGES, existing_pages
from ckpt.pagecopy.staging import Snapshot
from ckpt.ranges import Range, total, union
from ckpt.track import Tracker, choose_backend, open_tracker


@dataclass
class Parent:
    """The previous pass: where it is, relative to the new images dir, and what it has."""

    images: ImageDir
    link: str  # as recorded in inventory.parent (relative to the new images dir)
    has: list[Range]
    tracker_state: image_pb2.TrackerState | None
    image_id: str  # its identity: the new pass records it as parent_id


def open_parent(images_dir: str, prev: str | None, pid: int, member: bool = False,
                ) -> Parent | None:
    """Open and validate the parent chain before anything touches the target. A tree's
    ``member`` (not its root) that the parent does not hold, or whose pid the parent saw
    on another process (member_parent_refused), gets None: a full copy."""
    if not prev:
        return None
    path = os.path.normpath(os.path.join(images_dir, prev))
    parent = ImageDir.open(path)
    inv = parent.read_inventory()
    if member and member_parent_refused(
            pid in inv.pids, recorded_start(parent, pid) if pid in inv.pids else 0,
            proc.read_stat(pid).starttime):
        return None  # new, or its pid reused: a full copy
    if pid not in inv.pids:
        raise ImageError(f"parent images {path} are of pid(s) {list(inv.pids)}, not {pid}")
    if not inv.image_id:
        raise ImageError(f"parent images {path} have no identity (written by an older ckpt): "
                         "start a new chain")
    has = parent_coverage(parent, pid)
    parent.check_pages(pid)
    return Parent(parent, prev, has, parent.read_tracker(pid), inv.image_id)


def member_parent_refused(in_parent: bool, recorded: int, now: int) -> str:
    """'' if a tree member's pages in the parent pass are its own, else why not: it is
    new since then, or its pid now names another process (``recorded``, the start time
    the parent saw, 0 if it kept none, differs from ``now``)."""
    if not in_parent:
        return "new since the parent pass"
    if recorded and recorded != now:
        return "its pid was reused by another process since the parent pass"
    return ""


def recorded_start(parent: ImageDir, pid: int) -> int:
    """The start time the parent pass recorded for ``pid``: in its tracking state (every
    predump), else in its core image (a dump); 0 if neither."""
    state = parent.read_tracker(pid)
    if state is not None and state.start_time:
        return state.start_time
    return parent.read_core(pid).start_time if parent.exists("core", pid) else 0


@contextlib.contextmanager
def refusals_of(pid: int, tree: bool) -> Iterator[None]:
    """In a tree (``tree``), a refusal met while checking member ``pid`` is said of it:
    'fd 3 is a character device ...' must say whose fd 3."""
    try:
        yield
    except NotDumpable as exc:
        if not tree:
            raise
        raise NotDumpable(of_member(pid, str(exc))) from None


def of_member(pid: int, why: str) -> str:
    """``why``, naming process ``pid`` unless it already does."""
    return why if re.search(rf"\bprocess {pid}\b", why) else f"process {pid}: {why}"


def select_tracker(track: str, pid: int, parent: Parent | None) -> Tracker:
    prev = parent.tracker_state if parent else None
    return open_tracker(choose_backend(track, prev), pid, prev)


def apply_compare(pid: int, plan: PassPlan, parent: Parent | None,
                  tolerate_unmapped: bool = False) -> DigestMap | None:
    """Compare backend: digest every existing page and keep in the copy only those that
    differ from the parent's digests. Returns the parent's digests, for view_digests."""
    blob = parent.images.read_digests(pid) if parent else None
    if parent is None or blob is None:
        return None
    parent_map = DigestMap(parent.has, blob)
    digests = digest_pages(pid, plan.copy, tolerate_unmapped)
    plan.copy, plan.in_parent = dedupe(plan.copy, digests, parent_map)
    return parent_map


def view_digests(plan: PassPlan, stored: bytes, parent: DigestMap | None) -> bytes:
    """Digests of every page of the new image's view, each matching the bytes a restore
    would get: copied pages as stored (not as first digested: the target may have
    changed them in between), unchanged pages as the parent has them."""
    own = DigestMap(plan.copy, stored)
    out = []
    for start, end in union(plan.copy, plan.in_parent):
        for addr in range(start, end, PAGE_SIZE):
            out.append(own.get(addr) or (parent.get(addr) if parent else None) or NO_DIGEST)
    return b"".join(out)


@dataclass
class MemoryResult:
    pages_written: int
    pages_in_parent: int
    stored_bytes: int
    copy_ms: float


SNAPSHOT_FLOOR = 256 << 20  # bytes a snapshot may always take


def snapshot_limit() -> int:
    """How many bytes of pages a pass may hold in memory: a quarter of what the machine
    has available, at least SNAPSHOT_FLOOR."""
    return max(SNAPSHOT_FLOOR, proc.mem_available() // 4)


def snapshot_buffer(size: int) -> mmap.mmap:
    """Memory for a snapshot, populated up front (one mmap), not faulted in a page at a
    time while the kernel copies into it."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def reserve_snapshot(pid: int, vmas: list[VmaInfo], limit: int) -> mmap.mmap | None:
    """A buffer for the pages a full dump will snapshot, taken while the target still
    runs (allocating a GiB can take longer than copying it): what exists now, plus room
    to grow; None if that is more than ``limit`` (snapshot_limit()) bytes."""
    exists, _ = existing_pages(pid, [v for v in vmas if v.kind not in NO_PAGES])
    size = total(exists) * 11 // 10 + (4 << 20)
    return snapshot_buffer(size) if size <= limit else None


def snapshot_pages(pid: int, plan: PassPlan, tolerate_unmapped: bool = False,
                   reserve: mmap.mmap | None = None, limit: int | None = None,
                   ) -> Snapshot | None:
    """The plan's pages, copied into memory (the cheap part of a frozen dump), so that
    compressing and writing them can wait until the target runs again; None if they are
    more than ``limit`` bytes (default: snapshot_limit(), which reads /proc/meminfo: a
    frozen pass passes the limit it took before the freeze). Read into ``reserve`` if it
    is large enough."""
    size = pages(plan.copy) * PAGE_SIZE
    if size > (snapshot_limit() if limit is None else limit):
        return None
    if not size:
        return memoryview(bytearray())
    if reserve is not None and len(reserve) < size:
        reserve.close()  # outgrown: freed before a bigger one is taken, never both at once
        reserve = None
    buf = reserve if reserve is not None else snapshot_buffer(size)
    read_into(pid, plan.copy_runs(), buf, tolerate_unmapped)
    return memoryview(buf)[:size]


def chunks(snapshot: Snapshot, size: int = 64 << 20) -> Iterable[memoryview]:
    return (snapshot[at : at + size] for at in range(0, len(snapshot), size))


def write_memory(images: ImageDir, pid: int, plan: PassPlan, level: int,
                 tolerate_unmapped: bool = False, digests: list[bytes] | None = None,
                 views: Iterable[memoryview] | None = None) -> MemoryResult:
    """Copy the plan's pages (from the process, or from ``views``: their bytes in order,
    already read) into pages-PID.img and write pagemap-PID.img; with ``digests``, also
    collect the digest of every page stored."""
    t0 = time.perf_counter()
    runs = plan.copy_runs()
    with images.pages_writer(pid, level=level) as writer:
        def sink(view: memoryview) -> None:
            writer.write(view)
            if digests is not None:
                digests.append(digest_view(view))

        if views is None:
            copy_runs(pid, runs, sink, tolerate_unmapped=tolerate_unmapped)
        else:
            for view in views:
                sink(view)
    copy_ms = (time.perf_counter() - t0) * 1000
    images.write_pagemap(
        pid, image_pb2.PagemapHead(pid=pid, pages_file_raw_bytes=pages(plan.copy) * PAGE_SIZE),
        Pagemap(plan.copy, plan.in_parent))
    return MemoryResult(pages(plan.copy), pages(plan.in_parent), writer.stored_bytes, copy_ms)


def pass_stats(plan: PassPlan, mem: MemoryResult, frozen_ms: float, total_ms: float,
               ) -> image_pb2.DumpStats:
    stats = image_pb2.DumpStats(
        pages_scanned=plan.scanned_pages, pages_written=mem.pages_written,
        pages_in_parent=mem.pages_in_parent, bytes_written=mem.stored_bytes,
        frozen_ms=frozen_ms, copy_ms=mem.copy_ms, total_ms=total_ms,
        pages_precopied=plan.precopied)
    for s, e, why in plan.whole:
        stats.whole_vmas.add(start=s, end=e, reason=why)
    return stats


def inventory(pid: int, kind: str, parent: Parent | None, tracker: str, stats:
              image_pb2.DumpStats, xstate_size: int = 0, shell_job: bool = False,
              ) -> image_pb2.Inventory:
    return image_pb2.Inventory(
        format_version=FORMAT_VERSION, root_pid=pid, pids=[pid], kind=kind,
        parent=parent.link if parent else "", tracker=tracker, created_unix=time.time(),
        kernel_release=os.uname().release, xstate_size=xstate_size, shell_job=shell_job,
        stats=stats, image_id=secrets.token_hex(16),
        parent_id=parent.image_id if parent else "")


def describe(kind: str, pid: int, tracker: str, stats: image_pb2.DumpStats) -> str:
    """The line predump/dump print: what this pass cost and stored."""
    whole = ""
    if stats.whole_vmas:
        reasons = sorted({w.reason for w in stats.whole_vmas})
        whole = f", {len(stats.whole_vmas)} whole VMA(s): {'; '.join(reasons)}"
    live = f" ({stats.pages_precopied} before the freeze)" if stats.pages_precopied else ""
    return (f"{kind} of pid {pid} ({tracker}): {stats.pages_scanned} pages scanned, "
            f"{stats.pages_written} written{live}, {stats.pages_in_parent} in parent, "
            f"{stats.bytes_written / 2**20:.2f} MiB stored; frozen {stats.frozen_ms:.1f} ms, "
            f"copy {stats.copy_ms:.1f} ms, total {stats.total_ms:.1f} ms{whole}")
