"""A genuine x86-64 ``rt_sigframe`` that puts a thread back exactly as it was: the safety
net under syscall injection (see ckpt.collect.inject).

An injected syscall runs with rip at a ``syscall; ret`` in the target's code and rsp at
this frame, written below the thread's red zone. Should ckpt die at any instant, the
kernel detaches the thread, the syscall completes, ``ret`` pops ``pretcode`` (a
``mov $15, %rax; syscall``: rt_sigreturn) and the kernel itself restores every register,
the signal mask and the FPU/XSAVE state from the frame (arch/x86/kernel/signal_64.c
rt_sigreturn → restore_sigcontext → fpu__restore_sig; restore_altstack ignores an
invalid uc_stack, squashing every error but EFAULT).

    higher addresses
      original rsp
      red zone             128 bytes the thread may be using
      fpstate              XSAVE image + FP_XSTATE_MAGIC2, 64-byte aligned
      rt_sigframe          pretcode | ucontext (flags, link, stack, mcontext, sigmask) | siginfo
      scratch              syscall outputs (sigaction, altstack, ...)
    lower addresses        ← must still lie inside the stack VMA

Pure: no syscalls here, so the layout is unit-tested without a process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ckpt.kernel.ptrace import Regs, copy_regs, signed
from ckpt.kernel.siginfo import SIGINFO_SIZE

RED_ZONE = 128
UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 1, 2, 4
FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
SW_BYTES_OFFSET = 464  # fxsave's sw_reserved: ptrace puts XCR0 there, a sigframe _fpx_sw_bytes
XSTATE_BV_OFFSET = 512
XSAVE_MIN = 576  # legacy area + header
SS_INVALID = 3  # SS_ONSTACK|SS_DISABLE: do_sigaltstack says EINVAL, sigreturn ignores it
NR_RESTART_SYSCALL = 219
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
UCONTEXT_SIZE = 304  # flags 8, link 8, stack_t 24, sigcontext 256, sigmask 8
FRAME_SIZE = 8 + UCONTEXT_SIZE + SIGINFO_SIZE

# End offset of each XSAVE component in the standard (non-compacted) format: the
# architectural layout of x86-64 (SDM vol. 1 13.4; the same on AMD for these bits).
XFEATURE_END = {0: 512, 1: 512, 2: 832, 3: 1024, 4: 1088, 5: 1152, 6: 1664, 7: 2688,
                9: 2696, 17: 2816, 18: 11008}

_SIGCONTEXT = struct.Struct("<18Q4H4QQ64x")  # r8..r15 .. eflags, cs gs fs ss, err trapno
_SW_BYTES = struct.Struct("<IIQI28x")          # oldmask cr2, fpstate, reserved1


@dataclass(frozen=True)
class FrameLayout:
    fpstate: int
    frame: int  # rsp for the injected syscall: the rt_sigframe starts here (pretcode)
    scratch: int
    low: int  # lowest byte the layout uses


def resumed(regs: Regs) -> Regs:
    """The registers the thread would run with if it were let go now: the kernel's
    restart fix-up for a syscall interrupted by the freeze (no handler runs), applied."""
    out = copy_regs(regs)
    if signed(regs.orig_rax) < 0:
        return out
    rax = signed(regs.rax)
    if rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
        out.rax, out.rip = regs.orig_rax, regs.rip - 2
    elif rax == -ERESTART_RESTARTBLOCK:
        # restore_sigcontext resets restart_block.fn: the call returns EINTR
        out.rax, out.rip = NR_RESTART_SYSCALL, regs.rip - 2
    return out


def xstate_size(xstate: bytes) -> int:
    """Bytes of the XSAVE image that hold the components it has in use (XSTATE_BV)."""
    bv = struct.unpack_from("<Q", xstate, XSTATE_BV_OFFSET)[0]
    size = XSAVE_MIN
    for bit in range(64):
        if bv >> bit & 1:
            if bit not in XFEATURE_END:
                raise ValueError(f"XSAVE component {bit} has no known layout")
            size = max(size, XFEATURE_END[bit])
    if size > len(xstate):
        raise ValueError(f"XSAVE image of {len(xstate)} bytes is short of {size}")
    return size


def sigframe_fpstate(xstate: bytes) -> bytes:
    """The ptrace NT_X86_XSTATE image made a signal frame's fpstate: _fpx_sw_bytes in
    sw_reserved (ptrace puts XCR0 there) and FP_XSTATE_MAGIC2 after the used size."""
    size = xstate_size(xstate)
    xcr0 = struct.unpack_from("<Q", xstate, SW_BYTES_OFFSET)[0]
    buf = bytearray(xstate[:size])
    _SW_BYTES.pack_into(buf, SW_BYTES_OFFSET, FP_XSTATE_MAGIC1, size + 4, xcr0, size)
    return bytes(buf) + struct.pack("<I", FP_XSTATE_MAGIC2)


def layout(rsp: int, fpstate_len: int, scratch_len: int) -> FrameLayout:
    fpstate = (rsp - RED_ZONE - fpstate_len) & ~63
    frame = ((fpstate - FRAME_SIZE) & ~15) - 8  # like the kernel's: frame + 8 16-aligned
    scratch = (frame - scratch_len) & ~63
    return FrameLayout(fpstate, frame, scratch, scratch)


def build(regs: Regs, sigmask: int, fpstate_at: int, restorer: int) -> bytes:
    """The rt_sigframe (FRAME_SIZE bytes) for a thread frozen with ``regs``."""
    r = resumed(regs)
    mcontext = _SIGCONTEXT.pack(
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx,
        r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags, r.cs, 0, 0, r.ss, 0, 0, 0, 0,
        fpstate_at)
    flags = UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    uc = struct.pack("<QQQiiQ", flags, 0, 0, SS_INVALID, 0, 0) + mcontext + struct.pack(
        "<Q", sigmask)
    assert len(uc) == UCONTEXT_SIZE
    return struct.pack("<Q", restorer) + uc + bytes(SIGINFO_SIZE)


__all__ = ["FRAME_SIZE", "FrameLayout", "build", "layout", "resumed", "sigframe_fpstate",
           "xstate_size"]
