"""Threads and per-task state: clone3 with set_tid, rseq, tid address, robust list,
altstack, and finally XSTATE + registers (with syscall-restart fix-ups) and signal masks.

A task frozen inside a syscall has rax = -ERESTART*; the kernel would restart or fail the
call when the signal-less stop ends, but a restored task resumes from plain registers, so
we apply the kernel's rule ourselves:

    -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND   rip -= 2, rax = orig_rax (re-issue)
    -ERESTART_RESTARTBLOCK                           rax = -EINTR (its restart block is
                                                     kernel state we cannot carry over)
"""

from __future__ import annotations

import errno
import signal
import struct

from ckpt.actions.core_image import regs_from_pb
from ckpt.collect.proc import id_holder
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.siginfo import is_stop_mark
from ckpt.kernel.ptrace import (
    NT_X86_XSTATE,
    PTRACE_EVENT_CLONE,
    PTRACE_O_EXITKILL,
    PTRACE_O_TRACECLONE,
    Regs,
    signed,
)
from ckpt.kernel.sys import NR
from ckpt.restore.stub import Stub

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
U64 = (1 << 64) - 1
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # VM FS FILES SIGHAND
# THREAD SYSVSEM
CLONE_ARGS = struct.Struct("11Q")
RSEQ_FLAG_UNREGISTER = 1


def fix_restart(regs: Regs) -> Regs:
    if signed(regs.orig_rax) >= 0:
        ret = -signed(regs.rax)
        if ret in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            regs.rax, regs.rip = regs.orig_rax, regs.rip - 2
        elif ret == ERESTART_RESTARTBLOCK:
            regs.rax = (-errno.EINTR) & U64
        regs.orig_rax = U64
    return regs


def unregister_stub_rseq(stub: Stub) -> None:
    rseq = stub.task.rseq()
    if rseq.abi_pointer:
        stub.sc(NR.rseq, rseq.abi_pointer, rseq.abi_size, RSEQ_FLAG_UNREGISTER, rseq.signature,
                what="unregister the stub's rseq")


def clone_threads(stub: Stub, threads: list[pb.ThreadCore], same_tids: bool) -> list[Stub]:
    """Create the non-leader threads from the gadget; each comes back stopped and traced."""
    out: list[Stub] = []
    if not threads:
        return out
    stub.task.set_options(PTRACE_O_EXITKILL | PTRACE_O_TRACECLONE)
    for th in threads:
        tid_arr = stub.put(struct.pack("i", th.tid), 3072)
        args = CLONE_ARGS.pack(CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0,
                               tid_arr if same_tids else 0, 1 if same_tids else 0, 0)
        assert stub.inj is not None
        stub.inj.prepare(NR.clone3, (stub.put(args, 3200), CLONE_ARGS.size))
        stub.task.cont()
        status = stub.task.wait_stop(signal.SIGTRAP)
        if status >> 16 != PTRACE_EVENT_CLONE:
            err = -signed(stub.task.getregs().rax)
            if err == errno.EEXIST:
                raise RestoreError(tid_taken(th.tid, stub.pid))
            raise RestoreError(f"clone3 for thread {th.tid} failed: "
                               f"{errno.errorcode.get(err, err)}")
        new_tid = stub.task.event_msg()
        stub.task.cont()
        stub.task.wait_stop(signal.SIGTRAP)  # the parent returns and hits int3
        child = Stub(stub.pid, new_tid)
        child.task.wait_stop()  # auto-attached children start with SIGSTOP
        child.use_gadget(stub.gadget)
        child._mem_fd = stub.mem_fd()
        out.append(child)
    return out


def tid_taken(tid: int, restoring: int, root: str = "/proc") -> str:
    """Why clone3 gave EEXIST for ``tid``: another process took it after the dump (named,
    so the user knows it is not ckpt's doing), or it is gone again (a short-lived task),
    or, a bug of ours, a thread of the process being restored already has it."""
    holder = id_holder(tid, root=root)
    if holder is None:
        return (f"thread id {tid} was taken by a task that has exited since; try again, or "
                "use --new-pid")
    owner, who = holder
    if owner == restoring:
        return f"thread id {tid} is already used by the process being restored ({who})"
    return (f"thread id {tid} is taken by {who}, which started after the dump; use "
            "--new-pid to restore under new ids")


def restore_thread_state(task: Stub, th: pb.ThreadCore) -> None:
    """Kernel pointers of one thread, set from inside it."""
    if th.robust_list_head:
        task.sc(NR.set_robust_list, th.robust_list_head, th.robust_list_len,
                what="set_robust_list")
    if th.clear_child_tid:
        tid = task.sc(NR.set_tid_address, th.clear_child_tid, what="set_tid_address")
        if tid != th.tid:
            # glibc's set_tid_address(&THREAD_SELF->tid) pointer: fix the cached tid under a
            # new pid so raise(), pthread_kill and mutex owners keep working.
            task.write_mem(th.clear_child_tid, struct.pack("i", tid))
    if th.rseq.abi_pointer:
        task.sc(NR.rseq, th.rseq.abi_pointer, th.rseq.abi_size, 0, th.rseq.signature,
                what="rseq")
    alt = th.altstack
    task.sc(NR.sigaltstack, task.put(struct.pack("QiiQ", alt.sp, alt.flags, 0, alt.size), 3584),
            0, check=False)


def load_registers(task: Stub, th: pb.ThreadCore) -> None:
    task.task.set_regset(NT_X86_XSTATE, th.xstate)
    task.task.setregs(fix_restart(regs_from_pb(th.regs)))
    task.task.set_sigmask(th.sigmask)


def queue_pending_signals(stub: Stub, entry: pb.ProcessEntry, tids: list[int]) -> None:
    """Queue the signals that were pending at dump time, from inside the leader.

    The leader blocks everything meanwhile, so nothing is delivered while we still inject;
    the final masks are loaded afterwards and the kernel delivers what they allow.
    """
    stub.task.set_sigmask(U64)
    for info in entry.shared_pending:
        if is_stop_mark(info):  # a stopped process: finish_process stops it last
            continue
        signo = struct.unpack_from("i", info)[0]
        stub.sc(NR.rt_sigqueueinfo, stub.pid, signo, stub.put(info, 3840),
                what=f"rt_sigqueueinfo({signo})")
    for tid, th in zip(tids, entry.threads, strict=True):
        for info in th.pending_signals:
            signo = struct.unpack_from("i", info)[0]
            stub.sc(NR.rt_tgsigqueueinfo, stub.pid, tid, signo, stub.put(info, 3840),
                    what=f"rt_tgsigqueueinfo({tid}, {signo})")
