"""The stub: a traced child of ckpt that is turned into the restored process.

ckpt forks; the child asks to be traced and stops itself. From then on every change to it
is a syscall injected through a *gadget*, a page holding ``syscall; int3`` mapped at an
address no VMA of the target uses, followed by scratch pages for syscall arguments:

    gadget page   : 0f 05 cc ...           rip points here; int3 stops after the syscall
    scratch pages : paths, structs, auxv   written through /proc/PID/mem

PTRACE_O_EXITKILL makes the kernel kill the stub if ckpt dies, so a failed restore never
leaves a half-built process; :meth:`Stub.kill` does the same on an orderly failure,
through a pidfd opened at its fork (while it is surely ours): once let go, a process
may exit and be reaped, and its pid be another's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import time
from collections.abc import Iterator

from ckpt.collect.proc import id_holder, list_tasks
from ckpt.errors import KernelError, NoSuchProcess, RestoreError
from ckpt.kernel.creds import require_root
from ckpt.kernel.ptrace import (
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_FORK,
    PTRACE_O_EXITKILL,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEFORK,
    PTRACE_TRACEME,
    Injector,
    Tracee,
    signed,
)
from ckpt.kernel.sys import (
    NR,
    PAGE_SIZE,
    clone_args,
    current_cpu,
    default_all_sigactions,
    kill_and_reap,
    libc,
    pidfd_open,
)

GADGET_CODE = b"\x0f\x05\xcc"  # syscall; int3
GADGET_PAGES = 16
GADGET_LEN = GADGET_PAGES * PAGE_SIZE
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
PROT_RWX = 7
MAP_PRIVATE_ANON = 0x22
MAP_FIXED_NOREPLACE = 0x100000
PID_PATIENCE = 3.0  # seconds of attempts: forks elsewhere may take the pid many times


def fork_stub(want_pid: int | None, reserve: int = 0) -> int:
    """Fork a child that stops under PTRACE_TRACEME; with ``want_pid``, get exactly that pid.

    The pid counter is then moved past ``reserve`` (the highest thread id still to be
    created with clone3 set_tid) and never behind where it was, so that processes forked
    meanwhile take neither our thread ids nor recently freed pids.
    """
    if want_pid is None:
        return _fork_traced(-1)
    with open(NS_LAST_PID, "r+") as last:
        fcntl.flock(last, fcntl.LOCK_EX)  # other ckpt instances serialize on it, as CRIU does
        reserve = max(reserve, int(last.read() or 0))
        deadline = time.monotonic() + PID_PATIENCE
        while time.monotonic() < deadline:
            last.seek(0)
            last.write(str(want_pid - 1))
            last.flush()
            pid = _fork_traced(last.fileno())
            if pid == want_pid:
                last.seek(0)
                last.write(str(max(reserve, pid)))
                last.flush()
                return pid
            kill_and_reap(pid)
    raise RestoreError(f"could not obtain pid {want_pid} (something else keeps taking it)")


def _fork_traced(locked: int) -> int:
    """The child drops every signal action it inherited from ckpt (Python's SIGINT handler
    pointing into ckpt, SIGPIPE and SIGXFSZ ignored): a restored process starts from the
    kernel's defaults, and only the image's own actions are set on top. It closes
    ``locked``, ns_last_pid flocked by fork_stub: its copy would hold the lock, and every
    other restore wait, as long as it lives with it (a tree's stubs, until their fds go)."""
    pid = os.fork()
    if pid == 0:  # child: as little Python as possible
        try:
            if locked >= 0:
                os.close(locked)
            default_all_sigactions()
            libc.ptrace(PTRACE_TRACEME, 0, None, None)
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(127)
    return pid


class Stub:
    """The stub process (or one of its threads) and the injector driving it."""

    def __init__(self, pid: int, tid: int | None = None) -> None:
        self.pid = pid
        self.task = Tracee(tid if tid is not None else pid)
        self.inj: Injector | None = None
        self.gadget = 0
        self._mem_fd = -1
        self.pidfd = -1  # the process's, from its fork (thread stubs have none)
        self._mask: set[int] | None = None  # CPU mask to give back (see colocated)

    @classmethod
    def spawn(cls, want_pid: int | None, reserve: int = 0) -> Stub:
        require_root("restore")  # before ns_last_pid: one clear line, not EPERM
        pid = fork_stub(want_pid, reserve)
        stub = cls(pid)
        try:
            stub.pidfd = pidfd_open(pid)  # our child, not reaped: no other process's pid
            stub.task.wait_stop(signal.SIGSTOP)
            stub.task.set_options(PTRACE_O_EXITKILL)
        except BaseException:
            stub.kill()
            raise
        return stub

    def fork_child(self, pid: int, exit_signal: int) -> Stub:
        """A child process of this stub with exactly ``pid``, forked from the gadget (clone3,
        set_tid): traced by ckpt from birth (PTRACE_O_TRACEFORK), stopped, with the same
        gadget and options. Its parent is this stub, its exit signal ``exit_signal``."""
        assert self.inj is not None, "gadget not installed"
        self.task.set_options(PTRACE_O_EXITKILL | PTRACE_O_TRACEFORK | PTRACE_O_TRACECLONE)
        tid_arr = self.put(struct.pack("i", pid), 3072)
        args = clone_args(0, exit_signal, tid_arr, 1)
        self.inj.prepare(NR.clone3, (self.put(args, 3200), len(args)))
        self.task.cont()
        status = self.task.wait_stop(signal.SIGTRAP)
        if status >> 16 not in (PTRACE_EVENT_FORK, PTRACE_EVENT_CLONE):
            err = -signed(self.task.getregs().rax)
            if err == errno.EEXIST:
                raise RestoreError(pid_taken(pid))
            raise RestoreError(f"clone3 for process {pid} in {self.pid} failed: "
                               f"{errno.errorcode.get(err, err)}")
        new = self.task.event_msg()
        self.task.cont()
        self.task.wait_stop(signal.SIGTRAP)  # the parent returns and hits int3
        child = Stub(new)
        try:
            child.pidfd = pidfd_open(new)  # traced by us, its parent stopped: not reaped
            child.task.wait_stop()  # auto-attached children start with SIGSTOP
            if self._mask is not None:  # forked while pinned (see colocated)
                os.sched_setaffinity(new, self._mask)
        except BaseException:
            child.kill()
            raise
        child.use_gadget(self.gadget)
        return child

    # ------------------------------------------------------------------ gadget
    def install_gadget(self, addr: int) -> None:
        """Map the gadget at ``addr``, bootstrapping through the stub's current rip."""
        regs = self.task.getregs()
        self.write_mem(int(regs.rip), GADGET_CODE)  # stub's own text; it is discarded anyway
        boot = Injector(self.task, int(regs.rip), regs, trap=True)
        got = boot(NR.mmap, addr, GADGET_LEN, PROT_RWX, MAP_PRIVATE_ANON | MAP_FIXED_NOREPLACE, -1,
                   0, what="mmap gadget")
        if got != addr:
            raise RestoreError(f"gadget landed at {got:#x}, not {addr:#x}")
        self.write_mem(addr, GADGET_CODE)
        self.use_gadget(addr)

    def move_gadget(self, addr: int) -> None:
        """Map a new gadget at ``addr`` through the current one, then drop the old one."""
        got = self.sc(NR.mmap, addr, GADGET_LEN, PROT_RWX, MAP_PRIVATE_ANON | MAP_FIXED_NOREPLACE,
                      -1, 0, what="mmap gadget")
        if got != addr:
            raise RestoreError(f"gadget landed at {got:#x}, not {addr:#x}")
        self.write_mem(addr, GADGET_CODE)
        old = self.gadget
        self.use_gadget(addr)
        self.sc(NR.munmap, old, GADGET_LEN, what="munmap old gadget")

    def use_gadget(self, addr: int) -> None:
        self.gadget = addr
        self.inj = Injector(self.task, addr, trap=True)

    @property
    def scratch(self) -> int:
        return self.gadget + PAGE_SIZE

    # ------------------------------------------------------------------ syscalls
    def sc(self, nr: int, *args: int, what: str = "", check: bool = True) -> int:
        assert self.inj is not None, "gadget not installed"
        if check:
            return self.inj(nr, *args, what=what)
        return self.inj.raw(nr, *args)

    def put(self, data: bytes, off: int = 0) -> int:
        """Copy ``data`` into the scratch area at ``off``; return its remote address."""
        if off + len(data) > GADGET_LEN - PAGE_SIZE:
            raise RestoreError(f"argument of {len(data)} bytes does not fit the scratch area")
        self.write_mem(self.scratch + off, data)
        return self.scratch + off

    def put_str(self, s: str, off: int = 0) -> int:
        return self.put(os.fsencode(s) + b"\0", off)

    # ------------------------------------------------------------------ memory
    def mem_fd(self) -> int:
        if self._mem_fd < 0:
            self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR)
        return self._mem_fd

    def write_mem(self, addr: int, data: bytes | memoryview) -> None:
        """Write through /proc/PID/mem: forces access, so read-only pages work too."""
        done = 0
        view = memoryview(data)
        while done < len(view):
            try:
                n = os.pwrite(self.mem_fd(), view[done:], addr + done)
            except OSError as exc:
                raise KernelError(exc.errno or 5, f"write {len(view)} bytes at {addr:#x}") from exc
            if n <= 0:
                raise RestoreError(f"short write at {addr + done:#x}")
            done += n

    # ------------------------------------------------------------------ CPU
    @contextlib.contextmanager
    def colocated(self) -> Iterator[None]:
        """Run the calling thread and every task of the stub on one CPU meanwhile.

        Each ptrace request first waits until the tracee is off its CPU
        (wait_task_inactive). A tracee that just stopped on another CPU may still be
        switching out, and that wait can last a scheduler tick: with dozens of injected
        syscalls, milliseconds of restore time, and of migration downtime. On our own CPU
        it is always off by the time we run. The CPU is one the stub may use (after it
        joined its cgroups, a cpuset may exclude ours) and we may use too; without such a
        CPU nothing is pinned. The CPU masks are put back on every path; threads cloned
        meanwhile get the stub's own mask (see release_cpu)."""
        try:
            mine = os.sched_getaffinity(0)
            theirs = os.sched_getaffinity(self.pid)
        except OSError as exc:
            raise KernelError(exc.errno or 5, f"CPU mask of stub {self.pid}") from exc
        cpu = colocation_cpu(current_cpu(), mine, theirs)
        if cpu is None:
            yield
            return
        self._mask = theirs
        try:
            try:
                os.sched_setaffinity(0, {cpu})
                for tid in self.tids():
                    with contextlib.suppress(ProcessLookupError):
                        os.sched_setaffinity(tid, {cpu})
            except OSError as exc:
                raise KernelError(exc.errno or 5, f"pin stub {self.pid} to CPU {cpu}") from exc
            yield
        finally:
            self.release_cpu()
            os.sched_setaffinity(0, mine)

    def release_cpu(self) -> None:
        """Give every task of the stub back its own CPU mask (before a detach)."""
        if self._mask is None:
            return
        for tid in self.tids():
            try:
                os.sched_setaffinity(tid, self._mask)
            except ProcessLookupError:
                pass
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: it joined a cpuset since, which
                    raise KernelError(exc.errno or 5, f"CPU mask of {tid}") from exc
                # set its mask to the cpuset's CPUs
        self._mask = None

    def tids(self) -> list[int]:
        try:
            return list_tasks(self.pid)
        except NoSuchProcess:
            return []

    def close(self) -> None:
        """Close what ckpt holds of the stub (/proc/PID/mem, the pidfd)."""
        for fd in (self._mem_fd, self.pidfd):
            if fd >= 0:
                os.close(fd)
        self._mem_fd = self.pidfd = -1

    def kill(self) -> None:
        """SIGKILL the process (through its pidfd: a process that took its pid after it
        was let go and reaped is left alone) and reap it; then close it."""
        # cloned threads are traced: reaped first
        kill_and_reap(self.pid, self.tids(), self.pidfd)
        self.close()


def pid_taken(pid: int, root: str = "/proc") -> str:
    """Why a pid of the dumped tree cannot be had: who holds it now."""
    holder = id_holder(pid, root=root)
    if holder is None:
        return f"pid {pid} was taken by a task that has exited since; try again"
    return f"pid {pid} is taken by {holder[1]}, which started after the dump"


def colocation_cpu(current: int, mine: set[int], theirs: set[int]) -> int | None:
    """The CPU to run ckpt and the stub on: ours if the stub may use it, else the lowest
    one both may use, else None (no colocation)."""
    both = mine & theirs
    if current in both:
        return current
    return min(both) if both else None
