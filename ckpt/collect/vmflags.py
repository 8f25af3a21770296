"""Every VmFlags mnemonic /proc/PID/smaps shows (Linux 6.18, fs/proc/task_mmu.c
show_smap_vma_flags), and how a restore brings it back, or why it cannot.

    how       meaning                                            restored by
    MAPPING   follows from how the VMA is mapped again: its      ckpt.restore.mm.map_range
              protection, MAP_SHARED or not, the file and the
              mode it is opened in, its kind
    MMAP      an mmap flag                                       map_range (MMAP_FLAGS)
    MADVISE   an madvise advice, given before any page is in     map_range (MADVICE)
    MLOCK     mlock2, once the pages are in                      finish_vmas
    GUARD     MADV_GUARD_INSTALL (+ REMOVE on the empty VMA)      map_range, finish_vmas
    SEAL      mseal, last of all                                 finish_vmas
    TRACKER   ckpt's own uffd-wp tracker registered it: not      (not restored: it was
              the process's state                                 never the process's)
    KERNEL    the kernel's own mappings ([vdso], [vvar], ...)    the kernel, as it maps them
              have it; on any other VMA it is refused
    REFUSED   a restore cannot set it: refused before the        ckpt.collect.restorable
              freeze, naming the flag and the address             (VMA_RULES)

A mnemonic this table does not know (a newer kernel's) is refused too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class How(enum.Enum):
    MAPPING = "mapping"
    MMAP = "mmap flag"
    MADVISE = "madvise"
    MLOCK = "mlock2"
    GUARD = "guard regions"
    SEAL = "mseal"
    TRACKER = "ckpt's tracker"
    KERNEL = "kernel mappings only"
    REFUSED = "refused"


@dataclass(frozen=True)
class VmFlag:
    mnemonic: str
    name: str  # the kernel's VM_* name
    how: How
    means: str  # what sets it, for people reading a refusal


VMFLAGS: tuple[VmFlag, ...] = (
    VmFlag("rd", "VM_READ", How.MAPPING, "PROT_READ"),
    VmFlag("wr", "VM_WRITE", How.MAPPING, "PROT_WRITE"),
    VmFlag("ex", "VM_EXEC", How.MAPPING, "PROT_EXEC"),
    VmFlag("sh", "VM_SHARED", How.MAPPING, "MAP_SHARED, writable"),
    VmFlag("mr", "VM_MAYREAD", How.MAPPING, "may be made readable"),
    VmFlag("mw", "VM_MAYWRITE", How.MAPPING, "may be made writable (the file's open mode)"),
    VmFlag("me", "VM_MAYEXEC", How.MAPPING, "may be made executable (not a noexec mount)"),
    VmFlag("ms", "VM_MAYSHARE", How.MAPPING, "MAP_SHARED"),
    VmFlag("gd", "VM_GROWSDOWN", How.MMAP, "MAP_GROWSDOWN"),
    VmFlag("pf", "VM_PFNMAP", How.KERNEL, "a device's page frames"),
    VmFlag("lo", "VM_LOCKED", How.MLOCK, "mlock"),
    VmFlag("io", "VM_IO", How.KERNEL, "device I/O memory"),
    VmFlag("sr", "VM_SEQ_READ", How.MADVISE, "MADV_SEQUENTIAL"),
    VmFlag("rr", "VM_RAND_READ", How.MADVISE, "MADV_RANDOM"),
    VmFlag("dc", "VM_DONTCOPY", How.MADVISE, "MADV_DONTFORK"),
    VmFlag("de", "VM_DONTEXPAND", How.KERNEL, "a driver's mapping that cannot grow"),
    VmFlag("lf", "VM_LOCKONFAULT", How.MLOCK, "mlock2 MLOCK_ONFAULT"),
    VmFlag("ac", "VM_ACCOUNT", How.MAPPING, "private and writable once (accounted)"),
    VmFlag("nr", "VM_NORESERVE", How.MMAP, "MAP_NORESERVE"),
    VmFlag("ht", "VM_HUGETLB", How.REFUSED, "hugetlbfs or MAP_HUGETLB memory"),
    VmFlag("sf", "VM_SYNC", How.REFUSED, "MAP_SYNC on a DAX file"),
    VmFlag("ar", "VM_PAT", How.REFUSED, "device memory with a PAT memory type"),
    VmFlag("wf", "VM_WIPEONFORK", How.MADVISE, "MADV_WIPEONFORK"),
    VmFlag("dd", "VM_DONTDUMP", How.MADVISE, "MADV_DONTDUMP"),
    VmFlag("bt", "VM_ARM64_BTI", How.REFUSED, "arm64 only"),
    VmFlag("sd", "VM_SOFTDIRTY", How.MAPPING, "soft-dirty tracking: set on every new VMA"),
    VmFlag("mm", "VM_MIXEDMAP", How.REFUSED, "device or DAX memory"),
    VmFlag("hg", "VM_HUGEPAGE", How.MADVISE, "MADV_HUGEPAGE"),
    VmFlag("nh", "VM_NOHUGEPAGE", How.MADVISE, "MADV_NOHUGEPAGE"),
    VmFlag("mg", "VM_MERGEABLE", How.MADVISE, "MADV_MERGEABLE (KSM)"),
    VmFlag("um", "VM_UFFD_MISSING", How.REFUSED, "registered with a userfaultfd"),
    VmFlag("uw", "VM_UFFD_WP", How.TRACKER, "registered with a userfaultfd for write-protect"),
    VmFlag("mt", "VM_MTE", How.REFUSED, "arm64 only"),
    VmFlag("ui", "VM_UFFD_MINOR", How.REFUSED, "registered with a userfaultfd"),
    VmFlag("ss", "VM_SHADOW_STACK", How.REFUSED, "a shadow stack (map_shadow_stack)"),
    VmFlag("dp", "VM_DROPPABLE", How.MMAP, "MAP_DROPPABLE"),
    VmFlag("sl", "VM_SEALED", How.SEAL, "mseal"),
    VmFlag("gu", "VM_MAYBE_GUARD", How.GUARD, "MADV_GUARD_INSTALL was used on it"),
)

BY_MNEMONIC = {f.mnemonic: f for f in VMFLAGS}

#: madvise advice that sets each MADVISE flag.
MADVICE = {"sr": 2, "rr": 1, "dc": 10, "mg": 12, "hg": 14, "nh": 15, "dd": 16, "wf": 18}
assert set(MADVICE) == {f.mnemonic for f in VMFLAGS if f.how == How.MADVISE}


def refused_flags(vmflags: Iterable[str], kernel_mapping: bool, tracker: bool) -> list[str]:
    """The flags of one VMA a restore could not set again, each as "xx (what sets it)".

    ``kernel_mapping``: the VMA is one the kernel provides ([vdso], [vvar], ...: every
    flag is the kernel's); ``tracker``: a userfaultfd of ckpt's own is in the process, so
    "uw" is its registration."""
    if kernel_mapping:
        return []
    out = []
    for mnemonic in vmflags:
        flag = BY_MNEMONIC.get(mnemonic)
        if flag is None:
            out.append(f"{mnemonic} (unknown to ckpt)")
        elif flag.how in (How.REFUSED, How.KERNEL) or (flag.how == How.TRACKER
                                                       and not tracker):
            out.append(f"{mnemonic} ({flag.means})")
    return out

