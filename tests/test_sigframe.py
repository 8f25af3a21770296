"""The safety-net signal frame (ckpt.kernel.sigframe): pure, no process needed."""

from __future__ import annotations

import struct

import pytest

from ckpt.kernel import sigframe
from ckpt.kernel.ptrace import U64, Regs


def regs(**fields: int) -> Regs:
    r = Regs()
    r.cs, r.ss, r.eflags, r.rsp, r.rip = 0x33, 0x2B, 0x246, 0x7FFF_F000_1238, 0x40_1002
    r.orig_rax = U64
    for name, value in fields.items():
        setattr(r, name, value & U64)
    return r


@pytest.mark.parametrize("code", [512, 513, 514])
def test_interrupted_syscall_is_restarted(code: int) -> None:
    got = sigframe.resumed(regs(orig_rax=230, rax=-code))
    assert (got.rax, got.rip) == (230, 0x40_1000)


def test_restart_block_goes_through_restart_syscall() -> None:
    got = sigframe.resumed(regs(orig_rax=230, rax=-516))
    assert (got.rax, got.rip) == (sigframe.NR_RESTART_SYSCALL, 0x40_1000)


@pytest.mark.parametrize(("orig", "rax"), [(-1, -512), (230, -4), (230, 0), (39, 1234)])
def test_other_states_are_kept(orig: int, rax: int) -> None:
    got = sigframe.resumed(regs(orig_rax=orig, rax=rax))
    assert (got.rax, got.rip) == (rax & U64, 0x40_1002)


def xsave(bv: int, size: int = 11008, xcr0: int = 0x600E7) -> bytes:
    buf = bytearray(size)
    struct.pack_into("<Q", buf, 464, xcr0)
    struct.pack_into("<Q", buf, 512, bv)
    return bytes(buf)


def test_fpstate_carries_both_magics_after_the_used_components() -> None:
    fp = sigframe.sigframe_fpstate(xsave(0xA7))  # x87, SSE, AVX, opmask, Hi16_ZMM
    magic1, extended, features, size = struct.unpack_from("<IIQI", fp, 464)
    assert (magic1, size, extended, features) == (sigframe.FP_XSTATE_MAGIC1, 2688, 2692,
                                                  0x600E7)
    assert len(fp) == 2692
    assert struct.unpack_from("<I", fp, 2688)[0] == sigframe.FP_XSTATE_MAGIC2


def test_fpstate_of_legacy_state_only() -> None:
    assert len(sigframe.sigframe_fpstate(xsave(0x3))) == sigframe.XSAVE_MIN + 4


def test_fpstate_refuses_unknown_or_short_images() -> None:
    with pytest.raises(ValueError):
        sigframe.sigframe_fpstate(xsave(1 << 11))
    with pytest.raises(ValueError):
        sigframe.sigframe_fpstate(xsave(1 << 18, size=2696))


def test_layout_keeps_the_red_zone_and_the_alignments() -> None:
    rsp = 0x7FFF_F000_1238
    lay = sigframe.layout(rsp, 2692, 512)
    assert lay.fpstate % 64 == 0 and lay.fpstate + 2692 <= rsp - sigframe.RED_ZONE
    assert (lay.frame + 8) % 16 == 0 and lay.frame + sigframe.FRAME_SIZE <= lay.fpstate
    assert lay.scratch % 64 == 0 and lay.scratch + 512 <= lay.frame
    assert lay.low == lay.scratch


def test_frame_holds_the_resumed_registers_mask_and_fpstate() -> None:
    r = regs(orig_rax=230, rax=-514, rbx=7, r15=9)
    frame = sigframe.build(r, sigmask=1 << 9, fpstate_at=0x7000_0040, restorer=0x4242)
    assert len(frame) == sigframe.FRAME_SIZE
    pretcode, uc_flags, _link, _sp, ss_flags = struct.unpack_from("<QQQQi", frame)
    assert pretcode == 0x4242
    assert uc_flags == (sigframe.UC_FP_XSTATE | sigframe.UC_SIGCONTEXT_SS
                        | sigframe.UC_STRICT_RESTORE_SS)
    assert ss_flags == sigframe.SS_INVALID
    mc = struct.unpack_from("<18Q4H4QQ", frame, 8 + 40)
    assert mc[7] == 9 and mc[11] == 7  # r15, rbx
    assert (mc[13], mc[15], mc[16]) == (230, r.rsp, 0x40_1000)  # rax, rsp, rip
    assert (mc[18], mc[21]) == (0x33, 0x2B)  # cs, ss
    assert mc[26] == 0x7000_0040  # fpstate
    assert struct.unpack_from("<Q", frame, 8 + 296)[0] == 1 << 9
