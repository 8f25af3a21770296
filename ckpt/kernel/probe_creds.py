"""Probes of what restoring credentials and seccomp filters needs (see ckpt.kernel.probe,
which runs them): each is tried for real in a forked child, killed and reaped after.

    creds-restore    a child of ckpt can take another identity the way the restore
                     does (setgroups, PR_CAPBSET_DROP, securebits, setresgid/setresuid
                     keeping its capabilities, capset, ambient raise): root only
    seccomp-restore  a filtered child's filter is read with PTRACE_SECCOMP_GET_FILTER
                     while PTRACE_O_SUSPEND_SECCOMP keeps it from acting
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time

from ckpt.errors import AccessDenied, KernelError
from ckpt.kernel.creds import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_RAISE,
    PR_CAPBSET_DROP,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_SECUREBITS,
    PTRACE_O_SUSPEND_SECCOMP,
    SECBIT_KEEP_CAPS,
    SECBIT_NO_SETUID_FIXUP,
    SECCOMP_SET_MODE_FILTER,
    SYS,
    cap_data,
    cap_header,
    seccomp_filters,
    sock_fprog,
    suspend_seccomp_refused,
)
from ckpt.kernel.ptrace import PTRACE_EVENT_STOP, PTRACE_INTERRUPT, PTRACE_SEIZE, Tracee, ptrace
from ckpt.kernel.sys import NR, kill_and_reap, syscall

CAP_NET_BIND_SERVICE, CAP_SYS_BOOT = 10, 22
NOBODY = 65534
ALLOW_ALL = struct.pack("HBBI", 0x06, 0, 0, 0x7FFF0000)  # BPF_RET | BPF_K, SECCOMP_RET_ALLOW


def _child(body: str) -> int:
    """Fork a child running ``body`` (a name of this module's child bodies); it exits 0
    on success, 1 on failure, or (for "filtered") stops itself and waits to be killed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _BODIES[body]()
            code = 0
        except BaseException:
            pass
        finally:
            os._exit(code)
    return pid


def _take_identity() -> None:
    buf = ctypes.create_string_buffer(64)

    def put(data: bytes) -> int:
        ctypes.memmove(buf, data, len(data))
        return ctypes.addressof(buf)

    groups = struct.pack("I", NOBODY)
    syscall(SYS.setgroups, 1, put(groups), what="setgroups")
    syscall(NR.prctl, PR_CAPBSET_DROP, CAP_SYS_BOOT, 0, 0, 0, what="PR_CAPBSET_DROP")
    syscall(NR.prctl, PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP | SECBIT_KEEP_CAPS, 0, 0, 0,
            what="PR_SET_SECUREBITS")
    syscall(SYS.setresgid, NOBODY, NOBODY, NOBODY, what="setresgid")
    syscall(SYS.setresuid, NOBODY, NOBODY, NOBODY, what="setresuid")
    keep = 1 << CAP_NET_BIND_SERVICE
    header = ctypes.create_string_buffer(cap_header(), 8)
    syscall(SYS.capset, ctypes.addressof(header), put(cap_data(keep, keep, keep)),
            what="capset")
    syscall(NR.prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0,
            what="PR_CAP_AMBIENT_RAISE")


def _filtered() -> None:
    prog = ctypes.create_string_buffer(ALLOW_ALL, len(ALLOW_ALL))
    fprog = ctypes.create_string_buffer(sock_fprog(ctypes.addressof(prog), ALLOW_ALL), 16)
    syscall(NR.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="no_new_privs")
    syscall(SYS.seccomp, SECCOMP_SET_MODE_FILTER, 0, ctypes.addressof(fprog), what="seccomp")
    while True:
        signal.pause()


_BODIES = {"identity": _take_identity, "filtered": _filtered}


def probe_creds_restore() -> tuple[bool, str]:
    pid = _child("identity")
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return True, ("setgroups, PR_CAPBSET_DROP, securebits, setresuid keeping "
                      "capabilities, capset, ambient raise")
    if os.geteuid() != 0:
        return False, "not root: restore is refused"
    return False, "a child of ckpt could not take another identity (CAP_SETUID/SETGID/SETPCAP?)"


def probe_seccomp_restore() -> tuple[bool, str]:
    pid = _child("filtered")
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the child has its filter
            with open(f"/proc/{pid}/status") as f:
                if "Seccomp:\t2" in f.read():
                    break
            time.sleep(0.001)
        try:
            ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_SUSPEND_SECCOMP)
        except (AccessDenied, KernelError) as exc:
            if (why := suspend_seccomp_refused(exc)) is None:
                raise
            return False, f"{why}: a process under seccomp is refused"
        ptrace(PTRACE_INTERRUPT, pid)
        task = Tracee(pid)
        if task.wait_stop() >> 16 != PTRACE_EVENT_STOP:
            return False, "no event stop"
        got = seccomp_filters(pid)
        if [p for p, _ in got] != [ALLOW_ALL]:
            return False, f"PTRACE_SECCOMP_GET_FILTER returned {got!r}"
        return True, "PTRACE_SECCOMP_GET_FILTER and PTRACE_O_SUSPEND_SECCOMP work"
    finally:
        kill_and_reap(pid)
