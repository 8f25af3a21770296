"""Credentials and seccomp, applied last: after files, pids, memory and threads (all of
which need root), just before the registers are loaded and the process is let go.

Credentials are per thread, so every thread gets its own sequence, injected into it
(raw syscalls change only the calling thread). The order, worked out from the kernel's
rules (security/commoncap.c, kernel/seccomp.c), starting from the stub's full root set:

    setgroups                    CAP_SETGID
    capset(inh = dumped)         before the bounding set shrinks: inheritable may hold
                                 capabilities the bounding set no longer does
    PR_CAP_AMBIENT_RAISE         needs the capability permitted and inheritable, and no
                                 SECBIT_NO_CAP_AMBIENT_RAISE yet
    seccomp filters, oldest first
                                 needs CAP_SYS_ADMIN or no_new_privs: done while we still
                                 have the first, so a process that had only the second
                                 (or neither, filters installed while it was privileged)
                                 gets them back. PTRACE_O_SUSPEND_SECCOMP keeps them from
                                 acting on the injections that follow; the kernel drops
                                 it when ckpt detaches.
    PR_CAPBSET_DROP              CAP_SETPCAP
    securebits = NO_SETUID_FIXUP | KEEP_CAPS
                                 so that the uid changes leave every capability in place
    setresgid, setfsgid, setresuid, setfsuid
    securebits = dumped          CAP_SETPCAP, still effective
    capset(dumped sets)          the exact sets (ambient = ambient & permitted &
                                 inheritable: unchanged)
    PR_SET_NO_NEW_PRIVS, strict seccomp
    PR_SET_DUMPABLE              once, after every thread: any euid change resets it

A zombie of a tree (ckpt.restore.tree) gets only setgroups and the ids (restore_ids):
it keeps nothing else the kernel shows.

Then each thread's /proc status lines and securebits are compared with the image: a
restore that would bring a process back with other credentials, or unfiltered, fails
(the stub is killed).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields, replace

from ckpt.collect.creds import Creds, read_creds
from ckpt.errors import CkptError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_RAISE,
    PR_CAPBSET_DROP,
    PR_GET_SECUREBITS,
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_SECUREBITS,
    PTRACE_O_SUSPEND_SECCOMP,
    SECBIT_KEEP_CAPS,
    SECBIT_NO_SETUID_FIXUP,
    SECCOMP_MODE_FILTER,
    SECCOMP_MODE_STRICT,
    SECCOMP_SET_MODE_FILTER,
    SECCOMP_SET_MODE_STRICT,
    SYS,
    cap_data,
    cap_header,
    last_cap,
    sock_fprog,
)
from ckpt.kernel.ptrace import PTRACE_O_EXITKILL, PTRACE_O_TRACECLONE
from ckpt.kernel.sys import NR
from ckpt.restore.stub import Stub

SUID_DUMP_USER = 1
ARG_AREA = 8192  # scratch offset of our arguments (other steps use the first page)


@dataclass(frozen=True)
class Prog:
    """A seccomp filter argument: the program, passed as a struct sock_fprog."""

    program: bytes


@dataclass(frozen=True)
class Call:
    """One injected syscall; a ``bytes`` argument is copied into the scratch area and
    passed as its address."""

    what: str
    nr: int
    args: tuple[int | bytes | Prog, ...]


def plan_creds(c: pb.Creds, filters: list[pb.SeccompFilter], cap_last: int, full: int,
               ) -> list[Call]:
    """The syscalls that turn a root task holding capabilities ``full`` into one with
    credentials ``c`` and ``filters`` (see the module docstring for the order)."""
    calls = [setgroups(c), Call("capset (inheritable)", SYS.capset,
                                (cap_header(), cap_data(full, full, c.cap_inh)))]
    calls += [Call(f"raise ambient capability {cap}", NR.prctl,
                   (PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0))
              for cap in range(cap_last + 1) if c.cap_amb >> cap & 1]
    if c.seccomp_mode == SECCOMP_MODE_FILTER:
        calls += [Call(f"seccomp filter {i} of {len(filters)}", SYS.seccomp,
                       (SECCOMP_SET_MODE_FILTER, f.flags, Prog(f.program)))
                  for i, f in enumerate(filters, 1)]
    calls += [Call(f"drop capability {cap} from the bounding set", NR.prctl,
                   (PR_CAPBSET_DROP, cap, 0, 0, 0))
              for cap in range(cap_last + 1) if not c.cap_bnd >> cap & 1]
    calls += [
        Call("securebits (keep capabilities)", NR.prctl,
             (PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP | SECBIT_KEEP_CAPS, 0, 0, 0)),
        *set_ids(c),
        Call("securebits", NR.prctl, (PR_SET_SECUREBITS, c.securebits, 0, 0, 0)),
        Call("capset", SYS.capset, (cap_header(), cap_data(c.cap_eff, c.cap_prm, c.cap_inh))),
    ]
    if c.no_new_privs:
        calls.append(Call("no_new_privs", NR.prctl, (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)))
    if c.seccomp_mode == SECCOMP_MODE_STRICT:
        calls.append(Call("strict seccomp", SYS.seccomp, (SECCOMP_SET_MODE_STRICT, 0, 0)))
    return calls


def setgroups(c: pb.Creds) -> Call:
    return Call("setgroups", SYS.setgroups,
                (len(c.groups), struct.pack(f"{len(c.groups)}I", *c.groups)))


def set_ids(c: pb.Creds) -> list[Call]:
    """The user and group ids of ``c``, gids first (setresgid needs CAP_SETGID)."""
    return [Call("setresgid", SYS.setresgid, (c.gid, c.egid, c.sgid)),
            Call("setfsgid", SYS.setfsgid, (c.fsgid,)),
            Call("setresuid", SYS.setresuid, (c.uid, c.euid, c.suid)),
            Call("setfsuid", SYS.setfsuid, (c.fsuid,))]


def restore_ids(stub: Stub, c: pb.Creds) -> None:
    """Only the ids and groups of ``c`` (a zombie's, ckpt.restore.tree), applied by the
    root stub as the process once did itself: the kernel drops its capabilities with
    root, as it did for the original; verified like a live process's."""
    for call in [setgroups(c), *set_ids(c)]:
        _inject(stub, call)
    want = expected_creds(c, 0)
    _compare(stub.pid, read_creds(stub.pid, stub.pid), want, ("uid", "gid", "groups"))


def expected_creds(c: pb.Creds, filters: int) -> Creds:
    """What /proc must show for a task restored with ``c`` (and ``filters`` filters)."""
    return Creds(uid=(c.uid, c.euid, c.suid, c.fsuid), gid=(c.gid, c.egid, c.sgid, c.fsgid),
                 groups=tuple(sorted(c.groups)), cap_inh=c.cap_inh, cap_prm=c.cap_prm,
                 cap_eff=c.cap_eff, cap_bnd=c.cap_bnd, cap_amb=c.cap_amb,
                 no_new_privs=c.no_new_privs, seccomp_mode=c.seccomp_mode,
                 seccomp_filters=filters if c.seccomp_mode == SECCOMP_MODE_FILTER else 0,
                 securebits=c.securebits)


def restore_creds(stub: Stub, threads: list[Stub], entry: pb.ProcessEntry) -> None:
    """Apply every thread's credentials and filters (``threads``: the non-leader threads,
    in image order), then the dumpable flag; verify them. Any failure raises."""
    cap_last = last_cap()
    tasks = [stub, *threads]
    full = read_creds(stub.pid, stub.pid).cap_prm
    for task, th in zip(tasks, entry.threads, strict=True):
        # PTRACE_SETOPTIONS replaces every option: keep the ones the stub has
        task.task.set_options(PTRACE_O_EXITKILL | PTRACE_O_TRACECLONE | PTRACE_O_SUSPEND_SECCOMP)
        for call in plan_creds(th.creds, list(th.seccomp_filters), cap_last, full):
            _inject(task, call)
    dumpable = SUID_DUMP_USER if entry.dumpable == SUID_DUMP_USER else 0
    stub.sc(NR.prctl, PR_SET_DUMPABLE, dumpable, 0, 0, 0, what="PR_SET_DUMPABLE")
    for task, th in zip(tasks, entry.threads, strict=True):
        _verify(task, th)


def _inject(task: Stub, call: Call) -> None:
    off = ARG_AREA
    args: list[int] = []
    for a in call.args:
        if isinstance(a, Prog):
            prog = task.put(a.program, off)
            off += len(a.program)
            a = sock_fprog(prog, a.program)
        if isinstance(a, bytes):
            args.append(task.put(a, off))
            off += (len(a) + 15) // 16 * 16
        else:
            args.append(a)
    try:
        task.sc(call.nr, *args, what=call.what)
    except CkptError as exc:
        raise RestoreError(f"cannot restore the credentials of thread {task.task.tid}: "
                           f"{exc}") from None


def _verify(task: Stub, th: pb.ThreadCore) -> None:
    tid = task.task.tid
    securebits = task.sc(NR.prctl, PR_GET_SECUREBITS, 0, 0, 0, 0, what="PR_GET_SECUREBITS")
    found = replace(read_creds(task.pid, tid), securebits=securebits)
    want = expected_creds(th.creds, len(th.seccomp_filters))
    _compare(tid, found, want, tuple(f.name for f in fields(want)))


def _compare(tid: int, found: Creds, want: Creds, names: tuple[str, ...]) -> None:
    got = replace(found, groups=tuple(sorted(found.groups)))
    wrong = [f"{name} {getattr(got, name)} != {getattr(want, name)}"
             for name in names if getattr(got, name) != getattr(want, name)]
    if wrong:
        raise RestoreError(f"thread {tid} came back with other credentials than dumped: "
                           + ", ".join(wrong))
