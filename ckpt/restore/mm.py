"""Rebuild the address space inside the stub.

    1. unmap everything of the stub but the gadget and the kernel's special mappings
    2. move [vvar] [vvar_vclock] [vdso] as a group to the dumped addresses (the dumped code
       calls into the vdso, and glibc caches its address)
    3. map every VMA at its address: anonymous, or the file at its offset (checked to be the
       same inode), or anonymous shared memory another member of the tree owns (its
       object, restored first: Backing.borrowed), with its madvise flags (MAP_TIME_FLAGS);
       VMAs that were writable once (VM_ACCOUNT, e.g. RELRO) are mapped RW and made
       read-only after the fill, so they do not merge with their neighbours
    4. fill pages (ckpt.restore.pages), then mprotect back
    5. mlock, mseal, guard regions installed again (finish_vmas; the order is explained
       there)
    6. PR_SET_MM_MAP: code/data/brk/stack/arg/env bounds, auxv and the exe link

Which VmFlags come back how: ckpt.collect.vmflags (the ones no step here sets are refused
before the dump).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping

from ckpt.collect.mappedfiles import Made
from ckpt.collect.maps import MapEntry, read_maps
from ckpt.collect.proc import read_text
from ckpt.collect.vmas import KERNEL_PROVIDED, SHMEM_NAMES, VmaKind
from ckpt.collect.vmflags import BY_MNEMONIC, MADVICE
from ckpt.errors import CkptError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.pagemap import PM_FILE, PM_PRESENT, PM_SWAP, read_pagemap_entries
from ckpt.kernel.sys import NR
from ckpt.restore.stub import GADGET_LEN, Stub
from ckpt.restore.taker import Taker

PROT_WRITE = 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x1, 0x2, 0x10, 0x20, 0x100
MAP_NORESERVE = 0x4000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PR_SET_MM, PR_SET_MM_MAP = 35, 14
VDSO_GROUP = ("[vvar]", "[vvar_vclock]", "[vdso]")
KEEP = frozenset({*VDSO_GROUP, "[vsyscall]"})
NO_EXE_FD = 0xFFFFFFFF
MAP_DROPPABLE = 0x08  # a map type of its own, instead of MAP_PRIVATE ("dp")
MLOCK_ONFAULT = 1
PAGE = 4096
MADV_GUARD_INSTALL, MADV_GUARD_REMOVE = 102, 103
LOOK_PAGES = 512
#: VmFlags map_range sets: a kept mapping must agree on them (ckpt.restore.layout)
MAP_TIME_FLAGS = ("nr", "dp", "gu", *MADVICE)


def overlaps(a0: int, a1: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a0 < e and s < a1 for s, e in ranges)


def free_gadget_address(stub_pid: int, vmas: list[pb.Vma]) -> int:
    busy = [(v.start, v.end) for v in vmas] + [(m.start, m.end) for m in read_maps(stub_pid)]
    for addr in range(0x10000000, 1 << 46, 0x10000000):
        if not overlaps(addr, addr + GADGET_LEN + (1 << 20), busy):
            return addr
    raise RestoreError("no free address for the restore gadget")


def unmap_stub(stub: Stub) -> None:
    for m in read_maps(stub.pid):
        if m.path in KEEP or m.start == stub.gadget:
            continue
        stub.sc(NR.munmap, m.start, m.end - m.start, what=f"munmap stub {m.start:#x}")


def move_vdso(stub: Stub, vmas: list[pb.Vma]) -> None:
    """mremap the stub's vdso group onto the dumped addresses; the layout must match."""
    have = {m.path: (m.start, m.end) for m in read_maps(stub.pid) if m.path in VDSO_GROUP}
    want = {v.path: (v.start, v.end) for v in vmas if v.path in VDSO_GROUP}
    if not want:
        return
    if set(have) != set(want) or any(
        have[k][1] - have[k][0] != want[k][1] - want[k][0]
        or have[k][0] - have["[vdso]"][0] != want[k][0] - want["[vdso]"][0] for k in want
    ):
        raise RestoreError("the vdso layout of this kernel differs from the dumped one "
                           f"(dumped {sorted(want.items())}, here {sorted(have.items())})")
    lo_have, lo_want = min(s for s, _ in have.values()), min(s for s, _ in want.values())
    if lo_have == lo_want:
        return
    span = max(e for _, e in have.values()) - lo_have
    if overlaps(lo_have, lo_have + span, [(lo_want, lo_want + span)]):
        tmp = stub.gadget + GADGET_LEN + (1 << 20)  # step aside first: mremap can't overlap
        _mremap_group(stub, have, tmp - lo_have)
        have = {k: (s + tmp - lo_have, e + tmp - lo_have) for k, (s, e) in have.items()}
        lo_have = tmp
    _mremap_group(stub, have, lo_want - lo_have)


