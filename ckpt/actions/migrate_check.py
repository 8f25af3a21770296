"""What `ckpt migrate` checks before its first round (ckpt.actions.migrate): every member
of the tree dumpable as the final dump will need it, and what the destination must offer.

A tree (``-t ROOT`` with descendants) is checked member by member with a TreeView, as
the dump checks it: what members share among themselves (pipes, socketpairs, files) is
no one else's; what leads outside the tree (an external pipe or socket, System V IPC, a
mapped memfd shared with a stranger, ...) is refused naming the member, before any round.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ckpt.actions.dump import DumpOptions, hidden_fds, preflight, refuse_sharing, tree_view
from ckpt.actions.passes import refusals_of
from ckpt.collect import proc
from ckpt.collect.fdkinds import kind_of
from ckpt.collect.fdkinds.base import FdKind, Peek
from ckpt.collect.fdkinds.memfd import GHOST, ghost_path
from ckpt.collect.fdkinds.pipe import KIND as PIPE
from ckpt.collect.fds import FdInfo, classify_fd, read_fds
from ckpt.collect.mappedfiles import is_mapped_object
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.freeze.tree import list_tree
from ckpt.images.pb import wire_pb2
from ckpt.kernel.probe import probe_once

FILE_KINDS = frozenset({VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED})


def check_members(opts: DumpOptions) -> dict[int, list[VmaInfo]]:
    """Every live member of opts.pid's tree (pre-order, root first) → its VMAs, each
    refused as the final dump would refuse it. The tree runs untouched: a member that
    appears or exits before the final pass is the rounds' and the final dump's business."""
    pids = list_tree(opts.pid)
    if len(pids) == 1 and not proc.list_children(opts.pid):
        return {opts.pid: preflight(opts)}
    tree = tree_view(pids)
    refuse_sharing(pids)
    out = {}
    for pid in pids:
        with refusals_of(pid, True):  # say which member
            out[pid] = preflight(opts, pid, tree)
    return out


def compat_request(pid: int, vmas: list[VmaInfo],
                   members: Mapping[int, list[VmaInfo]] | None = None,
                   ) -> wire_pb2.CompatCheck:
    """What the destination must offer: this CPU's XSTATE layout, the vdso layout, every
    file the process (and each other member of its tree, ``members``: pid → VMAs) maps
    or has open by path (FIFOs too), and the directory of each deleted file it has open
    (restore makes the file again there). The tree runs meanwhile: only the fd links are
    read (read_fds, kind_of), never an object's state."""
    caps = probe_once()
    files = needed_files(pid, vmas)
    for other, other_vmas in (members or {}).items():
        if other != pid:
            files |= needed_files(other, other_vmas)
    return wire_pb2.CompatCheck(xstate_size=caps.xstate_size or 0, xcr0=caps.xcr0 or 0,
                                vdso_layout=caps.get("vdso-layout").detail,
                                files=sorted(f for f in files if f))


def needed_files(pid: int, vmas: list[VmaInfo]) -> set[str]:
    """The paths one process's restore opens: its exe, mapped files, reopened fds."""
    files = {proc.read_exe(pid)}
    for v in vmas:
        if not v.inode or v.kind not in FILE_KINDS:
            continue
        if is_mapped_object(v.kind, v.path):  # carried in the images (a tree's migration)
            if not v.path.startswith("/memfd:"):  # a deleted file: made again beside
                files.add(os.path.dirname(ghost_path(v.path)) or "/")
            continue
        files.add(v.path)
    hidden = hidden_fds(pid)
    infos = [i for i in read_fds(pid) if i.fd not in hidden]
    with Peek(pid, infos) as peek:
        for info in infos:
            files |= reopened_paths(info, kind_of(info, peek))
    return files


def reopened_paths(info: FdInfo, kind: FdKind | None) -> set[str]:
    """The paths a restore of this fd opens or makes a file in ({} if none)."""
    if kind is GHOST:
        return {os.path.dirname(ghost_path(info.target)) or "/"}
    if kind is PIPE and info.target.startswith("/"):  # a named FIFO
        return {info.target}
    if kind is None and classify_fd(info) not in ("tty", "dev_null"):
        return {info.target} if info.target.startswith("/") else set()
    return set()
