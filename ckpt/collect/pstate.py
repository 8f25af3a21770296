"""Per-process settings a restore must set again, and where each is read:

    setting              read from                                  restored (ckpt.restore.pstate)
    oom_score_adj        /proc/PID/oom_score_adj                    written to the stub's file
    loginuid             /proc/PID/loginuid (4294967295: unset)     the stub writes its own
    sessionid            /proc/PID/sessionid                        NOT restored: the kernel
                                                                    hands out a new one when
                                                                    loginuid is set
    membarrier           membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS) registered again in the
                         injected into the frozen target           stub (ckpt.collect.tasks)
    guard regions        PAGEMAP_SCAN, PAGE_IS_GUARD                madvise(MADV_GUARD_INSTALL)
                                                                    once the pages are in
                                                                    (ckpt.restore.mm)

Readers take ``pid`` and a keyword ``root`` like ckpt.collect.proc's.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ckpt.collect.proc import read_text
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import KernelError, NoSuchProcess
from ckpt.kernel.pagemap import PAGE_IS_GUARD, pagemap_scan
from ckpt.ranges import Range

LOGINUID_UNSET = 0xFFFFFFFF
MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9  # Linux 6.3+; injected (ckpt.collect.tasks)


@dataclass(frozen=True)
class Settings:
    oom_score_adj: int
    loginuid: int | None  # None: no audit in this kernel
    guards: tuple[Range, ...]  # guard regions, in address order


def read_oom_score_adj(pid: int, *, root: str = "/proc") -> int:
    """/proc/PID/oom_score_adj: -1000..1000."""
    return int(read_text(pid, root, "oom_score_adj"))


def read_loginuid(pid: int, *, root: str = "/proc") -> int | None:
    """/proc/PID/loginuid: the audit login uid, LOGINUID_UNSET if never set; None on a
    kernel without audit (no such file), where no process has one."""
    if not os.path.exists(os.path.join(root, str(pid))):
        raise NoSuchProcess(pid, "loginuid")
    try:
        return int(read_text(pid, root, "loginuid"))
    except NoSuchProcess:
        if os.path.exists(os.path.join(root, str(pid))):
            return None
        raise


def guard_regions(pid: int, vmas: list[VmaInfo], *, root: str = "/proc") -> list[Range]:
    """[start, end) of every guard region (MADV_GUARD_INSTALL) of ``pid``: one PAGEMAP_SCAN
    over its address space. A kernel without the GUARD category (before Linux 6.14) or
    without PAGEMAP_SCAN says nothing: none are found."""
    spans = [v for v in vmas if v.kind != VmaKind.VSYSCALL]
    if not spans:
        return []
    fd = os.open(os.path.join(root, str(pid), "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = pagemap_scan(fd, min(v.start for v in spans), max(v.end for v in spans),
                             category_mask=PAGE_IS_GUARD, return_mask=PAGE_IS_GUARD)
    except KernelError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTTY):
            return []
        raise
    finally:
        os.close(fd)
    return split_at_vmas([(s, e) for s, e, _ in found], spans)


def split_at_vmas(regions: list[Range], vmas: list[VmaInfo]) -> list[Range]:
    """``regions`` cut at VMA boundaries (the kernel coalesces across them), each piece
    inside one VMA, in address order."""
    out = []
    for s, e in regions:
        for v in vmas:
            lo, hi = max(s, v.start), min(e, v.end)
            if lo < hi:
                out.append((lo, hi))
    return sorted(out)


def collect_settings(pid: int, vmas: list[VmaInfo], *, root: str = "/proc") -> Settings:
    """Read while the target is frozen."""
    return Settings(oom_score_adj=read_oom_score_adj(pid, root=root),
                    loginuid=read_loginuid(pid, root=root),
                    guards=tuple(guard_regions(pid, vmas, root=root)))
