"""POSIX timers (timer_create): what /proc/PID/timers shows, what an injected timer_gettime
and timer_getoverrun add, and which timers a restore cannot make again.

/proc/PID/timers (CONFIG_CHECKPOINT_RESTORE), one block per timer:

    ID: 3
    signal: 34/0000000000000007        signo / sigev_value (hex, %px)
    notify: signal/tid.9215            signal|none|thread, then pid.N or tid.N
    ClockID: 1                         CPU clocks are encoded: (~pid << 3) | type

A CPU clock with pid 0 is the caller's own (CLOCK_PROCESS_CPUTIME_ID is -6,
CLOCK_THREAD_CPUTIME_ID -2): the process's is the restored process's, but which thread a
thread clock measures /proc does not say (the one that created it), so it is kept only
in a single-threaded process. A clock that names a pid is another task's (refused), or
one of the process's own threads (mapped to the restored tid).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt.collect import proc
from ckpt.errors import NotDumpable
from ckpt.kernel.timers import (
    SIGEV_NONE,
    SIGEV_SIGNAL,
    SIGEV_THREAD,
    SIGEV_THREAD_ID,
    cpu_clock,
    cpu_clock_pid,
    is_thread_clock,
    valid_clock,
)

SIGTRAP = 5
#: Timer ids a restore makes by creating and deleting every id below (no kernel help):
#: the dump refuses more (ckpt.collect.restorable), so does the restore on its own kernel
#: (ckpt.restore.timers.check_timer_ids)
MAX_LINEAR_TIMER_ID = 4096
NOTIFY_KINDS = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD}


@dataclass(frozen=True)
class ProcTimer:
    """One block of /proc/PID/timers."""

    id: int
    signo: int
    value: int  # sigev_value
    notify: int  # SIGEV_*, with SIGEV_THREAD_ID when it signals one thread
    notify_pid: int  # the process or (SIGEV_THREAD_ID) thread it signals
    clock: int


@dataclass(frozen=True)
class PosixTimer:
    """A timer as dumped: /proc's view plus the injected reads."""

    proc: ProcTimer
    interval_ns: int
    value_ns: int  # time left; 0: disarmed
    overrun: int


def parse_timers(text: str) -> list[ProcTimer]:
    """The blocks of /proc/PID/timers; a malformed block raises ValueError."""
    out: list[ProcTimer] = []
    fields: dict[str, str] = {}

    def flush() -> None:
        if not fields:
            return
        signo, _, value = fields["signal"].partition("/")
        kind, _, target = fields["notify"].partition("/")
        which, _, pid = target.partition(".")
        if kind not in NOTIFY_KINDS or which not in ("pid", "tid"):
            raise ValueError(f"unknown timer notify {fields['notify']!r}")
        notify = NOTIFY_KINDS[kind] | (SIGEV_THREAD_ID if which == "tid" else 0)
        out.append(ProcTimer(id=int(fields["ID"]), signo=int(signo), value=int(value, 16),
                             notify=notify, notify_pid=int(pid), clock=int(fields["ClockID"])))
        fields.clear()

    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key == "ID":
            flush()
        fields[key] = value.strip()
    flush()
    return sorted(out, key=lambda t: t.id)


def read_timers(pid: int, *, root: str = "/proc") -> list[ProcTimer]:
    """POSIX timers of ``pid``; [] without CONFIG_CHECKPOINT_RESTORE (no such file)."""
    if not os.path.exists(proc.proc_path(root, pid, "timers")):
        return []
    try:
        return parse_timers(proc.read_text(pid, root, "timers"))
    except (KeyError, ValueError) as exc:
        raise NotDumpable(f"process {pid}: cannot read /proc/{pid}/timers ({exc})") from None


def timer_refusal(t: ProcTimer, tids: tuple[int, ...]) -> str | None:
    """Why a restore cannot make this timer again (None: it can). ``tids``: the
    process's thread ids, leader first."""
    if not valid_clock(t.clock):
        return f"clock {t.clock} is not one a timer uses"
    if t.clock >= 0:
        return None
    pid = cpu_clock_pid(t.clock)
    if pid == 0:
        if is_thread_clock(t.clock) and len(tids) > 1:
            return ("it measures the CPU time of the thread that created it, which "
                    "/proc/PID/timers does not name")
        return None
    if pid in tids:
        return None
    return f"it measures the CPU time of process {pid}, outside the dump"


def overrun_refusal(t: PosixTimer) -> str | None:
    """Why a restore cannot give this timer its overrun count back (None: it can, see
    ckpt.restore.timers.replay_overrun): only a signal a thread can take, on a clock whose
    expiries are whole intervals apart from the first."""
    if not t.overrun:
        return None
    if t.proc.clock < 0:
        return "its overrun count (a CPU clock's timer)"
    if t.proc.signo == SIGTRAP:
        return "its overrun count (its signal is SIGTRAP, which a restore needs)"
    if not 0 < t.value_ns <= t.interval_ns:
        return "its overrun count (armed off its interval)"
    return None


def map_clock(clock: int, tid_map: dict[int, int]) -> int:
    """The clock id for the restored process: a CPU clock naming one of its threads
    names the restored thread."""
    if clock >= 0 or cpu_clock_pid(clock) == 0:
        return clock
    return cpu_clock(tid_map[cpu_clock_pid(clock)], clock)
