"""The steps of a restore around the address space, shared by a plain restore
(ckpt.actions.restore) and a warm one (ckpt.restore.warm):

    read_images      inventory and core, checked before anything is created
    prepare_stub     gadget at a free address, the stub's rseq off, its fds closed, its
                     mappings gone, the vdso group moved to the dumped addresses
    fill_layers      page data of every image of a chain, each image its own pages
    finish_process   cgroups (a warm restore's stub), guards/mlock/mseal, mm fields,
                     settings read before the fds, files (locks last), process state,
                     access check, threads, timers, settings, owners of fds,
                     credentials, settings credentials reset, then the release
                     (ckpt.restore.tasks): pending signals, registers, signal stop
                     (settle_process: a tree parks every member first), scheduling,
                     detach (release); System V segments and mapped objects are made
                     before the pages (ckpt.actions.restore, ckpt.restore.warm)
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from dataclasses import dataclass

from ckpt.collect.cgroups import join_cgroups
from ckpt.collect.deletedcwd import restore_deleted_cwd
from ckpt.collect.fdkinds.base import TreeScope
from ckpt.collect.proc import id_holder
from ckpt.errors import ImageError, RestoreError
from ckpt.images import ImageDir, chain
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.pb import image_pb2
from ckpt.images.siginfo import was_stopped
from ckpt.kernel.ptrace import NT_X86_XSTATE
from ckpt.kernel.sys import NR
from ckpt.ranges import Range, intersect
from ckpt.restore import mm
from ckpt.restore.access import check_access
from ckpt.restore.creds import restore_creds
from ckpt.restore.files import close_stub_fds, restore_files, restore_owners
from ckpt.restore.pages import WritableIndex, fill_pages
from ckpt.restore.pstate import restore_settings
from ckpt.restore.release import release as release_threads
from ckpt.restore.sched import restore_sched
from ckpt.restore.settings import restore_all_settings
from ckpt.restore.stub import Stub
from ckpt.restore.tasks import (
    clone_threads,
    ksigaction,
    last_syscalls,
    park_leader,
    restore_thread_state,
    unregister_stub_rseq,
)
from ckpt.restore.timers import create_timers, replay_overruns
from ckpt.restore.uffd_fill import CopyFill

PR_SET_NAME = 15


def read_images(images_dir: str) -> tuple[ImageDir, image_pb2.Inventory, pb.ProcessEntry]:
    images = ImageDir.open(images_dir)
    inv = images.read_inventory()
    if inv.kind != "dump":
        raise ImageError(f"{images_dir} holds a {inv.kind}, not a restorable dump")
    entry = images.read_core(inv.root_pid)
    if not entry.threads:
        raise ImageError(f"core image of {inv.root_pid} has no threads")
    return images, inv, entry


def check_ids_free(entry: pb.ProcessEntry) -> None:
    for th in entry.threads:
        holder = id_holder(th.tid)
        if holder is not None:
            what = "pid" if th.tid == entry.pid else "thread id"
            raise RestoreError(f"{what} {th.tid} is taken by {holder[1]}; use --new-pid to "
                               "restore under a new pid")


def check_xstate(stub: Stub, entry: pb.ProcessEntry) -> None:
    """The dumped FPU/vector state must fit this CPU's XSTATE layout."""
    here = len(stub.task.get_regset(NT_X86_XSTATE))
    there = len(entry.threads[0].xstate)
    if here != there:
        raise RestoreError(f"the image's FPU/vector state ({there} bytes of XSTATE) does not "
                           f"fit this CPU ({here} bytes): dumped on a CPU with other features")


def prepare_stub(stub: Stub, vmas: list[pb.Vma], gadget: bool = True) -> None:
    """From a freshly forked stub to an empty address space (but the gadget and the vdso
    group, already where the image wants it). ``gadget`` False: a stub forked by another
    has its parent's already."""
    if gadget:
        stub.install_gadget(mm.free_gadget_address(stub.pid, vmas))
    unregister_stub_rseq(stub)
    close_stub_fds(stub)
    mm.unmap_stub(stub)
    mm.move_vdso(stub, vmas)


def fill_layers(stub: Stub, pid: int, layers: list[chain.Layer], index: WritableIndex,
                only: list[Range] | None = None, copier: CopyFill | None = None) -> int:
    """Write every layer's owned pages (with ``only``, just those inside it); into fresh
    memory, ``copier`` fills its VMAs with UFFDIO_COPY."""
    written = 0
    for layer in layers:
        owned = layer.owned if only is None else intersect(layer.owned, only)
        if only is not None and not owned:
            continue
        with layer.images.pages_reader(pid) as reader:
            written += fill_pages(stub, layer.stream, reader, index,
                                  None if owned == layer.stream else owned, copier)
    return written


@dataclass
class Parked:
    """A process built up to its release: every thread traced, parked with its own
    registers (see ckpt.restore.tasks)."""

    stub: Stub
    entry: pb.ProcessEntry
    threads: list[Stub]
    tids: list[int]
    stop: bool  # released into a stop (SIGSTOP)


