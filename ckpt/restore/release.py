"""The release: each restored thread let go from its park (ckpt.restore.tasks), without a
window in which a signal could be handled while its interrupted call is not running.

A thread dumped inside an interruptible call that the kernel restarts (-ERESTARTNOHAND:
pause, sigsuspend, epoll_wait; -ERESTARTSYS: read, wait4 and most blocking calls) is
parked in a signal-delivery-stop with its dumped registers. Let go from there with no
signal to deliver, the kernel restarts the call: rax = orig_rax, rip back on the
``syscall`` instruction, back to user mode, which enters the call again. A signal landing
in between (microseconds, or a whole page fault when the code page is not mapped yet) is
handled as in user code, without the restart rules, and the call then sleeps on, where
the original's call would have returned EINTR after the handler (-ERESTARTNOHAND always,
-ERESTARTSYS without SA_RESTART). Such a thread is resumed with PTRACE_SYSCALL instead,
one more stop:

    parked ──PTRACE_SYSCALL──▶ restart ──▶ user mode ──▶ syscall-entry stop
                                  └─── a signal S first: signal-delivery-stop

    entry stop   the call is being entered again: from here a signal interrupts it
    signal stop  S ignored by the process (SIG_IGN, or a default-ignored signal) would not
                 have woken the original: dropped, and PTRACE_SYSCALL again. Otherwise the
                 dumped registers go back (the call interrupted, as the original's was)
                 and the thread is detached with S: the kernel applies the restart rules
                 for S's action exactly as for the original (EINTR, or the call again
                 after an SA_RESTART handler), or stops the process for a stop signal.

PTRACE_DETACH at the entry stop would open the window again: it sets TIF_SIGPENDING
(__ptrace_unlink), so the call returns -ERESTART* at once and is restarted through the
same window (seen with ftrace: sys_pause -> -514 and sys_pause again). The tracer's exit
does not: exit_ptrace unlinks a tracee that is not in a ptrace stop without waking it.
So a restore runs in a ReleaseThread (run_released): at its entry stop a thread loses
PTRACE_O_EXITKILL and is continued, asleep in its call and traced until the ReleaseThread
ends; a signal meanwhile stops it in the call's own signal-delivery-stop, which the
unlink lets go with that signal (so nothing in ckpt may wait for such a thread meanwhile:
waitpid would take the signal with the stop's status, and it would be dropped).
run_released returns once the kernel has let every such thread go.

Unchanged, each thread is detached from its park: a call the kernel does not restart
through the window (-ERESTARTNOINTR is restarted after a handler too; -ERESTART_RESTARTBLOCK
became -EINTR, see restart_regs), a stopped restore (SIGSTOP is taken first, in the
kernel) and a restore from a thread that lives on (a warm restore): its tracees would stay
traced.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ckpt import testpoint
from ckpt.collect.proc import read_status
from ckpt.errors import NoSuchProcess, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.regs import regs_from_pb
from ckpt.kernel.ptrace import PTRACE_O_EXITKILL, PTRACE_O_TRACESYSGOOD, Regs, Tracee, signed
from ckpt.restore.stub import Stub
from ckpt.restore.tasks import restart_regs

T = TypeVar("T")
SYSCALL_STOP = signal.SIGTRAP | 0x80  # with PTRACE_O_TRACESYSGOOD
SIG_IGN = 1
# restarted by the kernel, but interrupted (EINTR) where a handler runs first
ERESTARTSYS, ERESTARTNOHAND = 512, 514
# SIG_DFL means ignore (sig_kernel_ignore); SIGCONT's side effects are done when it is sent
DEFAULT_IGNORED = {int(s) for s in (signal.SIGCHLD, signal.SIGCONT, signal.SIGURG,
                                    signal.SIGWINCH)}
UNTRACE_PATIENCE = 10.0  # seconds for the kernel to let go of a ReleaseThread's tracees


def through_window(regs: Regs) -> bool:
    """Whether registers loaded at the park make the kernel restart a call that a handler
    run before it would have interrupted (see the module docstring)."""
    return signed(regs.orig_rax) >= 0 and -signed(regs.rax) in (ERESTARTSYS, ERESTARTNOHAND)


def ignored(entry: pb.ProcessEntry, signo: int) -> bool:
    """Whether the process ignores ``signo``: the kernel drops such a signal when it is
    sent (a traced thread's comes to the tracer), so it never interrupts a call."""
    act = next((a for a in entry.sigactions if a.signo == signo), None)
    handler = act.handler if act is not None else 0
    return handler == SIG_IGN or (handler == 0 and signo in DEFAULT_IGNORED)


class ReleaseThread(threading.Thread, Generic[T]):
    """Runs one restore and ends; the threads it left running traced (``left``) are let
    go by the kernel when it exits (see the module docstring)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        super().__init__(name="ckpt-restore")
        self.fn = fn
        self.left: list[int] = []
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the caller by run_released
            self.error = exc


def run_released(fn: Callable[[], T]) -> T:
    """``fn`` (a restore) in a ReleaseThread; its result once every thread it released is
    untraced. Ctrl-C meanwhile is raised inside the restore, which undoes itself."""
    thread: ReleaseThread[T] = ReleaseThread(fn)
    thread.start()
    interrupted = False
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt:
            interrupted = True
            assert thread.ident is not None
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                       ctypes.py_object(KeyboardInterrupt))
    wait_untraced(thread.left)
    if thread.error is not None:
        raise thread.error
    if interrupted:  # too late to undo the restore: as if it came right after
        raise KeyboardInterrupt
    return thread.result  # type: ignore[return-value]  # set when there is no error


def wait_untraced(tids: list[int], root: str = "/proc") -> None:
    """Until the kernel has unlinked each task (the tracer thread's exit comes after the
    join: its tid futex is cleared before exit_ptrace runs)."""
    deadline = time.monotonic() + UNTRACE_PATIENCE
    for tid in tids:
        while True:
            try:
                if read_status(tid, root=root).tracer == 0:
                    break
            except (NoSuchProcess, OSError):
                break  # gone (killed meanwhile)
            if time.monotonic() > deadline:
                raise RestoreError(f"restored thread {tid} is still traced")
            time.sleep(0.0002)


def release(stub: Stub, threads: list[Stub], entry: pb.ProcessEntry, stopped: bool) -> None:
    """Let every thread go from its park, the others first (see the module docstring)."""
    current = threading.current_thread()
    left = current.left if isinstance(current, ReleaseThread) and not stopped else None
    for task, th in zip([*threads, stub], [*entry.threads[1:], entry.threads[0]], strict=True):
        if left is not None and through_window(regs_from_pb(th.regs)):
            if release_at_entry(stub.pid, task.task, th, entry):
                left.append(task.task.tid)
        else:
            task.task.detach()
            testpoint.signal_at("resumed", stub.pid)


def release_at_entry(pid: int, task: Tracee, th: pb.ThreadCore, entry: pb.ProcessEntry,
                     ) -> bool:
    """Resume a parked thread until it enters its call again, then leave it running,
    traced and without EXITKILL (True); or detach it with a signal met on the way, after
    loading the dumped registers back (False)."""
    dumped = regs_from_pb(th.regs)
    task.set_options(PTRACE_O_EXITKILL | PTRACE_O_TRACESYSGOOD)
    task.syscall()
    testpoint.signal_at("resumed", pid)
    while True:
        status = task.wait()
        if not os.WIFSTOPPED(status):
            return False  # killed (SIGKILL is not reported first)
        sig = os.WSTOPSIG(status)
        if sig == SYSCALL_STOP or status >> 16:
            regs = task.getregs()
            if status >> 16 or (regs.orig_rax, regs.rip) != (dumped.orig_rax, dumped.rip):
                task.detach()  # not a stop this path leads to: let it go as it is
                return False
            task.set_options(0)
            task.cont()
            return True
        if ignored(entry, sig):
            task.syscall()
            continue
        task.setregs(restart_regs(dumped))
        task.detach(sig)
        return False

