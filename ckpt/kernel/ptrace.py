"""ptrace: seize/interrupt, register sets, signal masks, rseq, and syscall injection.

python-ptrace provides the register struct and PTRACE_GETREGS/SETREGS; it has no
SEIZE/INTERRUPT, regsets by note type, or injection, which live here. Errors become
typed ckpt errors carrying the tid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ptrace.binding.linux_struct import user_regs_struct

from ckpt import testpoint
from ckpt.errors import CkptError, KernelError
from ckpt.kernel.siginfo import SIGINFO_SIZE, code, signo
from ckpt.kernel.sys import NR, WALL, iovec, libc, raise_errno, syscall, tgkill, vm_write

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
SYSCALL_ENTRY, SYSCALL_EXIT = 1, 2  # PTRACE_EVENTMSG_SYSCALL_*: the message of a syscall stop
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_PEEKSIGINFO_SHARED = 1
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
ALL_SIGNALS = (1 << 64) - 1  # a signal mask blocking everything (the kernel ignores KILL/STOP)

PTRACE_O_TRACESYSGOOD = 0x1  # a syscall stop reports SIGTRAP | 0x80
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_FORK = 1  # clone3 with exit_signal SIGCHLD; any other reports EVENT_CLONE
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202
XSTATE_BUF = 16384

PTRACE_GETREGS = 12
PTRACE_SETREGS = 13


class Regs(user_regs_struct):  # type: ignore[misc]  # python-ptrace is untyped
    """struct user_regs_struct (python-ptrace's layout)."""


REG_NAMES: tuple[str, ...] = tuple(name for name, _ in user_regs_struct._fields_)
U64 = (1 << 64) - 1

libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def ptrace(req: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    res = int(libc.ptrace(req, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data)))
    if res == -1:
        err = ctypes.get_errno()
        if err:
            raise_errno(err, f"ptrace({req:#x})", tid)
    return res


def signed(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def copy_regs(r: Regs) -> Regs:
    new: Regs = Regs.from_buffer_copy(r)
    return new


class StopError(CkptError):
    """A traced task did not stop the way we expected (it died, or got a signal)."""


@dataclass(frozen=True)
class RseqConfig:
    abi_pointer: int
    abi_size: int
    signature: int
    flags: int


class Tracee:
    """One traced task (thread). Thin: every method is one ptrace request."""

    def __init__(self, tid: int) -> None:
        self.tid = tid

    def wait(self) -> int:
        try:
            _, status = os.waitpid(self.tid, WALL)
        except ChildProcessError as exc:
            raise StopError(f"task {self.tid} is gone") from exc
        return status

    def wait_stop(self, expect_sig: int | None = None) -> int:
        status = self.wait()
        if not os.WIFSTOPPED(status):
            how = (f"exited with {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
                   else f"was killed by signal {os.WTERMSIG(status)}")
            raise StopError(f"task {self.tid} {how} while traced")
        sig = os.WSTOPSIG(status)
        if expect_sig is not None and sig != expect_sig:
            raise StopError(f"task {self.tid} stopped by signal {sig}, expected {expect_sig}")
        return status

    def getregs(self) -> Regs:
        regs = Regs()
        ptrace(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(regs))
        return regs

    def setregs(self, regs: Regs) -> None:
        ptrace(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(regs))

    def get_regset(self, note: int, size: int = XSTATE_BUF) -> bytes:
        buf = ctypes.create_string_buffer(size)
        iov = iovec(ctypes.addressof(buf), size)
        ptrace(PTRACE_GETREGSET, self.tid, note, ctypes.addressof(iov))
        return buf.raw[: iov.iov_len]

    def set_regset(self, note: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        iov = iovec(ctypes.addressof(buf), len(data))
        ptrace(PTRACE_SETREGSET, self.tid, note, ctypes.addressof(iov))

    def get_sigmask(self) -> int:
        mask = ctypes.c_uint64()
        ptrace(PTRACE_GETSIGMASK, self.tid, 8, ctypes.addressof(mask))
        return mask.value

    def set_sigmask(self, mask: int) -> None:
        val = ctypes.c_uint64(mask)
        ptrace(PTRACE_SETSIGMASK, self.tid, 8, ctypes.addressof(val))

    def pending_signals(self, shared: bool) -> list[bytes]:
        """siginfo of signals queued to this thread (or, ``shared``, to its process).

        PTRACE_PEEKSIGINFO leaves them queued.
        """
        out: list[bytes] = []
        batch = 32
        buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
        while True:
            args = struct.pack("QIi", len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
            abuf = ctypes.create_string_buffer(args, len(args))
            n = ptrace(PTRACE_PEEKSIGINFO, self.tid, ctypes.addressof(abuf), ctypes.addressof(buf))
            out += [buf.raw[i * SIGINFO_SIZE : (i + 1) * SIGINFO_SIZE] for i in range(n)]
            if n < batch:
                return out

    def rseq(self) -> RseqConfig:
        buf = ctypes.create_string_buffer(32)
        ptrace(PTRACE_GET_RSEQ_CONFIGURATION, self.tid, 32, ctypes.addressof(buf))
        ptr, size, sig, flags = struct.unpack_from("QIII", buf.raw)
        return RseqConfig(ptr, size, sig, flags)

    def robust_list(self) -> tuple[int, int]:
        head, length = ctypes.c_uint64(), ctypes.c_size_t()
        syscall(NR.get_robust_list, self.tid, ctypes.addressof(head), ctypes.addressof(length),
                what="get_robust_list", pid=self.tid)
        return head.value, length.value

    def siginfo(self) -> bytes:
        buf = ctypes.create_string_buffer(SIGINFO_SIZE)
        ptrace(PTRACE_GETSIGINFO, self.tid, 0, ctypes.addressof(buf))
        return buf.raw

    def event_msg(self) -> int:
        msg = ctypes.c_ulong()
        ptrace(PTRACE_GETEVENTMSG, self.tid, 0, ctypes.addressof(msg))
        return msg.value

    def set_options(self, options: int) -> None:
        ptrace(PTRACE_SETOPTIONS, self.tid, 0, options)

    def cont(self, sig: int = 0) -> None:
        ptrace(PTRACE_CONT, self.tid, 0, sig)

    def step(self, sig: int = 0) -> None:
        ptrace(PTRACE_SINGLESTEP, self.tid, 0, sig)

    def syscall(self, sig: int = 0) -> None:
        ptrace(PTRACE_SYSCALL, self.tid, 0, sig)

    def detach(self, sig: int = 0) -> None:
        ptrace(PTRACE_DETACH, self.tid, 0, sig)


@dataclass(frozen=True)
class Landing:
    """Where a kill-safe injection runs (ckpt.kernel.sigframe): rip at a ``syscall; ret``,
    rsp at an rt_sigframe of the thread's own registers, and scratch bytes below it."""

    ip: int
    sp: int
    scratch: int


class Injector:
    """Runs syscalls inside a stopped task: point rip at a ``syscall`` instruction (``ip``,
    a ``0f 05`` in the task's address space) and let it run exactly that instruction.

    How the task is stopped again afterwards (``trap``):
      False  PTRACE_SYSCALL to the syscall-entry stop, again to the exit stop. Used on a
             live target: unlike single-stepping it leaves no TIF_SINGLESTEP behind, which
             the kernel does not clear if ckpt dies and would kill the target with SIGTRAP.
      True   PTRACE_CONT onto an ``int3`` that follows the instruction (the restore gadget).
    The task's registers are put back by :meth:`restore`.

    With a ``landing`` the syscall runs from a ``syscall; ret`` with rsp at a signal frame
    of the task's own state: if ckpt dies at any instant the kernel puts the task back by
    itself (rt_sigreturn). ``scratch`` is then memory for syscall outputs.

    A signal that reaches the task meanwhile (an interval timer's SIGPROF, a SIGCHLD)
    stops it in signal-delivery-stop: it is suppressed, the injection goes on, and
    :meth:`restore` queues it back to the task with its siginfo.
    """

    ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")

    def __init__(self, task: Tracee, ip: int, base: Regs | None = None,
                 trap: bool = False, landing: Landing | None = None) -> None:
        self.task = task
        self.ip = landing.ip if landing is not None else ip
        self.saved = base if base is not None else task.getregs()
        self.trap = trap
        self.landing = landing
        self.scratch = landing.scratch if landing is not None else 0
        self.count = 0
        self.suppressed: list[bytes] = []  # siginfo of signals held back, in order

    def prepare(self, nr: int, args: tuple[int, ...]) -> None:
        regs = copy_regs(self.saved)
        regs.rip, regs.rax, regs.orig_rax = self.ip, nr, U64
        if self.landing is not None:
            regs.rsp = self.landing.sp
        for name, value in zip(self.ARG_REGS, args, strict=False):
            setattr(regs, name, value & U64)
        self.task.setregs(regs)

    def _syscall_stop(self, op: int) -> None:
        """Resume with PTRACE_SYSCALL until the syscall stop ``op``; signals on the way
        are suppressed and remembered."""
        while True:
            self.task.syscall()
            status = self.task.wait_stop()
            if status >> 16:
                continue  # an event stop (a group stop): go on
            info = self.task.siginfo()
            # A syscall stop reports SIGTRAP with si_code SIGTRAP (no TRACESYSGOOD here).
            if (signo(info), code(info)) == (signal.SIGTRAP, signal.SIGTRAP):
                if self.task.event_msg() == op:
                    return
                continue
            self.suppressed.append(info)  # signal-delivery-stop: hold the signal back

    def raw(self, nr: int, *args: int) -> int:
        """Run one syscall; return its raw result (negative errno on failure)."""
        self.prepare(nr, args)
        testpoint.pause_at("inject-entry")
        if self.trap:
            self.task.cont()
            self.task.wait_stop(signal.SIGTRAP)
        else:
            self._syscall_stop(SYSCALL_ENTRY)
            testpoint.pause_at("inject-syscall")
            self._syscall_stop(SYSCALL_EXIT)
            testpoint.pause_at("inject-exit")
        self.count += 1
        return signed(self.task.getregs().rax)

    def __call__(self, nr: int, *args: int, what: str = "") -> int:
        res = self.raw(nr, *args)
        if -4096 < res < 0:
            raise KernelError(-res, f"{what or f'syscall {nr}'} in task {self.task.tid}")
        return res

    def requeue(self) -> None:
        """Queue the suppressed signals back to the task. The task queues them to itself
        (rt_tgsigqueueinfo from the task keeps a kernel siginfo); without scratch memory
        to hold it, ckpt sends the bare signal.

        Every signal is blocked meanwhile: a signal queued by one injection would
        otherwise be delivered at the next one's entry and suppressed anew, never to be
        queued again. Only a landing gives scratch, and its frame restores the task's own
        mask should ckpt die before this puts it back."""
        tgid = tgid_of(self.task.tid)
        pending, self.suppressed = self.suppressed, []
        if not self.scratch:
            for info in pending:
                tgkill(tgid, self.task.tid, signo(info))
            return
        mask = self.task.get_sigmask()
        self.task.set_sigmask(ALL_SIGNALS)
        testpoint.pause_at("requeue")
        try:
            while pending:  # a SIGSTOP (never blocked) may be held back meanwhile
                for info in pending:
                    vm_write(self.task.tid, self.scratch, info)
                    if self.raw(NR.rt_tgsigqueueinfo, tgid, self.task.tid, signo(info),
                                self.scratch) != 0:
                        tgkill(tgid, self.task.tid, signo(info))
                pending, self.suppressed = self.suppressed, []
        finally:
            self.task.set_sigmask(mask)

    def restore(self) -> None:
        try:
            if self.suppressed:
                self.requeue()
        finally:
            self.task.setregs(self.saved)


def tgid_of(tid: int) -> int:
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    return tid


def find_syscall_insn(read: Callable[[int, int], bytes], ranges: list[tuple[int, int]],
                      ) -> int | None:
    """Address of the first ``0f 05`` in the given (start, end) ranges, read with ``read``."""
    for start, end in ranges:
        try:
            blob = read(start, end - start)
        except (OSError, CkptError):
            continue
        k = blob.find(b"\x0f\x05")
        if k >= 0:
            return start + k
    return None


__all__ = [
    "NT_PRSTATUS",
    "NT_X86_XSTATE",
    "PTRACE_EVENT_STOP",
    "REG_NAMES",
    "Injector",
    "Landing",
    "Regs",
    "RseqConfig",
    "StopError",
    "Tracee",
    "copy_regs",
    "find_syscall_insn",
    "ptrace",
    "signed",
]