def _mremap_group(stub: Stub, group: dict[str, tuple[int, int]], delta: int) -> None:
    for name, (start, end) in group.items():
        stub.sc(NR.mremap, start, end - start, end - start, MREMAP_MAYMOVE | MREMAP_FIXED,
                start + delta, what=f"mremap {name}")


def needs_late_protect(v: pb.Vma) -> bool:
    """Was writable once (VM_ACCOUNT on a private non-writable mapping, e.g. RELRO)."""
    return "ac" in v.vmflags and not v.prot & PROT_WRITE and not v.shared


def warm_prot(v: pb.Vma) -> int:
    """The protection a VMA has while pages are filled (see needs_late_protect)."""
    return v.prot | PROT_WRITE if needs_late_protect(v) else v.prot


def map_vmas(stub: Stub, vmas: list[pb.Vma], made: Made | None = None) -> list[pb.Vma]:
    """mmap every VMA in place; return those to mprotect back after the page fill.
    ``made``: the memfds and deleted files mapped (ckpt.collect.mappedfiles), sealed here
    between the mappings made before their seals and those made after."""
    later = []
    with Backing(stub, made.by_vma if made else None) as files:
        for v in vmas:
            if VmaKind(v.kind) in KERNEL_PROVIDED | {VmaKind.SYSV_SHM}:
                continue  # SysV: ckpt.collect.sysvshm
            if made is not None and made.after_seal(v):
                later.append(v)
            else:
                map_range(stub, v, v.start, v.end, files)
        if made is not None:
            made.seal()
        for v in later:
            map_range(stub, v, v.start, v.end, files)
    return late_protected(vmas)


def late_protected(vmas: list[pb.Vma]) -> list[pb.Vma]:
    """The VMAs mapped writable for the page fill and mprotected back after it."""
    return [v for v in vmas if needs_late_protect(v)]


def map_range(stub: Stub, v: pb.Vma, start: int, end: int, files: Backing) -> None:
    """mmap [start, end) of VMA ``v`` fresh (MAP_FIXED), with its warm protection."""
    kind = VmaKind(v.kind)
    if kind == VmaKind.SYSV_SHM:  # attached by ckpt.collect.sysvshm, never mapped here
        raise RestoreError(f"System V shared memory at {start:#x} cannot be mapped here")
    flags = MAP_FIXED | (MAP_SHARED if v.shared else MAP_DROPPABLE if "dp" in v.vmflags
                         else MAP_PRIVATE)
    fd, off = -1, 0
    if "nr" in v.vmflags:  # not accounted: a huge sparse reservation must map again
        flags |= MAP_NORESERVE
    if kind in (VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED):
        fd, off = files.open(v), v.pgoff + start - v.start
    elif files.borrows(v):  # another member's shared anonymous memory
        fd, off = files.borrowed(v, start)
    else:
        flags |= MAP_ANONYMOUS
        if kind == VmaKind.STACK and "gd" in v.vmflags:
            flags |= MAP_GROWSDOWN
    got = stub.sc(NR.mmap, start, end - start, warm_prot(v), flags, fd, off,
                  what=f"mmap {start:#x}-{end:#x} {v.path}")
    if got != start:
        raise RestoreError(f"mmap of {start:#x} landed at {got:#x}")
    for flag, advice in MADVICE.items():  # before any page is filled: "nh" keeps THP away
        if flag in v.vmflags:
            _vma_call(stub, v, flag, NR.madvise, start, end - start, advice)


def _vma_call(stub: Stub, v: pb.Vma, flag: str, nr: int, *args: int) -> None:
    """A syscall that sets VmFlag ``flag`` on (part of) ``v``; RestoreError if refused."""
    got = stub.sc(nr, *args, check=False)
    if got < 0:
        raise RestoreError(f"cannot set VmFlag {flag} ({BY_MNEMONIC[flag].means}) on "
                           f"{v.path or 'anonymous memory'} at {args[0]:#x}: "
                           f"{os.strerror(-got)}")


