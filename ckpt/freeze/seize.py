"""Freeze a process: PTRACE_SEIZE + PTRACE_INTERRUPT every thread, always released.

    with Frozen(pid) as frozen:      # every thread in a ptrace event-stop
        ...collect, inject, copy...
        frozen.kill()                # only when the user asked for it (dump without
                                     # --leave-running); otherwise __exit__ detaches
                                     # and the target runs on, whatever happened inside.

PTRACE_SEIZE (unlike PTRACE_ATTACH) sends no SIGSTOP, so the target's job-control state is
untouched, and when ckpt dies, even by SIGKILL, the kernel detaches and the target resumes.
SIGINT/SIGTERM/SIGHUP delivered to ckpt while frozen raise :class:`Interrupted`, which unwinds
through ``__exit__`` like any other error.

A process in a job-control stop (SIGSTOP, SIGTSTP, ...) reports a group-stop instead of
the interrupt, and would go back to it whenever resumed, so no syscall could be injected.
Once every thread is seized (traced threads are not woken by it), a SIGCONT ends the
group-stop and each thread is interrupted again; on release a SIGSTOP, queued before
the detach, puts the process back in the stop before it runs an instruction
(``stop_signal`` says it was stopped; as CRIU does). If ckpt is killed meanwhile, the
kernel detaches and the process runs on: the only state a kill -9 changes.

A whole process tree: :class:`ckpt.freeze.tree.FrozenTree`, one Frozen per member.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType

from ckpt import testpoint
from ckpt.collect import proc
from ckpt.collect.proc import is_kernel_thread, list_tasks
from ckpt.errors import AccessDenied, CkptError, KernelError, NoSuchProcess, NotDumpable
from ckpt.kernel import siginfo
from ckpt.kernel.creds import PTRACE_O_SUSPEND_SECCOMP, suspend_seccomp_refused
from ckpt.kernel.ptrace import (
    ALL_SIGNALS,
    PTRACE_EVENT_STOP,
    PTRACE_INTERRUPT,
    PTRACE_SEIZE,
    Tracee,
    ptrace,
)
from ckpt.kernel.sys import tgkill

SEIZE_ROUNDS = 50
STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _tracer_of(root: str, pid: int, tid: int) -> int:
    try:
        with open(f"{root}/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def seize_options(status: proc.Status) -> int:
    """The ptrace options a seized task needs: PTRACE_O_SUSPEND_SECCOMP for a task under
    seccomp (strict or filter), none otherwise, so that dumping a task without seccomp
    does not depend on a kernel feature and a privilege it does not need."""
    return PTRACE_O_SUSPEND_SECCOMP if status.seccomp else 0


class Interrupted(CkptError):
    exit_code = 130

    def __init__(self, signo: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signo).name}; target released")


Handlers = dict[int, Callable[[int, FrameType | None], object] | int | None]


def install_signal_handlers() -> Handlers:
    """SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` from now on; returns the old ones."""
    def handler(signo: int, frame: FrameType | None) -> None:
        raise Interrupted(signo)

    return {signo: signal.signal(signo, handler) for signo in _HANDLED}


def restore_signal_handlers(old: Handlers) -> None:
    for signo, was in old.items():
        signal.signal(signo, was)
    old.clear()


class Frozen:
    """Context manager holding every thread of ``pid`` stopped under ptrace."""

    def __init__(self, pid: int, proc_root: str = "/proc") -> None:
        self.pid = pid
        self.root = proc_root
        self.tasks: dict[int, Tracee] = {}
        self.pending_signals: dict[int, list[int]] = {}  # tid -> signals to queue on detach
        self.stop_signal = 0  # the job-control stop the process was in when seized, or 0
        self._group_stopped: list[Tracee] = []
        self.frozen_at = 0.0
        self.killed = False
        self._old_handlers: Handlers = {}

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> Frozen:
        self.check()
        self._old_handlers = install_signal_handlers()
        self.frozen_at = time.perf_counter()  # frozen time counts the stopping itself
        try:
            self.seize()
        except BaseException:
            self._release()
            raise
        return self

    def check(self) -> None:
        """Refuse what can never be frozen: a pid that does not exist, a kernel thread."""
        if not os.path.exists(f"{self.root}/{self.pid}"):
            raise NoSuchProcess(self.pid)
        if is_kernel_thread(self.pid, root=self.root):
            raise NotDumpable(f"process {self.pid} is a kernel thread")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._release()

    def _release(self) -> None:
        try:
            if not self.killed:
                self.detach_all()
        finally:
            restore_signal_handlers(self._old_handlers)

    @contextlib.contextmanager
    def near(self) -> Iterator[None]:
        """Run this thread meanwhile on the CPU the target's leader last ran on.

        Each ptrace request waits until the tracee is off its CPU (wait_task_inactive);
        a tracee woken for an injected syscall runs where it ran before, and if that is
        another CPU than ours the wait can last a scheduler tick. Only ckpt's own CPU mask
        changes, never the target's. Threads started meanwhile would inherit the mask:
        keep page copying and compression outside."""
        mine = os.sched_getaffinity(0)
        try:
            cpu = proc.read_stat(self.pid, root=self.root).processor
        except CkptError:
            cpu = -1
        pinned = cpu in mine and mine != {cpu}
        if pinned:
            os.sched_setaffinity(0, {cpu})
        try:
            yield
        finally:
            if pinned:
                os.sched_setaffinity(0, mine)

    # ------------------------------------------------------------------ seize
    def seize(self) -> None:
        """Seize and interrupt threads until /proc/PID/task shows no new ones (no signal
        handlers installed: __enter__ does that; a FrozenTree once for all members).
        Called again, it seizes only threads it does not hold yet."""
        for _ in range(SEIZE_ROUNDS):
            tids = list_tasks(self.pid, root=self.root)
            new = [t for t in tids if t not in self.tasks]
            if not new:
                gone = [t for t in self.tasks if t not in tids]
                for tid in gone:
                    del self.tasks[tid]
                self._end_group_stop()
                self._suspend_seccomp()
                return
            for tid in new:
                try:
                    ptrace(PTRACE_SEIZE, tid, 0, 0)
                except NoSuchProcess:
                    if tid == self.pid:
                        raise
                    continue  # thread exited meanwhile
                except AccessDenied:
                    tracer = _tracer_of(self.root, self.pid, tid)
                    if tracer:
                        raise NotDumpable(f"process {self.pid} is already traced by process "
                                          f"{tracer} (a debugger?)") from None
                    raise
                self.tasks[tid] = Tracee(tid)
                testpoint.pause_at("seized")
                ptrace(PTRACE_INTERRUPT, tid)
                self._wait_interrupt(self.tasks[tid])
        raise NotDumpable(f"process {self.pid} keeps creating threads; cannot freeze it")

    def _wait_interrupt(self, task: Tracee) -> None:
        """Wait for the event stop; a signal-delivery stop on the way is kept for later, a
        group-stop (the process is stopped) is ended by _end_group_stop."""
        while True:
            status = task.wait_stop()
            if status >> 16 == PTRACE_EVENT_STOP:
                if os.WSTOPSIG(status) != signal.SIGTRAP:
                    self.stop_signal = os.WSTOPSIG(status)
                    self._group_stopped.append(task)
                return
            sig = os.WSTOPSIG(status)
            # A signal arrived first. Deliver it now: the kernel dequeued it, so it is in no
            # queue the dump reads, and a signal passed to PTRACE_DETACH from the event stop
            # would be dropped. Its handler's frame is set up (or its default action taken)
            # and the interrupt, asked for first, stops the task before any user
            # instruction. Held instead (queued again at the release): the SIGCONT that
            # _end_group_stop sent, ckpt's own, kept from any handler; and a stop signal,
            # which would start another group-stop in the middle of the freeze.
            if sig in STOP_SIGNALS or (sig == signal.SIGCONT and self.stop_signal):
                self.pending_signals.setdefault(task.tid, []).append(sig)
                sig = 0
            ptrace(PTRACE_INTERRUPT, task.tid)
            task.cont(sig)

    def _end_group_stop(self) -> None:
        """Every thread is seized: end the job-control stop (see the module docstring)."""
        if not self._group_stopped:
            return
        os.kill(self.pid, signal.SIGCONT)
        for _ in range(SEIZE_ROUNDS):
            tasks, self._group_stopped = self._group_stopped, []
            if not tasks:
                return
            for task in tasks:
                ptrace(PTRACE_INTERRUPT, task.tid)
                task.cont(0)
                self._wait_interrupt(task)
            self._take_sigcont()
        raise NotDumpable(f"process {self.pid} keeps stopping; cannot freeze it")

    def _take_sigcont(self) -> None:
        """Our SIGCONT is still queued (a traced process gets even ignored signals queued)
        and would show up in the first injected syscall: drop it (drop_queued)."""
        self.drop_queued(signal.SIGCONT)

    def drop_queued(self, signo: int, match: Callable[[bytes], bool] | None = None) -> None:
        """Drop a signal ckpt caused that is queued to the process (the first queued
        ``signo``, if its siginfo ``match``es): let the leader take it now, into a
        signal-delivery stop where it is dropped, with every other signal blocked
        meanwhile, and interrupted again before it runs anything."""
        leader = self.tasks[self.pid]
        queued = [i for i in leader.pending_signals(shared=True) if siginfo.signo(i) == signo]
        if not queued or (match is not None and not match(queued[0])):
            return
        mask = leader.get_sigmask()
        leader.set_sigmask(ALL_SIGNALS & ~(1 << (signo - 1)))
        try:
            leader.cont(0)
            status = leader.wait_stop()
            if status >> 16 == 0 and os.WSTOPSIG(status) != signo:
                self.pending_signals.setdefault(leader.tid, []).append(os.WSTOPSIG(status))
            ptrace(PTRACE_INTERRUPT, leader.tid)
            leader.cont(0)
            self._wait_interrupt(leader)
        finally:
            leader.set_sigmask(mask)

    def _suspend_seccomp(self) -> None:
        """A seccomp filter (or strict mode) must neither fail nor kill ckpt's injected
        syscalls: PTRACE_O_SUSPEND_SECCOMP suspends it while traced, and the kernel drops
        the option at detach. Asked for only where a thread is under seccomp, once every
        thread is stopped (none can install a filter any more, not even with TSYNC): it
        needs CONFIG_CHECKPOINT_RESTORE, CAP_SYS_ADMIN and a ckpt not under seccomp."""
        for tid, task in self.tasks.items():
            status = proc.parse_status(proc.read_text(self.pid, self.root, "task", str(tid),
                                                      "status"))
            options = seize_options(status)
            if not options:
                continue
            try:
                task.set_options(options)
            except (AccessDenied, KernelError) as exc:
                if (why := suspend_seccomp_refused(exc)) is None:
                    raise
                raise NotDumpable(f"thread {tid} of process {self.pid} is under seccomp and "
                                  f"{why}") from None

    # ------------------------------------------------------------------ release
    def detach_all(self) -> None:
        errors: list[BaseException] = []
        if self.stop_signal and self.tasks:
            # back into the stop: queued while traced, taken before any user instruction
            os.kill(self.pid, signal.SIGSTOP)
        for tid, sigs in self.pending_signals.items():
            for sig in sigs:
                if tid in self.tasks and sig != signal.SIGCONT:  # SIGCONT: ours
                    # queued again while traced (PTRACE_DETACH drops a signal from an event
                    # stop)
                    with contextlib.suppress(CkptError):
                        tgkill(self.pid, tid, sig)
        for tid, task in list(self.tasks.items()):
            try:
                task.detach()
            except NoSuchProcess:
                pass
            except CkptError as exc:  # keep detaching the others
                errors.append(exc)
            del self.tasks[tid]
        if errors:
            raise errors[0]

    def kill(self, then: Callable[[], None] | None = None) -> None:
        """SIGKILL the target and reap our traced threads so its pid can be reused.

        ``then`` runs as soon as the SIGKILL is queued: the target can never execute
        another instruction, though tearing down a large address space takes a while."""
        os.kill(self.pid, signal.SIGKILL)
        self.killed = True
        try:
            if then is not None:
                then()
        finally:
            self.reap()
            deadline = time.monotonic() + 5.0
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.002)  # a zombie is dead enough; its parent reaps it

    def reap(self) -> None:
        """Wait for every traced thread's exit (the process is dying: SIGKILLed), so ptrace
        lets go of it: its pid can be reused, or it stays a zombie of its real parent."""
        others = [t for t in self.tasks if t != self.pid]
        for tid in [*others, self.pid]:
            if tid not in self.tasks:
                continue
            try:
                while True:
                    _, status = os.waitpid(tid, 0x40000000)
                    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                        break
            except ChildProcessError:
                pass
        self.tasks.clear()

    def alive(self) -> bool:
        try:
            return proc.read_stat(self.pid, root=self.root).state not in ("Z", "X")
        except NoSuchProcess:
            return False

    @property
    def leader(self) -> Tracee:
        return self.tasks[self.pid]

    def threads(self) -> list[Tracee]:
        """Leader first, then the other threads by tid."""
        return [self.leader] + [t for tid, t in sorted(self.tasks.items()) if tid != self.pid]
