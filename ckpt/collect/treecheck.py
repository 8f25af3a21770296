"""What a tree dump refuses that no single member's rules see: members sharing kernel
objects that restore makes one per process (clone(2) without CLONE_THREAD but with
CLONE_VM, CLONE_FILES or CLONE_FS; a vfork in progress shares the address space).

The judgement is pure (:func:`sharing_refusal` over what :func:`read_sharing` found), so
it runs without root in unit tests; dump calls it before the freeze and again frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ckpt.errors import CkptError
from ckpt.kernel.sys import KCMP_FILES, KCMP_FS, KCMP_VM, kcmp_same

#: kcmp type -> what two members share, as a refusal names it
SHARED = {
    KCMP_VM: "its address space (clone with CLONE_VM, or a vfork in progress)",
    KCMP_FILES: "its fd table (clone with CLONE_FILES)",
    KCMP_FS: "its working directory, root and umask (clone with CLONE_FS)",
}

Same = Callable[[int, int, int], bool]


def read_sharing(pids: Sequence[int], same: Same = kcmp_same,
                 ) -> list[tuple[int, int, int]]:
    """(member, earlier member, kcmp type) for every kernel object two members share."""
    found = []
    for i, pid in enumerate(pids):
        for other in pids[:i]:
            for what in SHARED:
                try:
                    if same(pid, other, what):
                        found.append((pid, other, what))
                except CkptError:
                    continue  # exited meanwhile: the frozen check sees the tree as it is
    return found


def sharing_refusal(found: Sequence[tuple[int, int, int]]) -> str | None:
    """The refusal for the first shared object, or None."""
    if not found:
        return None
    pid, other, what = found[0]
    return (f"process {pid} shares {SHARED[what]} with process {other}: a restore makes "
            "one per process: not supported yet")
