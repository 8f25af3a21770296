"""Per-process settings (ckpt.collect.pstate), set in the stub before its credentials
drop and before it runs. A field an image does not have (an older ckpt's) is left as the
stub inherited it from ckpt.

    oom_score_adj   written to /proc/STUB/oom_score_adj by ckpt (a value below the stub's
                    oom_score_adj_min, inherited from ckpt, needs CAP_SYS_RESOURCE)
    loginuid        /proc/PID/loginuid takes writes from its own process only: the stub
                    opens and writes its own. The stub inherited ckpt's loginuid; changing
                    one that is set needs CAP_AUDIT_CONTROL (and no immutable-loginuid
                    audit rule). Equal values are not written: a write would start a new
                    audit session for nothing. The sessionid is not restored: the kernel
                    hands out a new one whenever a loginuid is set.
    membarrier      each registration of the mask, registered again in the stub (per mm)
"""

from __future__ import annotations

import os

from ckpt.collect.pstate import LOGINUID_UNSET, MEMBARRIER_CMD_GET_REGISTRATIONS
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import NR
from ckpt.restore.stub import Stub

#: The registrations GET_REGISTRATIONS reports, each the command that registers it, in
#: the order they are registered again (the mask's bits are these commands).
MEMBARRIER_REGISTER = {
    1 << 2: "MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED",
    1 << 4: "MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED",
    1 << 6: "MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE",
    1 << 8: "MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ",
}
O_WRONLY = os.O_WRONLY


def restore_settings(stub: Stub, entry: pb.ProcessEntry) -> None:
    if entry.HasField("membarrier_registrations"):
        restore_membarrier(stub, entry.membarrier_registrations)
    if entry.HasField("loginuid"):
        restore_loginuid(stub, entry.loginuid)
    if entry.HasField("oom_score_adj"):
        restore_oom_score_adj(stub.pid, entry.oom_score_adj)


def membarrier_commands(mask: int) -> list[int]:
    """The REGISTER commands that bring back registration ``mask``; ValueError for a bit
    that is no registration."""
    unknown = mask & ~sum(MEMBARRIER_REGISTER)
    if unknown:
        raise ValueError(f"unknown membarrier registrations {unknown:#x}")
    return [cmd for cmd in MEMBARRIER_REGISTER if mask & cmd]


def restore_membarrier(stub: Stub, mask: int) -> None:
    try:
        want = membarrier_commands(mask)
    except ValueError as exc:
        raise RestoreError(str(exc)) from None
    have = stub.sc(NR.membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0, check=False)
    if have < 0:
        if want:
            raise RestoreError("this kernel cannot tell membarrier registrations (Linux "
                               "6.3+): cannot restore them")
        return
    extra = have & ~mask
    if extra:  # there is no command to unregister
        raise RestoreError(f"the restore stub has membarrier registrations {extra:#x} the "
                           "dumped process did not have")
    for cmd in want:
        if not have & cmd:
            stub.sc(NR.membarrier, cmd, 0, 0, what=f"membarrier({MEMBARRIER_REGISTER[cmd]})")


def restore_loginuid(stub: Stub, loginuid: int) -> None:
    try:
        with open(f"/proc/{stub.pid}/loginuid") as f:
            if int(f.read()) == loginuid:
                return
    except FileNotFoundError:  # a kernel without audit: nobody has a loginuid here
        if loginuid == LOGINUID_UNSET:
            return
        raise RestoreError(f"cannot restore loginuid {loginuid}: this kernel has no "
                           "audit support") from None
    fd = stub.sc(NR.open, stub.put_str("/proc/self/loginuid"), O_WRONLY, 0,
                 what="open /proc/self/loginuid")
    try:
        text = str(loginuid).encode()
        got = stub.sc(NR.write, fd, stub.put(text, 64), len(text), check=False)
        if got != len(text):
            raise RestoreError(f"cannot restore loginuid {loginuid}: "
                               f"{os.strerror(-got) if got < 0 else 'short write'} (changing "
                               "a loginuid that is set needs CAP_AUDIT_CONTROL)")
    finally:
        stub.sc(NR.close, fd, check=False)


def restore_oom_score_adj(pid: int, value: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as exc:
        raise RestoreError(f"cannot restore oom_score_adj {value}: {exc.strerror} (a value "
                           "below ckpt's own needs CAP_SYS_RESOURCE)") from None