def finish_process(stub: Stub, entry: pb.ProcessEntry, new_session: bool, same_tids: bool,
                   stopped: bool, inherit: dict[str, int] | None = None,
                   objects: dict[tuple[str, int], int] | None = None) -> list[int]:
    """Everything after the pages; the process is left running (or SIGSTOPped with
    ``stopped``) and untraced. Returns its thread ids, leader first. ``inherit``:
    --inherit-fd, ``objects``: objects made before (ckpt.restore.files)."""
    parked = settle_process(stub, entry, new_session, same_tids, stopped, inherit, objects)
    release(parked)
    return parked.tids


def settle_process(stub: Stub, entry: pb.ProcessEntry, new_session: bool, same_tids: bool,
                   stopped: bool, inherit: dict[str, int] | None = None,
                   objects: dict[tuple[str, int], int] | None = None,
                   tree: TreeScope | None = None) -> Parked:
    """finish_process up to the release: every thread parked, still traced. ``tree``: what
    a tree's members share (ckpt.restore.files.restore_files)."""
    join_cgroups(stub.pid, entry.cgroups)  # a warm restore's stub: before the threads
    mm.finish_vmas(stub, entry)  # guard regions, mlock, mseal
    mm.restore_mm_fields(stub, entry.mm)
    restore_settings(stub, entry)  # oom_score_adj, loginuid, membarrier: before fds, rlimits
    restore_files(stub, entry, inherit, objects, tree)
    restore_process_state(stub, entry, new_session)
    check_access(stub.pid, entry)  # nothing held that root, not the process, could open
    threads = clone_threads(stub, list(entry.threads[1:]), same_tids=same_tids)
    for task, th in zip(threads, entry.threads[1:], strict=True):
        restore_thread_state(task, th)
    restore_thread_state(stub, entry.threads[0])
    tids = [stub.pid, *(t.task.tid for t in threads)]
    create_timers(stub, entry, {th.tid: tid for th, tid in zip(entry.threads, tids, strict=True)})
    replay_overruns(stub, threads, entry)
    restore_all_settings(stub, threads, entry)
    restore_creds(stub, threads, entry)  # last before the registers (ckpt.restore.creds)
    # F_SETOWN may name a thread: once they exist. After the credentials: the kernel
    # records the caller's uid and euid with the owner, and checks them before each SIGIO.
    restore_owners(stub, entry, tids, tree.members if tree else ())
    # No trap after this point (see ckpt.restore.tasks): registers are loaded at stops
    # from which the kernel applies its own syscall-restart rules.
    last_syscalls(stub, entry, threads)  # parks the other threads too
    park_leader(stub, entry)
    return Parked(stub, entry, threads, tids, stopped or was_stopped(entry))


def release(parked: Parked) -> None:
    """Let a parked process go: running, or in a stop (SIGSTOP) if it was stopped."""
    stub = parked.stub
    # queued while every thread is still traced: none runs user code
    if parked.stop:
        os.kill(stub.pid, signal.SIGSTOP)
    stub.release_cpu()
    restore_sched(parked.tids, parked.entry)  # after release_cpu, which gives back the mask
    release_threads(stub, parked.threads, parked.entry, stopped=parked.stop)  # (.release)
    if parked.stop:  # return once it is in the stop: whoever looks next sees state T
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, stub.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)


def restore_process_state(stub: Stub, entry: pb.ProcessEntry, new_session: bool) -> None:
    """Process-wide state. A shell job stays in the restoring terminal's session."""
    if entry.HasField("deleted_cwd"):
        restore_deleted_cwd(stub, entry)
    elif entry.cwd:
        stub.sc(NR.chdir, stub.put_str(entry.cwd), what=f"chdir {entry.cwd}")
    stub.sc(NR.umask, entry.umask)
    if entry.personality:
        stub.sc(NR.personality, entry.personality, what="personality")
    if new_session and entry.sid == entry.pid:
        stub.sc(NR.setsid, check=False)
    stub.sc(NR.prctl, PR_SET_NAME, stub.put_str(entry.comm[:15]), 0, 0, 0, what="PR_SET_NAME")
    for act in entry.sigactions:  # the stub starts from SIG_DFL everywhere, all zero
        if act.signo != signal.SIGTRAP and (act.handler or act.flags or act.restorer
                                            or act.mask):  # SIGTRAP: in last_syscalls
            stub.sc(NR.rt_sigaction, act.signo, stub.put(ksigaction(act)), 0, 8,
                    what=f"rt_sigaction({act.signo})")
    for r in entry.rlimits:
        try:
            resource.prlimit(stub.pid, r.resource, (_rlim(r.cur), _rlim(r.max)))
        except (OSError, ValueError) as exc:
            raise RestoreError(f"cannot restore rlimit {r.resource}: {exc}") from None


def _rlim(v: int) -> int:
    return resource.RLIM_INFINITY if v >= (1 << 63) else v
