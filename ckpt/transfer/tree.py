"""A process tree at the destination of a migration: restored cold from the final dump,
with its own pids (ckpt.actions.restore.restore_tree), when they are free.

    pids free here          restore stopped now → RestoreDone{pid=root}; the Commit
                            resumes every member (ckpt.transfer.handover)
    pids held by the very   one kernel (the migration demo's hosts are network
    processes dumped        namespaces of one machine): they cannot be restored before the
                            source kills them → RestoreDone{pid=0}; the source kills its
                            tree, then commits; the tree is restored then, once its pids
                            are released (wait_ids_free), running
    held by another         the restore refuses, naming the holder; the source thaws

"The very process dumped": the pid's holder started at the tick the image records
(ProcessEntry.start_time, /proc/PID/stat starttime), which another host's process
practically never matches for every member at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt.collect import proc
from ckpt.errors import NoSuchProcess
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.siginfo import was_stopped

IDS_WAIT = 30.0  # seconds the source's killed tree gets to be reaped (an init reaps slowly)
POLL = 0.005


@dataclass(frozen=True)
class TreeRestored:
    pid: int  # the root; 0: not restored yet (its pids are held by the source itself)
    ms: float
    members: tuple[tuple[int, bool], ...] = ()  # (pid, stays stopped) of each live member


def tree_entries(images: ImageDir) -> list[pb.ProcessEntry]:
    """Every member's core, pre-order, root first; [] for a pass of one process."""
    inv = images.read_inventory()
    return [images.read_core(p) for p in inv.pids] if len(inv.pids) > 1 else []


def held_by_source(entries: Sequence[pb.ProcessEntry]) -> bool:
    """Is some member's pid held, here, by that very member (the source's tree, in the
    same kernel)?"""
    for e in entries:
        if not e.start_time:
            continue
        try:
            if proc.read_stat(e.pid).starttime == e.start_time:
                return True
        except NoSuchProcess:
            continue
    return False


def ids_held(entries: Sequence[pb.ProcessEntry]) -> list[int]:
    """The members' pids and thread ids some task holds now."""
    ids = [t for e in entries for t in ([th.tid for th in e.threads] or [e.pid])]
    return [i for i in ids if proc.id_holder(i) is not None]


def wait_ids_free(entries: Sequence[pb.ProcessEntry], timeout: float = IDS_WAIT) -> None:
    """Until no task holds a member's pid or tid (the source's killed tree reaped), at
    most ``timeout`` seconds; the restore then names whoever still holds one."""
    deadline = time.monotonic() + timeout
    while ids_held(entries) and time.monotonic() < deadline:
        time.sleep(POLL)


def restore_tree_here(path: str, entries: Sequence[pb.ProcessEntry], stopped: bool,
                      ) -> TreeRestored:
    """Restore the tree at ``path`` (every member SIGSTOPped with ``stopped``)."""
    from ckpt.actions.restore import RestoreOptions, restore

    # the sender keeps its tree frozen from this dump on (or killed it), so the files
    # cannot have changed through it
    res = restore(RestoreOptions(images_dir=path, stopped=stopped, skip_file_check=True))
    return TreeRestored(res.pid, res.total_ms, resumed_members(entries))


def resumed_members(entries: Sequence[pb.ProcessEntry]) -> tuple[tuple[int, bool], ...]:
    """(pid, dumped in a job-control stop) of every live member: what a commit resumes."""
    return tuple((e.pid, was_stopped(e)) for e in entries if not e.zombie)
