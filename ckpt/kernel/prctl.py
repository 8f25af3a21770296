"""prctl-visible settings: one table, each row how the setting is read (in the frozen
target, by an injected prctl) and how it is set again (in the stub), side by side.

    name            scope    read                                set again
    pdeath_signal   thread   PR_GET_PDEATHSIG (int at arg2)      PR_SET_PDEATHSIG v, for a
                                                                 tree's member (its parent is
                                                                 restored with it); refused
                                                                 for the dumped process itself
                                                                 (ROOT_REFUSED: its restored
                                                                 parent is ckpt, or its page
                                                                 server's worker thread)
    timer_slack     thread   PR_GET_TIMERSLACK                   PR_SET_TIMERSLACK v
    tsc             thread   PR_GET_TSC (int at arg2)            PR_SET_TSC v
    mce_kill        thread   PR_MCE_KILL_GET                     PR_MCE_KILL SET v / CLEAR
    io_flusher      thread   /proc/PID/task/TID/stat flags       PR_SET_IO_FLUSHER v
                             (PR_GET_IO_FLUSHER needs
                             CAP_SYS_RESOURCE of the reader)
    spec_*          thread   PR_GET_SPECULATION_CTRL which       PR_SET_SPECULATION_CTRL, when
                                                                 the value is per task
                                                                 (PR_SPEC_PRCTL); otherwise it
                                                                 is the machine's, not kept
    sched_core      thread   PR_SCHED_CORE GET (u64 at arg5)     refused when set: a core
                                                                 scheduling cookie is shared
                                                                 with tasks outside the dump
    shadow_stack    thread   arch_prctl ARCH_SHSTK_STATUS        refused when on: a restore
                             (u64 at arg2)                       does not build one
    syscall_user_   thread   PTRACE_GET_SYSCALL_USER_DISPATCH_   refused when on (Wine): its
    dispatch                 CONFIG (ckpt asks, no injection)    selector and range are not
                                                                 kept
    child_subreaper process  PR_GET_CHILD_SUBREAPER (int)        PR_SET_CHILD_SUBREAPER v
    thp_disable     process  PR_GET_THP_DISABLE                  PR_SET_THP_DISABLE v&1, v&~1
    mdwe            process  PR_GET_MDWE                         PR_SET_MDWE v (one way: after
                                                                 the address space is built)
    memory_merge    process  PR_GET_MEMORY_MERGE (KSM)           PR_SET_MEMORY_MERGE v

The thread's name (PR_GET_NAME / PR_SET_NAME, 16 bytes with the NUL) is kept too, beside
the table as it is not a number (read_name, ThreadCore.name).

Elsewhere: dumpable (ckpt.collect.tasks), keepcaps, securebits, no_new_privs, seccomp and
the bounding set (ckpt.collect.creds), tid address (ckpt.collect.tasks), mm fields and
auxv (PR_SET_MM_MAP), name of the leader (PR_SET_NAME). Not on x86 (EINVAL): endian,
fpemu, fpexc, unalign, fp mode, tagged address control, SVE/SME/PAC; PR_GET_TIMING is
always statistical.

Refused settings are found while the target is frozen (only the target can tell them):
the dump fails, naming the setting, and the target runs on.

A setting the kernel does not know (EINVAL: a config option off) is not stored; restore
then leaves it as the new process has it. Restore sets a setting only where the stub's
value differs, then reads it back: a value that did not take is a RestoreError.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ckpt.errors import KernelError
from ckpt.kernel.ptrace import ptrace
from ckpt.kernel.sys import NR

PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2
PR_SET_NAME, PR_GET_NAME, TASK_COMM_LEN = 15, 16, 16
PR_GET_TSC, PR_SET_TSC = 25, 26
PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30
PR_MCE_KILL, PR_MCE_KILL_GET = 33, 34
PR_MCE_KILL_CLEAR, PR_MCE_KILL_SET, PR_MCE_KILL_DEFAULT = 0, 1, 2
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
PR_GET_SPECULATION_CTRL, PR_SET_SPECULATION_CTRL = 52, 53
PR_SPEC_STORE_BYPASS, PR_SPEC_INDIRECT_BRANCH, PR_SPEC_L1D_FLUSH = 0, 1, 2
PR_SPEC_PRCTL = 1
PR_SET_IO_FLUSHER = 57
PR_SCHED_CORE, PR_SCHED_CORE_GET = 62, 0
PR_SET_MDWE, PR_GET_MDWE = 65, 66
ARCH_SHSTK_STATUS = 0x5005
PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG, SUD_CONFIG_SIZE = 0x4211, 32  # mode, selector,
# offset, len (u64 each)
PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE = 67, 68
S64_MAX = (1 << 63) - 1
PF_MEMALLOC_NOIO, PF_LOCAL_THROTTLE = 0x00080000, 0x00100000  # PR_SET_IO_FLUSHER sets both


class Scope(Enum):
    PROCESS = "process"
    THREAD = "thread"


class Read(Enum):
    RETURNED = "returned"  # prctl(*get) returns the value
    INT_AT_ARG2 = "int at arg2"  # prctl(get[0], &int, ...)
    U64_AT_ARG5 = "u64 at arg5"  # prctl(*get[:4], &u64)
    ARCH_U64_AT_ARG2 = "arch_prctl u64 at arg2"  # arch_prctl(get[0], &u64)
    STAT_FLAGS = "stat flags"  # 1 if every bit of get[0] is set in /proc/.../stat flags
    PTRACE_SUD = "ptrace"  # PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG's mode (from ckpt)


@dataclass(frozen=True)
class Setting:
    name: str
    scope: Scope
    get: tuple[int, ...]
    read: Read
    set: Callable[[int], tuple[int, ...]] | None  # value -> prctl args; None: refused
    default: int  # a process that never changed it
    top: int  # values are 0..top (what an image may hold)
    kept: Callable[[int], bool] = lambda v: True  # is this value the task's own?


def _spec(name: str, which: int) -> Setting:
    return Setting(f"spec_{name}", Scope.THREAD, (PR_GET_SPECULATION_CTRL, which), Read.RETURNED,
                   lambda v: (PR_SET_SPECULATION_CTRL, which, v & ~PR_SPEC_PRCTL, 0, 0),
                   default=0, top=31, kept=lambda v: bool(v & PR_SPEC_PRCTL))


def _mce(v: int) -> tuple[int, ...]:
    if v == PR_MCE_KILL_DEFAULT:
        return (PR_MCE_KILL, PR_MCE_KILL_CLEAR, 0, 0, 0)
    return (PR_MCE_KILL, PR_MCE_KILL_SET, v, 0, 0)


SETTINGS: tuple[Setting, ...] = (
    Setting("pdeath_signal", Scope.THREAD, (PR_GET_PDEATHSIG,), Read.INT_AT_ARG2,
            lambda v: (PR_SET_PDEATHSIG, v, 0, 0, 0), default=0, top=64),
    Setting("timer_slack", Scope.THREAD, (PR_GET_TIMERSLACK, 0, 0, 0, 0), Read.RETURNED,
            lambda v: (PR_SET_TIMERSLACK, v, 0, 0, 0), default=50_000, top=S64_MAX),
    Setting("tsc", Scope.THREAD, (PR_GET_TSC,), Read.INT_AT_ARG2,
            lambda v: (PR_SET_TSC, v, 0, 0, 0), default=1, top=2),
    Setting("mce_kill", Scope.THREAD, (PR_MCE_KILL_GET, 0, 0, 0, 0), Read.RETURNED, _mce,
            default=PR_MCE_KILL_DEFAULT, top=2),
    Setting("io_flusher", Scope.THREAD, (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE,),
            Read.STAT_FLAGS, lambda v: (PR_SET_IO_FLUSHER, v, 0, 0, 0), default=0, top=1),
    _spec("store_bypass", PR_SPEC_STORE_BYPASS),
    _spec("indirect_branch", PR_SPEC_INDIRECT_BRANCH),
    _spec("l1d_flush", PR_SPEC_L1D_FLUSH),
    Setting("sched_core", Scope.THREAD, (PR_SCHED_CORE, PR_SCHED_CORE_GET, 0, 0),
            Read.U64_AT_ARG5, None, default=0, top=0),
    Setting("shadow_stack", Scope.THREAD, (ARCH_SHSTK_STATUS,), Read.ARCH_U64_AT_ARG2, None,
            default=0, top=0),
    Setting("syscall_user_dispatch", Scope.THREAD, (), Read.PTRACE_SUD, None, default=0,
            top=0),
    Setting("child_subreaper", Scope.PROCESS, (PR_GET_CHILD_SUBREAPER,), Read.INT_AT_ARG2,
            lambda v: (PR_SET_CHILD_SUBREAPER, v, 0, 0, 0), default=0, top=1),
    Setting("thp_disable", Scope.PROCESS, (PR_GET_THP_DISABLE, 0, 0, 0, 0), Read.RETURNED,
            lambda v: (PR_SET_THP_DISABLE, v & 1, v & ~1, 0, 0), default=0, top=3),
    Setting("mdwe", Scope.PROCESS, (PR_GET_MDWE, 0, 0, 0, 0), Read.RETURNED,
            lambda v: (PR_SET_MDWE, v, 0, 0, 0), default=0, top=3),
    Setting("memory_merge", Scope.PROCESS, (PR_GET_MEMORY_MERGE, 0, 0, 0, 0), Read.RETURNED,
            lambda v: (PR_SET_MEMORY_MERGE, v, 0, 0, 0), default=0, top=1),
)
BY_NAME = {s.name: s for s in SETTINGS}

Raw = Callable[..., int]  # (syscall nr, *args) -> result, negative errno on failure
Peek = Callable[[int, int], bytes]  # (address, size) -> bytes of the task


@dataclass(frozen=True)
class Task:
    """How to ask one task: ``sc`` runs a syscall in it, ``peek`` reads its memory,
    ``scratch`` is memory of it to write to, ``stat_flags`` reads its /proc stat flags,
    ``sud`` its syscall user dispatch mode (sud_mode)."""

    tid: int
    sc: Raw | None  # None: only the rows read from outside it (FROM_OUTSIDE)
    peek: Peek | None
    scratch: int
    stat_flags: Callable[[], int]
    sud: Callable[[], int]


FROM_OUTSIDE = (Read.STAT_FLAGS, Read.PTRACE_SUD)


def in_scope(scope: Scope) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.scope == scope)


def stat_flags(text: str) -> int:
    """The flags field (9th) of a /proc/PID/stat or task stat line."""
    return int(text[text.rfind(")") + 2:].split()[6])


def sud_mode(tid: int) -> int:
    """Syscall user dispatch of a traced, stopped thread: its mode (0: off)."""
    cfg = ctypes.create_string_buffer(SUD_CONFIG_SIZE)
    try:
        ptrace(PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG, tid, SUD_CONFIG_SIZE,
               ctypes.addressof(cfg))
    except KernelError:
        return 0  # a kernel without it
    return int(struct.unpack_from("Q", cfg.raw)[0])


def read_setting(s: Setting, task: Task) -> int | None:
    """The task's value of ``s``; None when its kernel does not have the setting."""
    sc, peek, scratch = task.sc, task.peek, task.scratch
    if s.read == Read.STAT_FLAGS:
        return int(task.stat_flags() & s.get[0] == s.get[0])
    if s.read == Read.PTRACE_SUD:
        return task.sud()
    assert sc is not None and peek is not None, f"{s.name} is read inside the task"
    if s.read == Read.INT_AT_ARG2:
        got = sc(NR.prctl, s.get[0], scratch, 0, 0, 0)
    elif s.read == Read.U64_AT_ARG5:
        got = sc(NR.prctl, *s.get, scratch)
    elif s.read == Read.ARCH_U64_AT_ARG2:
        got = sc(NR.arch_prctl, s.get[0], scratch)
    else:
        got = sc(NR.prctl, *s.get)
    if got < 0:
        return None
    if s.read == Read.INT_AT_ARG2:
        return int(struct.unpack("i", peek(scratch, 4))[0])
    if s.read in (Read.U64_AT_ARG5, Read.ARCH_U64_AT_ARG2):
        return int(struct.unpack("Q", peek(scratch, 8))[0])
    return got