class Backing:
    """The stub's fds of mapped files, each opened once per access mode (see
    backing_mode) and closed at the end. A memfd or deleted file is not opened by path:
    ckpt reopens the object made for it (``objects``, by (Vma.dev, Vma.inode)) and the
    stub takes that with pidfd_getfd."""

    def __init__(self, stub: Stub, objects: Mapping[tuple[int, int], int] | None = None,
                 ) -> None:
        self.stub = stub
        self.objects = objects or {}
        self.fds: dict[tuple[str, int, int], int] = {}
        self.taker = Taker(stub)

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            self.stub.sc(NR.close, fd, check=False)
        self.taker.close()

    def borrows(self, v: pb.Vma) -> bool:
        """Is ``v`` anonymous shared memory whose object another member of the tree
        owns (ckpt.collect.shmem: restored before this one, under the same pid)?"""
        return VmaKind(v.kind) == VmaKind.ANON_SHARED and v.shm_owner not in (0, self.stub.pid)

    def borrowed(self, v: pb.Vma, start: int) -> tuple[int, int]:
        """(fd in the stub, offset) mapping [start, ...) of ``v`` to the owner's restored
        object: the owner's VMA holding the object's offset (shm_start + pgoff is its
        address there), opened through /proc/OWNER/map_files; no page of it is in this
        member's images."""
        at = v.shm_start + v.pgoff + start - v.start
        owner = shared_vma_at(v.shm_owner, at)
        mode = backing_mode(v)
        key = (f"shm {v.shm_owner}", owner.start, mode)
        if key not in self.fds:
            path = f"/proc/{v.shm_owner}/map_files/{owner.start:x}-{owner.end:x}"
            try:
                local = os.open(path, mode | os.O_CLOEXEC)
            except OSError as exc:
                raise RestoreError(f"cannot open the shared memory of process {v.shm_owner} "
                                   f"at {owner.start:#x} ({path}): {exc.strerror}") from None
            try:
                self.fds[key] = self.taker.take(local, f"shared memory of {v.shm_owner}")
            finally:
                os.close(local)
        return self.fds[key], at - owner.start + owner.offset

    def open(self, v: pb.Vma) -> int:
        key = (v.path, v.inode, backing_mode(v))
        if key not in self.fds:
            made = self.objects.get((v.dev, v.inode))
            self.fds[key] = _open_backing(self.stub, v) if made is None \
                else self._take(made, v)
        return self.fds[key]

    def _take(self, made: int, v: pb.Vma) -> int:
        """A reopen of the object, in the VMA's mode; O_RDWR where a seal took the
        shared mapping's VM_MAYWRITE ("sh" without "mw": an O_RDONLY file would drop
        "sh" too)."""
        mode = os.O_RDWR if "sh" in v.vmflags else backing_mode(v)
        local = os.open(f"/proc/self/fd/{made}", mode | os.O_CLOEXEC)
        try:
            return self.taker.take(local, v.path)
        finally:
            os.close(local)


def shared_vma_at(pid: int, at: int) -> MapEntry:
    """The restored VMA of shared anonymous memory of ``pid`` holding address ``at``;
    ``pid`` must be a process this ckpt restores (a stub it traces), never another one's
    memory an image names."""
    try:
        status = read_text(pid, "/proc", "status")
        maps = read_maps(pid)
    except CkptError:
        status, maps = "", []
    tracer = next((int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("TracerPid:")), 0)
    if not tracer or not os.path.exists(f"/proc/self/task/{tracer}"):
        raise RestoreError(f"the images map shared anonymous memory of process {pid}, which "
                           "is no process of this restore (Vma.shm_owner)")
    found = next((m for m in maps if m.start <= at < m.end), None)
    if found is None or not found.shared or not found.path.startswith(SHMEM_NAMES):
        raise RestoreError(f"process {pid} has no shared anonymous memory at {at:#x} to "
                           "share: its owner must be restored first")
    return found


def backing_mode(v: pb.Vma) -> int:
    """How to open the file a VMA maps. A MAP_SHARED mapping may be made writable later
    (mprotect) exactly when its file was open for writing: the kernel then keeps
    VM_MAYWRITE ("mw"), and drops it otherwise. So such a VMA gets an O_RDWR file even
    while it is read-only; a VMA recorded without VmFlags goes by its protection."""
    may_write = "mw" in v.vmflags if v.vmflags else bool(v.prot & PROT_WRITE)
    return os.O_RDWR if v.shared and may_write else os.O_RDONLY


def _open_backing(stub: Stub, v: pb.Vma) -> int:
    if v.path.endswith(" (deleted)"):
        raise RestoreError(f"mapped file {v.path} was deleted before the dump; cannot restore")
    try:
        st = os.stat(v.path)
    except OSError as exc:
        raise RestoreError(f"mapped file {v.path} is missing: {exc.strerror}") from None
    if st.st_ino != v.inode:
        raise RestoreError(f"mapped file {v.path} changed since the dump (inode {v.inode} "
                           f"became {st.st_ino})")
    return stub.sc(NR.open, stub.put_str(v.path), backing_mode(v), 0, what=f"open {v.path}")


