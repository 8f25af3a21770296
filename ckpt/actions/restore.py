"""`ckpt restore`: rebuild a process from an images directory, as a straight checklist.

    read images        inventory, core, pagemap (validated before anything is created)
    stub               fork a traced child with the dumped pid (ns_last_pid) or a new one
    gadget             syscall page at a free address; stub rseq off, its fds closed
    address space      unmap stub, move vdso, map VMAs, fill pages, mprotect, PR_SET_MM_MAP
    files              fds with shared open file descriptions, offsets
    process state      cwd, umask, personality, session, name, sigactions, rlimits
    threads            clone3 with set_tid, then per-thread kernel pointers
    registers          drop the gadget, XSTATE + GP regs (restart fix-ups), sigmask
    detach             the process runs on

Any failure kills the stub (and PTRACE_O_EXITKILL covers ckpt itself dying).
"""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import dataclass

from ckpt.errors import ImageError, RestoreError
from ckpt.images import ImageDir, chain
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.pb import image_pb2
from ckpt.kernel.ptrace import NT_X86_XSTATE
from ckpt.kernel.sys import NR
from ckpt.restore import mm
from ckpt.restore.files import close_stub_fds, restore_files
from ckpt.restore.pages import WritableIndex, fill_pages
from ckpt.restore.stub import GADGET_LEN, Stub
from ckpt.restore.tasks import (
    clone_threads,
    load_registers,
    queue_pending_signals,
    restore_thread_state,
    unregister_stub_rseq,
)

PR_SET_NAME = 15


@dataclass(frozen=True)
class RestoreOptions:
    images_dir: str
    new_pid: bool = False
    stopped: bool = False  # leave it stopped (SIGSTOP): migration resumes it on commit


@dataclass(frozen=True)
class RestoreResult:
    pid: int
    tids: list[int]
    total_ms: float


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
        if os.path.exists(f"/proc/{th.tid}"):
            what = "pid" if th.tid == entry.pid else "thread id"
            raise RestoreError(f"{what} {th.tid} is in use; use --new-pid to restore under "
                               "a new pid")


def restore(opts: RestoreOptions) -> RestoreResult:
    t0 = time.perf_counter()
    images, inv, entry = read_images(opts.images_dir)
    layers = chain.resolve(images, entry.pid)  # the whole chain is valid before we fork
    if not opts.new_pid:
        check_ids_free(entry)
    stub = Stub.spawn(None if opts.new_pid else entry.pid, max(t.tid for t in entry.threads))
    threads: list[Stub] = []
    try:
        check_xstate(stub, entry)
        vmas = list(entry.vmas)
        stub.install_gadget(mm.free_gadget_address(stub.pid, vmas))
        unregister_stub_rseq(stub)
        close_stub_fds(stub)
        mm.unmap_stub(stub)
        mm.move_vdso(stub, vmas)
        late = mm.map_vmas(stub, vmas)
        index = WritableIndex(vmas, late)
        for layer in layers:
            with layer.images.pages_reader(entry.pid) as reader:
                fill_pages(stub, layer.stream, reader.iter_chunks(), index,
                           None if layer.owned == layer.stream else layer.owned)
        mm.protect_late(stub, late)
        mm.restore_mm_fields(stub, entry.mm)
        restore_files(stub, entry)
        restore_process_state(stub, entry, new_session=not inv.shell_job)
        threads = clone_threads(stub, list(entry.threads[1:]), same_tids=not opts.new_pid)
        for task, th in zip(threads, entry.threads[1:], strict=True):
            restore_thread_state(task, th)
        leader = entry.threads[0]
        restore_thread_state(stub, leader)
        tids = [t.task.tid for t in threads]
        queue_pending_signals(stub, entry, [stub.pid, *tids])
        # Unmap the gadget from inside itself: single-step, nothing is fetched after it.
        stub.sc(NR.munmap, stub.gadget, GADGET_LEN, step=True, what="munmap gadget")
        load_registers(stub, leader)
        for task, th in zip(threads, entry.threads[1:], strict=True):
            load_registers(task, th)
        if opts.stopped:  # queued while every thread is still traced: none runs user code
            os.kill(stub.pid, signal.SIGSTOP)
        for task in threads:
            task.task.detach()
        stub.task.detach()
    except BaseException:
        stub.kill()
        raise
    finally:
        stub.close()
    return RestoreResult(pid=stub.pid, tids=[stub.pid, *tids],
                         total_ms=(time.perf_counter() - t0) * 1000)


def check_xstate(stub: Stub, entry: pb.ProcessEntry) -> None:
    """The dumped FPU/vector state must fit this CPU's XSTATE layout."""
    here = len(stub.task.get_regset(NT_X86_XSTATE))
    there = len(entry.threads[0].xstate)
    if here != there:
        raise RestoreError(f"the image's FPU/vector state ({there} bytes of XSTATE) does not "
                           f"fit this CPU ({here} bytes): dumped on a CPU with other features")


def restore_process_state(stub: Stub, entry: pb.ProcessEntry, new_session: bool) -> None:
    """Process-wide state. A shell job stays in the restoring terminal's session."""
    if entry.cwd:
        stub.sc(NR.chdir, stub.put_str(entry.cwd), what=f"chdir {entry.cwd}")
    stub.sc(NR.umask, entry.umask)
    if entry.personality:
        stub.sc(NR.personality, entry.personality, what="personality")
    if new_session and entry.sid == entry.pid:
        stub.sc(NR.setsid, check=False)
    stub.sc(NR.prctl, PR_SET_NAME, stub.put_str(entry.comm[:15]), 0, 0, 0, what="PR_SET_NAME")
    for act in entry.sigactions:
        raw = act.handler.to_bytes(8, "little") + act.flags.to_bytes(8, "little") + \
            act.restorer.to_bytes(8, "little") + act.mask.to_bytes(8, "little")
        stub.sc(NR.rt_sigaction, act.signo, stub.put(raw), 0, 8,
                what=f"rt_sigaction({act.signo})")
    for r in entry.rlimits:
        try:
            resource.prlimit(stub.pid, r.resource, (_rlim(r.cur), _rlim(r.max)))
        except (OSError, ValueError) as exc:
            raise RestoreError(f"cannot restore rlimit {r.resource}: {exc}") from None


def _rlim(v: int) -> int:
    return resource.RLIM_INFINITY if v >= (1 << 63) else v


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
