"""Threads and per-task state (clone3 with set_tid, rseq, tid address, robust list,
altstack), then the release: the last syscalls, XSTATE + registers, signal masks.

Registers are loaded as dumped. A task frozen inside a syscall has rax = -ERESTART*,
orig_rax = the syscall and rip after its ``syscall`` instruction; every task is let go
from a signal-delivery-stop (ckpt.restore.release), so the kernel applies its own
restart rules on the way out (arch_do_signal_or_restart), as for a process that was never
checkpointed: a handler run first makes -ERESTARTNOHAND (pause, sigsuspend, epoll_wait)
and -ERESTARTSYS without SA_RESTART return EINTR; with no handler to run the call is
issued again, and ckpt.restore.release sees it entered before letting the task go.

restart_regs keeps one fix-up: -ERESTART_RESTARTBLOCK (nanosleep, poll, futex wait)
becomes -EINTR. The kernel would run restart_syscall, i.e. the task's restart block: kernel
state the image does not carry (the stub's is a copy of ckpt's own). EINTR is what the
call returns after a handler anyway, and nanosleep has written the time left by then.

The gadget's int3 (and any single-step) raises a *forced* SIGTRAP, and the kernel resets a
blocked or ignored SIGTRAP's action to SIG_DFL when it forces one (force_sig_info_to_task).
Hence the order:

    trap phase     every injection through the gadget's int3; SIGTRAP's action is still
                   the stub's default (the image's is held back) and never blocked
    last_syscalls  stops only at syscall entry/exit (PTRACE_SYSCALL, never a signal):
                   each thread with signals of its own pending queues them itself,
                   everything blocked (rt_tgsigqueueinfo refuses a siginfo with si_code
                   >= 0 or SI_TKILL from any other thread), and is parked; then the
                   leader queues its own and the process's, sets SIGTRAP's action and
                   unmaps the gadget
    park           dumped registers; a signal no image queue holds (tgkill), the only
                   one unblocked, stops the thread in a signal-delivery-stop; final mask.
                   Threads without signals of their own are parked at their last int3
                   stop (load_registers).
    release        signal 0 discards the parking signal; get_signal goes on with the
                   final mask (delivering what the image had pending), then the restart
                   rules above (ckpt.restore.release: detach, or PTRACE_SYSCALL to the
                   call's entry).

(PTRACE_DETACH also sets TIF_SIGPENDING, so even a syscall-exit stop would run the restart
rules on detach; the signal stop does not depend on that.)
"""

from __future__ import annotations

import errno
import signal
import struct

from ckpt.collect.proc import id_holder
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.regs import regs_from_pb
from ckpt.images.siginfo import is_stop_mark
from ckpt.kernel import siginfo
from ckpt.kernel.ptrace import (
    NT_X86_XSTATE,
    PTRACE_EVENT_CLONE,
    PTRACE_O_EXITKILL,
    PTRACE_O_TRACECLONE,
    Injector,
    Regs,
    Tracee,
    signed,
)
from ckpt.kernel.sys import NR, clone_args, tgkill
from ckpt.restore.stub import GADGET_LEN, Stub
from ckpt.restore.timers import arm_timers, image_signals

ERESTART_RESTARTBLOCK = 516
U64 = (1 << 64) - 1
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # VM FS FILES SIGHAND
# THREAD SYSVSEM
KSIGACTION = struct.Struct("QQQQ")  # handler, flags, restorer, mask
RSEQ_FLAG_UNREGISTER = 1


def restart_regs(regs: Regs) -> Regs:
    """The dumped registers, to be let go from a signal stop: unchanged, but a call
    interrupted with -ERESTART_RESTARTBLOCK returns -EINTR (see the module docstring)."""
    if signed(regs.orig_rax) >= 0 and -signed(regs.rax) == ERESTART_RESTARTBLOCK:
        regs.rax = (-errno.EINTR) & U64
    return regs


# Signals whose sending has side effects (SIGCONT and the stop signals drop each other from
# the queues) or that cannot be caught: never used to park a task.
NOT_PARKING = {int(s) for s in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP,
                                signal.SIGTTIN, signal.SIGTTOU)}


def park_signal(pending: set[int]) -> int:
    """The signal that stops a task for its release: SIGTRAP unless the image has one
    queued (the parking one is discarded, and a standard signal queues once)."""
    order: list[int] = [signal.SIGTRAP.value, *range(1, 65)]
    for sig in order:
        if sig not in pending and sig not in NOT_PARKING:
            return sig
    raise RestoreError("every signal is pending in the image: none left to park the process")


def ksigaction(act: pb.SigAction) -> bytes:
    """struct k_sigaction as rt_sigaction takes it."""
    return KSIGACTION.pack(act.handler, act.flags, act.restorer, act.mask)