def read_name(task: Task) -> bytes:
    """The task's name (comm), without its NUL; b"" if it cannot be read."""
    assert task.sc is not None and task.peek is not None, "the name is read inside the task"
    if task.sc(NR.prctl, PR_GET_NAME, task.scratch, 0, 0, 0) < 0:
        return b""
    return task.peek(task.scratch, TASK_COMM_LEN).split(b"\0", 1)[0]


def read_settings(scope: Scope, task: Task) -> dict[str, int]:
    """Every setting of ``scope`` the task's kernel has, by name; with ``task.sc`` None,
    only those read from outside it (before anything is injected: syscall user dispatch
    could turn an injected syscall into a SIGSYS), else only the others."""
    out = {}
    for s in in_scope(scope):
        if (s.read in FROM_OUTSIDE) != (task.sc is None):
            continue
        value = read_setting(s, task)
        if value is not None:
            out[s.name] = value
    return out


#: settings kept for a tree's member but refused for the dumped process itself (the
#: root): they name its parent, which a restore does not bring back
ROOT_REFUSED = ("pdeath_signal",)


def root_refused(values: dict[str, int]) -> list[str]:
    """Names (with values) of ROOT_REFUSED settings that differ from their default."""
    return [f"{name} = {v:#x}" for name, v in values.items()
            if name in ROOT_REFUSED and v != BY_NAME[name].default]


def refused(values: dict[str, int]) -> list[str]:
    """Names (with values) of settings a restore cannot bring back and that differ from
    their default."""
    return [f"{name} = {v:#x}" for name, v in values.items()
            if BY_NAME[name].set is None and v != BY_NAME[name].default]


def to_set(s: Setting, want: int, have: int | None) -> tuple[int, ...] | None:
    """The prctl arguments that turn ``have`` (None: the kernel lacks it) into ``want``;
    None when nothing is to be done."""
    if have == want or not s.kept(want) or s.set is None:
        return None
    if have is None and want == s.default:
        return None
    return s.set(want)
