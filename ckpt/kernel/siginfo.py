"""siginfo_t as the kernel hands it out (PTRACE_GETSIGINFO, PTRACE_PEEKSIGINFO) and takes
it back (rt_sigqueueinfo, rt_tgsigqueueinfo): 128 opaque bytes of which ckpt reads only
the first fields. Pure: the one parser every layer uses."""

from __future__ import annotations

import struct

SIGINFO_SIZE = 128
_HEAD = struct.Struct("<iii")  # si_signo, si_errno, si_code


def signo(siginfo: bytes) -> int:
    """si_signo, the first field of a siginfo_t."""
    return int.from_bytes(siginfo[:4], "little", signed=True)


def code(siginfo: bytes) -> int:
    """si_code, the third field of a siginfo_t."""
    return int(_HEAD.unpack_from(siginfo)[2])


def sender_pid(siginfo: bytes) -> int:
    """si_pid: the sender of a kill()-like signal, or the child of a SIGCHLD."""
    return int.from_bytes(siginfo[16:20], "little", signed=True)