def image_action(entry: pb.ProcessEntry, signo: int) -> bytes:
    """The image's action for ``signo``; SIG_DFL (all zero) where it has none."""
    act = next((a for a in entry.sigactions if a.signo == signo), pb.SigAction(signo=signo))
    return ksigaction(act)


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
        args = clone_args(CLONE_THREAD_FLAGS, 0, tid_arr if same_tids else 0,
                          1 if same_tids else 0)
        assert stub.inj is not None
        stub.inj.prepare(NR.clone3, (stub.put(args, 3200), len(args)))
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


def load_registers(task: Tracee, th: pb.ThreadCore, mask: int | None = None) -> None:
    """The thread's XSTATE, dumped registers and signal mask (``mask`` meanwhile). At its
    last int3 stop, this parks a thread other than the leader."""
    task.set_regset(NT_X86_XSTATE, th.xstate)
    task.setregs(restart_regs(regs_from_pb(th.regs)))
    task.set_sigmask(th.sigmask if mask is None else mask)


def queue_own_signals(task: Stub, ip: int, tgid: int, th: pb.ThreadCore,
                      entry: pb.ProcessEntry) -> Injector:
    """Queue a thread's own pending signals from inside that thread: rt_tgsigqueueinfo
    takes a siginfo of the kernel's or of tgkill (si_code >= 0, SI_TKILL) only from the
    thread it is for. No trap (SIGTRAP may be among them) and every signal blocked, so
    none is delivered meanwhile; the thread is left at the last syscall-exit stop."""
    inj = Injector(task.task, ip, trap=False)
    task.task.set_sigmask(U64)
    for info in image_signals(entry, th.tid, th.pending_signals):  # (ckpt.restore.timers)
        signo = siginfo.signo(info)
        inj(NR.rt_tgsigqueueinfo, tgid, task.task.tid, signo, task.put(info, 3840),
            what=f"rt_tgsigqueueinfo({task.task.tid}, {signo})")
    return inj


def itimerval(t: pb.Itimer) -> bytes:
    """struct itimerval for setitimer: it_interval, it_value as (tv_sec, tv_usec)."""
    return struct.pack("qqqq", *divmod(t.interval_us, 1_000_000), *divmod(t.value_us, 1_000_000))


def last_syscalls(stub: Stub, entry: pb.ProcessEntry, threads: list[Stub]) -> None:
    """The last injections, after every trap of every thread: each stops at syscall entry
    and exit (never a forced SIGTRAP) with every signal blocked, so nothing is delivered
    meanwhile and a queued SIGTRAP stays queued. A thread other than the leader queues its
    own pending signals and is parked (see park); one without any is parked at its last
    int3 stop. Then the leader queues the process's and its own, sets SIGTRAP's action and
    unmaps the gadget."""
    for task, th in zip(threads, entry.threads[1:], strict=True):
        if th.pending_signals:
            queue_own_signals(task, stub.gadget, stub.pid, th, entry)
            park(stub.pid, task.task, th, entry)
        else:
            load_registers(task.task, th)
    inj = queue_own_signals(stub, stub.gadget, stub.pid, entry.threads[0], entry)
    for info in image_signals(entry, 0, entry.shared_pending):
        if is_stop_mark(info):  # a stopped process: finish_process stops it last
            continue
        signo = siginfo.signo(info)
        inj(NR.rt_sigqueueinfo, stub.pid, signo, stub.put(info, 3840),
            what=f"rt_sigqueueinfo({signo})")
    for t in entry.itimers:  # armed last: a SIGALRM meanwhile stays pending (all blocked)
        inj(NR.setitimer, t.which, stub.put(itimerval(t), 3968), 0, what="setitimer")
    arm_timers(inj, stub, entry)  # POSIX timers likewise (ckpt.restore.timers)
    inj(NR.rt_sigaction, signal.SIGTRAP, stub.put(image_action(entry, signal.SIGTRAP)), 0, 8,
        what="rt_sigaction(SIGTRAP)")
    # Nothing is fetched from the gadget after this: the syscall-exit stop comes first.
    inj(NR.munmap, stub.gadget, GADGET_LEN, what="munmap gadget")


def park(tgid: int, task: Tracee, th: pb.ThreadCore, entry: pb.ProcessEntry) -> None:
    """From a syscall-exit stop to a signal-delivery-stop with the thread's own registers
    and mask (see the module docstring)."""
    pending = {siginfo.signo(i) for i in [*entry.shared_pending, *th.pending_signals]}
    sig = park_signal(pending)
    load_registers(task, th, mask=U64 & ~(1 << (sig - 1)))
    tgkill(tgid, task.tid, sig)
    task.cont()
    if task.wait_stop(sig) >> 16:
        raise RestoreError(f"task {task.tid} stopped for a ptrace event, not signal {sig}")
    task.set_sigmask(th.sigmask)


def park_leader(stub: Stub, entry: pb.ProcessEntry) -> None:
    """The leader, after its last syscall: see park."""
    park(stub.pid, stub.task, entry.threads[0], entry)
