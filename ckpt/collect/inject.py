"""Kill-safe syscall injection into a frozen thread: where to inject and the safety net.

An injected syscall needs rip at a ``syscall`` instruction of the target. If ckpt dies
while the thread holds the injected registers, the kernel lets it run on with them, so
they must lead back to the thread's own state without ckpt (ckpt.kernel.sigframe):

    rip  → a ``syscall; ret`` in the target's code (libc has many)
    rsp  → an rt_sigframe of the thread's registers, mask and XSAVE state, below its red
           zone; its pretcode is an existing ``mov $15, %eax/%rax; syscall`` (__restore_rt)

Where no such gadget exists (static or Go binaries, no room on the stack, a shadow stack)
the injection falls back to a bare ``syscall`` (the vdso's): then a kill -9 of ckpt in the
instants an injected syscall is set up leaves the thread with foreign registers (README).
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import CkptError, NotDumpable
from ckpt.kernel import sigframe
from ckpt.kernel.ptrace import (
    NT_X86_XSTATE,
    Injector,
    Landing,
    Regs,
    Tracee,
    find_syscall_insn,
    signed,
)
from ckpt.kernel.sys import vm_read, vm_write

SYSCALL_RET = b"\x0f\x05\xc3"
RESTORERS = (b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05",  # glibc __restore_rt
             b"\xb8\x0f\x00\x00\x00\x0f\x05")  # mov $15, %eax; syscall
SCRATCH = 512


@dataclass(frozen=True)
class Gadgets:
    syscall_ret: int
    restorer: int


Layout = tuple[tuple[int, int, int], ...]  # (start, end, inode) of each code mapping
_found: dict[Layout, Gadgets] = {}  # any process's: read again before it is used
_missing: set[tuple[int, Layout]] = set()  # (pid, layout) with none


def find_gadgets(pid: int, vmas: list[VmaInfo]) -> Gadgets | None:
    """A ``syscall; ret`` and an rt_sigreturn stub in the target's file-backed code.

    Searched once per code layout: the members of a tree forked without exec share
    theirs, and a look before the freeze (ckpt.actions.member) serves the frozen one. A
    pair found before is used only if its bytes are still there in this process (two
    reads of a few bytes instead of megabytes of code)."""
    code = [v for v in vmas if v.prot & 4 and v.path.startswith("/")]
    layout = tuple((v.start, v.end, v.inode) for v in code)
    known = _found.get(layout)
    if known is not None and _still_there(pid, known):
        return known
    if (pid, layout) in _missing:
        return None
    ret = restorer = -1
    for v in code:
        try:
            blob = vm_read(pid, v.start, v.length)
        except (OSError, CkptError):
            continue
        if ret < 0 and (k := blob.find(SYSCALL_RET)) >= 0:
            ret = v.start + k
        for pattern in RESTORERS:
            if restorer < 0 and (k := blob.find(pattern)) >= 0:
                restorer = v.start + k
        if ret >= 0 and restorer >= 0:
            break
    if ret < 0 or restorer < 0:
        _missing.add((pid, layout))
        return None
    _found[layout] = got = Gadgets(ret, restorer)
    return got


def _still_there(pid: int, gadgets: Gadgets) -> bool:
    """Are both gadgets' instructions at their addresses in process ``pid``?"""
    try:
        stub = vm_read(pid, gadgets.restorer, max(len(p) for p in RESTORERS))
        return vm_read(pid, gadgets.syscall_ret, len(SYSCALL_RET)) == SYSCALL_RET and \
            any(stub.startswith(p) for p in RESTORERS)
    except (OSError, CkptError):
        return False


def shadow_stack(pid: int) -> bool:
    """A user shadow stack would refuse the ``ret`` and the sigreturn."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("x86_Thread_features:") and "shstk" in line for line in f)
    except OSError:
        return False


def landing(pid: int, task: Tracee, regs: Regs, vmas: list[VmaInfo], xstate: bytes | None = None,
            sigmask: int | None = None) -> Landing | None:
    """Write the safety-net frame below the thread's stack pointer; None if it cannot be."""
    gadgets = find_gadgets(pid, vmas)
    if gadgets is None or shadow_stack(pid):
        return None
    try:
        fpstate = sigframe.sigframe_fpstate(xstate if xstate is not None
                                            else task.get_regset(NT_X86_XSTATE))
    except ValueError:
        return None
    lay = sigframe.layout(int(regs.rsp), len(fpstate), SCRATCH)
    stack = next((v for v in vmas if v.start < regs.rsp <= v.end), None)
    if stack is None or not stack.prot & 2 or stack.shared or lay.low < stack.start:
        return None
    mask = sigmask if sigmask is not None else task.get_sigmask()
    vm_write(pid, lay.fpstate, fpstate)
    vm_write(pid, lay.frame, sigframe.build(regs, mask, lay.fpstate, gadgets.restorer))
    return Landing(gadgets.syscall_ret, lay.frame, lay.scratch)


def syscall_insn(pid: int, regs: Regs, vmas: list[VmaInfo]) -> int:
    """Where to point rip for injection: the vdso first, then any executable mapping."""
    if signed(regs.orig_rax) >= 0 and vm_read(pid, regs.rip - 2, 2) == b"\x0f\x05":
        return int(regs.rip) - 2
    order = sorted((v for v in vmas if v.prot & 4 and v.kind != VmaKind.VSYSCALL),
                   key=lambda v: v.kind != VmaKind.VDSO)
    ip = find_syscall_insn(lambda a, n: vm_read(pid, a, n), [(v.start, v.end) for v in order])
    if ip is None:
        raise NotDumpable(f"process {pid} has no syscall instruction to inject through")
    return ip


def open_injector(pid: int, task: Tracee, regs: Regs, vmas: list[VmaInfo],
                  xstate: bytes | None = None, sigmask: int | None = None) -> Injector:
    """An Injector for a frozen thread whose registers are ``regs``: kill-safe where the
    target allows it (``.landing`` set, ``.scratch`` on its stack), else the bare way."""
    land = landing(pid, task, regs, vmas, xstate, sigmask)
    if land is not None:
        return Injector(task, land.ip, regs, landing=land)
    return Injector(task, syscall_insn(pid, regs, vmas), regs)
