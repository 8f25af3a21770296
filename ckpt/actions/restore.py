"""`ckpt restore`: rebuild a process from an images directory, as a straight checklist.

    read images        inventory, core, pagemap (each field validated: images/validate.py),
                       then, before anything is created: the dumped ids free, the files
                       reopened unchanged since the dump, every --inherit-fd, timer ids
                       this kernel can make
    stub               fork a traced child with the dumped pid (ns_last_pid) or a new one,
                       every signal action SIG_DFL
    cgroups            the stub joins the dumped cgroups, before its memory is charged
    gadget             XSTATE layout checked; syscall page at a free address; stub rseq
                       off, its fds closed
    address space      unmap stub, move vdso, make mapped memfds and deleted files, map
                       VMAs, seal those memfds, make and attach System V segments, fill
                       pages (UFFDIO_COPY into anonymous memory), mprotect
    memory state       guard regions, mlock, mseal, PR_SET_MM_MAP
    settings           oom_score_adj, loginuid, membarrier (before the fds and rlimits)
    files              fds with shared open file descriptions, offsets, status flags,
                       then file locks and leases
    process state      cwd (a deleted one made again), umask, personality, session,
                       name, sigactions (not yet SIGTRAP's), rlimits; access check
    threads            clone3 with set_tid, then per-thread kernel pointers
    timers             POSIX timers under their ids; overruns replayed
    settings, owners   prctl settings, the owners of fds (F_SETOWN may name a thread)
    credentials        ids, groups, capabilities, seccomp; then the settings creds reset
    last syscalls      no trap any more: pending signals queued, SIGTRAP's action, gadget
                       unmapped
    registers          XSTATE + GP regs as dumped, masks, each thread in a signal stop
    scheduling         policy, nice, CPU affinity, I/O priority (after the release)
    release            the process runs on; the kernel restarts interrupted calls, a
                       thread whose call a signal would interrupt is let go by the end
                       of the restore's own thread (ckpt.restore.release)

Any failure kills the stub (and PTRACE_O_EXITKILL covers ckpt itself dying).

The steps themselves live in ckpt.restore.process; ckpt.restore.warm runs the same ones
over a stub kept up to date pass by pass (migration).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from ckpt.collect import sysvshm
from ckpt.collect.cgroups import join_cgroups
from ckpt.collect.mappedfiles import Made, make_objects
from ckpt.images import chain
from ckpt.kernel.creds import require_root
from ckpt.restore import mm
from ckpt.restore.files import check_files, check_inherit
from ckpt.restore.pages import WritableIndex
from ckpt.restore.process import (
    check_ids_free,
    check_xstate,
    fill_layers,
    finish_process,
    prepare_stub,
    read_images,
)
from ckpt.restore.release import run_released
from ckpt.restore.stub import Stub
from ckpt.restore.timers import check_timer_ids
from ckpt.restore.uffd_fill import CopyFill


@dataclass(frozen=True)
class RestoreOptions:
    images_dir: str
    new_pid: bool = False
    stopped: bool = False  # leave it stopped (SIGSTOP): migration resumes it on commit
    skip_file_check: bool = False  # reopen files that changed since the dump anyway
    # --inherit-fd: external object ("pipe:[123]") -> the fd of ckpt that stands for it
    inherit: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreResult:
    pid: int
    tids: list[int]
    total_ms: float


def restore(opts: RestoreOptions) -> RestoreResult:
    """Restore in a thread of its own, which lets the restored process go as it ends
    (ckpt.restore.release)."""
    return run_released(lambda: _restore(opts))


def _restore(opts: RestoreOptions) -> RestoreResult:
    t0 = time.perf_counter()
    require_root("restore")
    images, inv, entry = read_images(opts.images_dir)
    layers = chain.resolve(images, entry.pid)  # the whole chain is valid before we fork
    if not opts.new_pid:
        check_ids_free(entry)
    if not opts.skip_file_check:
        check_files(entry)
    check_inherit(entry, opts.inherit)
    check_timer_ids(entry)
    stub = Stub.spawn(None if opts.new_pid else entry.pid, max(t.tid for t in entry.threads))
    copier = CopyFill()
    made: list[int] = []  # System V segments made here
    objects = Made()  # mapped memfds and deleted files
    try:
        vmas = list(entry.vmas)
        join_cgroups(stub.pid, entry.cgroups)  # before its memory is charged anywhere
        with stub.colocated():  # injected syscalls: see Stub.colocated
            check_xstate(stub, entry)
            prepare_stub(stub, vmas)
            objects = make_objects(entry)
            late = mm.map_vmas(stub, vmas, objects)  # and seals them
            made = sysvshm.restore_segments(entry)
            sysvshm.attach_segments(stub, entry)
            copier = CopyFill.open(stub, vmas)
        # closed right after the fill: a VMA still registered would SIGBUS the process
        # (the finally below only covers a failure before this point)
        with copier:
            fill_layers(stub, entry.pid, layers, WritableIndex(vmas, late), copier=copier)
        with stub.colocated():
            mm.protect_late(stub, late)
            tids = finish_process(stub, entry, new_session=not inv.shell_job,
                                  same_tids=not opts.new_pid, stopped=opts.stopped,
                                  inherit=opts.inherit, objects=objects.objects)
    except BaseException:
        stub.kill()
        sysvshm.forget(made)
        raise
    finally:
        copier.close()
        objects.close()
        stub.close()
    return RestoreResult(pid=stub.pid, tids=tids, total_ms=(time.perf_counter() - t0) * 1000)


def wait_restored(pid: int) -> int:
    """Wait for the restored child; its exit status, or 128+signal like a shell."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 0
        except KeyboardInterrupt:
            os.kill(pid, signal.SIGINT)
            continue
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
