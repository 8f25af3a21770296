"""mlockall(MCL_FUTURE): mappings made from then on are locked. /proc shows no trace of it
(it is mm->def_flags): only the mappings made so far carry "lo" in smaps, which a restore
locks again one by one, so the restored process's next mappings would not be locked.

So the frozen process is asked with one mapping of its own, made and unmapped again by an
injected mmap/munmap (ckpt.collect.tasks):

    /proc/PID/status VmLck grows by the page     the new mapping is VM_LOCKED: MCL_FUTURE
    /proc/PID/pagemap: the page is present       populated at once: not MCL_ONFAULT
    (the mmap fails EAGAIN)                      locked, at its RLIMIT_MEMLOCK: MCL_FUTURE,
                                                 MCL_ONFAULT unknown

A restore does not set it again yet (the image has no field for it), so a process with
it is refused, naming it (:func:`refusal`), while frozen: nothing before the freeze can
tell.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from ckpt.errors import NotDumpable

MCL_FUTURE, MCL_ONFAULT = 2, 4
UNKNOWN_ONFAULT = 1 << 8  # not a flag of mlockall: whether MCL_ONFAULT is set is unknown
PRESENT = 1 << 63


def vm_lck_kb(status: str) -> int:
    """The VmLck line of a /proc/PID/status text, in kB (0 if absent)."""
    for line in status.splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


def future_flags(locked: bool, present: bool) -> int:
    """What mlockall(MCL_FUTURE...) the process made, from one fresh mapping: was it
    locked, was its page populated at once."""
    if not locked:
        return 0
    return MCL_FUTURE if present else MCL_FUTURE | MCL_ONFAULT


def refusal(flags: int) -> str | None:
    """Why a process with these mlockall flags (0: none) cannot be restored, or None."""
    if not flags:
        return None
    onfault = (" | MCL_ONFAULT" if flags & MCL_ONFAULT else ", maybe MCL_ONFAULT"
               if flags & UNKNOWN_ONFAULT else "")
    return (f"it called mlockall(MCL_FUTURE{onfault}): its future mappings are locked, "
            "which a restore does not set again (only its current ones)")


def probe(pid: int, mmap: Callable[[], int], munmap: Callable[[int], object],
          page: int) -> int:
    """The process's mlockall flags (MCL_FUTURE, MCL_ONFAULT, UNKNOWN_ONFAULT; 0: none):
    ``mmap()`` maps ``page`` bytes of anonymous read-write memory in it (the raw result:
    negative errno on failure), ``munmap(addr)`` unmaps them."""
    before = _vm_lck_kb(pid)
    addr = mmap()
    if addr == -errno.EAGAIN:  # only a locked mapping is over RLIMIT_MEMLOCK
        return MCL_FUTURE | UNKNOWN_ONFAULT
    if addr < 0:
        raise NotDumpable(f"process {pid}: an mmap of one page failed "
                          f"({os.strerror(-addr)}); cannot tell whether mlockall(MCL_FUTURE) "
                          "is in effect")
    try:
        locked = _vm_lck_kb(pid) - before >= page // 1024
        present = bool(_pagemap_entry(pid, addr) & PRESENT) if locked else False
    finally:
        munmap(addr)
    return future_flags(locked, present)


def _vm_lck_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return vm_lck_kb(f.read())


def _pagemap_entry(pid: int, addr: int) -> int:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(struct.unpack("Q", os.pread(fd, 8, addr // 4096 * 8))[0])
    finally:
        os.close(fd)