def finish_vmas(stub: Stub, entry: pb.ProcessEntry) -> None:
    """Once the pages are in (installing a guard drops the page under it): mlock2 of the
    VMAs that were locked ("lo"; "lf": on fault; locking populates, which a VMA still
    registered for the fill would refuse), mseal ("sl"), then guard regions and "gu".

    A guard sets "gu" on the whole VMA it falls in, and "gu" never goes (nor splits a
    VMA): so guards come after mlock and mseal have split the VMAs at the dumped
    boundaries, lest "gu" spread to a neighbour the restore mapped as one VMA with it.
    A locked VMA takes no guard (EINVAL), nor does a sealed read-only one (EPERM): theirs
    come before the mlock and mseal. A VMA with "gu" but no guard left gets one installed
    and removed again."""
    vmas = list(entry.vmas)
    guards: dict[int, list[tuple[int, int]]] = {}
    for g in entry.guard_regions:
        v = next((v for v in vmas if v.start <= g.start < v.end), None)
        if v is None:
            raise RestoreError(f"guard region {g.start:#x}-{g.end:#x} lies in no VMA")
        guards.setdefault(v.start, []).append((g.start, g.end))
    # guards first where they could not come later: locked, or sealed and read-only
    early = [v for v in vmas if "lo" in v.vmflags
             or ("sl" in v.vmflags and not v.prot & PROT_WRITE)]
    for v in early:
        _guard(stub, v, guards.get(v.start, []))
        if "lo" in v.vmflags:
            _vma_call(stub, v, "lo", NR.mlock2, v.start, v.end - v.start,
                      MLOCK_ONFAULT if "lf" in v.vmflags else 0)
    for v in vmas:
        if "sl" in v.vmflags:
            _vma_call(stub, v, "sl", NR.mseal, v.start, v.end - v.start, 0)
    for v in vmas:
        if v not in early:
            _guard(stub, v, guards.get(v.start, []))


def _guard(stub: Stub, v: pb.Vma, ranges: list[tuple[int, int]]) -> None:
    """Install guard regions ``ranges`` of ``v``; with none but "gu", mark it."""
    if not ranges and "gu" in v.vmflags:
        _mark_maybe_guard(stub, v)
    for start, end in ranges:
        _vma_call(stub, v, "gu", NR.madvise, start, end - start, MADV_GUARD_INSTALL)


def _mark_maybe_guard(stub: Stub, v: pb.Vma) -> None:
    """Install a guard on one page of ``v`` and remove it: "gu" stays. Installing one
    drops the page under it, so the page is one the process owns no data in (a hole, a
    file's page cache, shared memory's object), else its bytes are read first and
    written back. Only the first LOOK_PAGES pages are looked at (a VMA may be huge)."""
    fd = os.open(f"/proc/{stub.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        entries = read_pagemap_entries(fd, v.start, min(v.end, v.start + LOOK_PAGES * PAGE))
    finally:
        os.close(fd)
    owned = [bool(e & (PM_PRESENT | PM_SWAP)) and not e & PM_FILE for e in entries]
    page = owned.index(False) if not all(owned) else 0
    at = v.start + page * PAGE
    keep = os.pread(stub.mem_fd(), PAGE, at) if owned[page] else None
    for advice in (MADV_GUARD_INSTALL, MADV_GUARD_REMOVE):
        _vma_call(stub, v, "gu", NR.madvise, at, PAGE, advice)
    if keep is not None:
        stub.write_mem(at, keep)


def protect_late(stub: Stub, late: list[pb.Vma]) -> None:
    for v in late:
        stub.sc(NR.mprotect, v.start, v.end - v.start, v.prot, what=f"mprotect {v.start:#x}")


def restore_mm_fields(stub: Stub, mm: pb.MmFields) -> None:
    """PR_SET_MM_MAP (needs no CAP_SYS_RESOURCE, unlike the single-field PR_SET_MM ops)."""
    exe_fd = NO_EXE_FD
    try:
        here, there = os.stat(mm.exe), os.stat(f"/proc/{stub.pid}/exe")
    except OSError as exc:
        raise RestoreError(f"executable {mm.exe} is missing: {exc.strerror}") from None
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        exe_fd = stub.sc(NR.open, stub.put_str(mm.exe, 2048), os.O_RDONLY, 0,
                         what=f"open {mm.exe}")
    auxv = stub.put(mm.auxv, 4096)
    mm_map = struct.pack("11QQII", mm.start_code, mm.end_code, mm.start_data, mm.end_data,
                         mm.start_brk, mm.brk, mm.start_stack, mm.arg_start, mm.arg_end,
                         mm.env_start, mm.env_end, auxv, len(mm.auxv), exe_fd)
    try:
        stub.sc(NR.prctl, PR_SET_MM, PR_SET_MM_MAP, stub.put(mm_map), len(mm_map), 0,
                what="prctl(PR_SET_MM_MAP)")
    finally:
        if exe_fd != NO_EXE_FD:
            stub.sc(NR.close, exe_fd, check=False)
