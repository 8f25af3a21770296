"""`ckpt dump`: a full, consistent checkpoint of one process, as a straight checklist.

    preflight (target still running)   pid, kernel thread, children, fds, shared memory
    freeze                             seize + interrupt every thread
    collect                            threads, injected state, /proc, files, VMAs
    copy                               pagemap → runs → process_vm_readv → zstd pages
    write images                       pagemap, core, inventory (last: marks it complete)
    release                            kill (default) or detach (--leave-running)

Any failure before release leaves the target running and untraced (see ckpt.freeze).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ckpt.actions.core_image import ProcessInfo, build_core
from ckpt.collect import proc
from ckpt.collect.files import collect_files
from ckpt.collect.tasks import collect_injected, collect_thread
from ckpt.collect.vmas import VmaInfo, collect_vmas
from ckpt.errors import NoSuchProcess, NotDumpable
from ckpt.freeze.seize import Frozen
from ckpt.images import ImageDir
from ckpt.images.pb import image_pb2
from ckpt.kernel.ptrace import Tracee
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.copy import copy_runs
from ckpt.pagecopy.plan import plan_dump

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DumpOptions:
    pid: int
    images_dir: str
    leave_running: bool = False
    shell_job: bool = False
    compress_level: int = 1


@dataclass(frozen=True)
class DumpResult:
    pid: int
    threads: int
    vmas: int
    pages: int
    stored_bytes: int
    frozen_ms: float
    copy_ms: float
    total_ms: float


def preflight(opts: DumpOptions) -> None:
    """Refuse what we cannot dump while the target still runs untouched."""
    pid = opts.pid
    if pid <= 0 or not proc.pid_exists(pid):
        raise NoSuchProcess(pid)
    if proc.is_kernel_thread(pid):
        raise NotDumpable(f"process {pid} is a kernel thread")
    if pid == os.getpid():
        raise NotDumpable("ckpt cannot dump itself")
    if proc.read_status(pid).state in ("Z", "X"):
        raise NotDumpable(f"process {pid} is a zombie")
    children = proc.list_children(pid)
    if children:
        raise NotDumpable(f"process {pid} has child processes ({', '.join(map(str, children))}); "
                          "process trees are not supported yet")
    collect_files(pid, opts.shell_job)
    check_vmas(pid, collect_vmas(pid))


def check_vmas(pid: int, vmas: list[VmaInfo]) -> None:
    for v in vmas:
        if v.path.startswith("/SYSV"):
            raise NotDumpable(f"process {pid} maps System V shared memory at {v.start:#x}: "
                              "not supported")


def collect_process(pid: int, leader: Tracee) -> ProcessInfo:
    with proc.proc_errors(pid, "personality"), open(f"/proc/{pid}/personality") as f:
        personality = int(f.read(), 16)
    return ProcessInfo(
        stat=proc.read_stat(pid), umask=proc.read_status(pid).umask or 0o022,
        auxv=proc.read_auxv(pid), exe=proc.read_exe(pid), cwd=proc.read_cwd(pid),
        comm=proc.read_comm(pid), cmdline=proc.read_cmdline(pid), personality=personality,
        rlimits=proc.read_limits(pid), shared_pending=leader.pending_signals(shared=True))


def dump(opts: DumpOptions) -> DumpResult:
    pid = opts.pid
    t_start = time.perf_counter()
    preflight(opts)
    images = ImageDir.create(opts.images_dir)
    with Frozen(pid) as frozen:
        threads = frozen.threads()
        states = [collect_thread(t) for t in threads]
        injected = collect_injected(pid, threads, states, collect_vmas(pid))
        vmas = collect_vmas(pid)
        check_vmas(pid, vmas)
        files = collect_files(pid, opts.shell_job)
        info = collect_process(pid, frozen.leader)

        t_copy = time.perf_counter()
        runs = plan_dump(pid, vmas)
        with images.pages_writer(pid, level=opts.compress_level) as writer:
            copy_runs(pid, runs, writer.write)
        copy_ms = (time.perf_counter() - t_copy) * 1000
        stored = writer.stored_bytes
        pages = sum(r.nr_pages for r in runs)

        images.write_pagemap(
            pid, image_pb2.PagemapHead(pid=pid, pages_file_raw_bytes=pages * PAGE_SIZE),
            [image_pb2.PagemapEntry(vaddr=r.vaddr, nr_pages=r.nr_pages,
                                    flags=image_pb2.PagemapEntry.PRESENT) for r in runs])
        images.write_core(pid, build_core(pid, info, states, injected, vmas, files))
        frozen_ms = (time.perf_counter() - frozen.frozen_at) * 1000
        total_ms = (time.perf_counter() - t_start) * 1000
        stats = image_pb2.DumpStats(pages_scanned=sum(v.length for v in vmas) // PAGE_SIZE,
                                    pages_written=pages, bytes_written=stored,
                                    frozen_ms=frozen_ms, copy_ms=copy_ms, total_ms=total_ms)
        images.write_inventory(image_pb2.Inventory(
            format_version=FORMAT_VERSION, root_pid=pid, pids=[pid], kind="dump",
            tracker="none", created_unix=time.time(), kernel_release=os.uname().release,
            xstate_size=len(states[0].xstate), shell_job=opts.shell_job, stats=stats))
        if not opts.leave_running:
            frozen.kill()
    return DumpResult(pid=pid, threads=len(states), vmas=len(vmas), pages=pages,
                      stored_bytes=stored, frozen_ms=frozen_ms, copy_ms=copy_ms,
                      total_ms=total_ms)
