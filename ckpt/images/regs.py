"""General-purpose registers between the image (GpRegs) and ptrace's struct
user_regs_struct (ckpt.kernel.ptrace.Regs), field by field under the kernel's names."""

from __future__ import annotations

from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.ptrace import REG_NAMES, Regs


def regs_to_pb(regs: Regs) -> pb.GpRegs:
    return pb.GpRegs(**{name: int(getattr(regs, name)) for name in REG_NAMES})


def regs_from_pb(msg: pb.GpRegs) -> Regs:
    regs = Regs()
    for name in REG_NAMES:
        setattr(regs, name, getattr(msg, name))
    return regs
