"""POSIX timer structs and the kernel's help to recreate timers under given ids.

PR_TIMER_CREATE_RESTORE_IDS (Linux 6.15+, "posix-timers: Provide a mechanism to allocate
a given timer ID"): while it is on, timer_create reads the wanted id from its timer_t
argument and fails (EBUSY) if that id is taken; off, ids come from a per-process counter
starting at 0, so a restore without it creates every id up to the highest and deletes
the ones not wanted.
"""

from __future__ import annotations

import ctypes
import struct

from ckpt.kernel import siginfo
from ckpt.kernel.sys import libc

PR_TIMER_CREATE_RESTORE_IDS = 77
RESTORE_IDS_OFF, RESTORE_IDS_ON, RESTORE_IDS_GET = 0, 1, 2
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
NOTIFIES = (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_SIGNAL | SIGEV_THREAD_ID)
#: Clocks a timer may use as such (REALTIME, MONOTONIC, BOOTTIME, REALTIME_ALARM,
#: BOOTTIME_ALARM, TAI); negative ones are CPU clocks (cpu_clock_pid).
PLAIN_CLOCKS = frozenset({0, 1, 7, 8, 9, 11})
CPUCLOCK_PERTHREAD = 4
CPUCLOCK_TYPES = 3  # PROF 0, VIRT 1, SCHED 2: 3 is none
NSEC = 1_000_000_000
ITIMERSPEC = struct.Struct("qqqq")  # it_interval, it_value: (tv_sec, tv_nsec) each
SIGEVENT = struct.Struct("Qiii44x")  # sigev_value, signo, notify, _tid; 64 bytes
TIMESPEC = struct.Struct("qq")
TIMER_ABSTIME = 1
SI_TIMER = -2  # si_code of a timer's signal
SI_TID, SI_OVERRUN = 16, 20  # offsets of si_tid (the timer id) and si_overrun in its siginfo


def itimerspec(interval_ns: int, value_ns: int) -> bytes:
    return ITIMERSPEC.pack(*divmod(interval_ns, NSEC), *divmod(value_ns, NSEC))


def timespec(ns: int) -> bytes:
    return TIMESPEC.pack(*divmod(ns, NSEC))


def parse_timespec(data: bytes) -> int:
    sec, nsec = TIMESPEC.unpack(data[:TIMESPEC.size])
    return int(sec * NSEC + nsec)


def parse_itimerspec(data: bytes) -> tuple[int, int]:
    """(interval_ns, value_ns) of a struct itimerspec."""
    i_sec, i_nsec, v_sec, v_nsec = ITIMERSPEC.unpack(data[:ITIMERSPEC.size])
    return i_sec * NSEC + i_nsec, v_sec * NSEC + v_nsec


def sigevent(value: int, signo: int, notify: int, tid: int) -> bytes:
    return SIGEVENT.pack(value, signo, notify, tid)


def cpu_clock_pid(clock: int) -> int:
    """The pid a CPU clock id names (0: the caller's own)."""
    return ~(clock >> 3)


def is_thread_clock(clock: int) -> bool:
    return clock < 0 and bool(clock & CPUCLOCK_PERTHREAD)


def cpu_clock(pid: int, clock: int) -> int:
    """``clock`` made to name ``pid`` instead (make_process_cpuclock)."""
    return (~pid << 3) | (clock & 7)


def valid_clock(clock: int) -> bool:
    """A clock id timer_create takes: a plain clock or a well-formed CPU clock."""
    return clock in PLAIN_CLOCKS or (clock < 0 and clock & 3 != CPUCLOCK_TYPES)


def timer_of(info: bytes) -> int | None:
    """The id of the POSIX timer that queued this siginfo, None if not a timer's."""
    if siginfo.code(info) != SI_TIMER:
        return None
    return int(struct.unpack_from("i", info, SI_TID)[0])


def restore_ids_supported() -> bool:
    """Does this kernel create timers under a given id (PR_TIMER_CREATE_RESTORE_IDS)?"""
    return int(libc.prctl(ctypes.c_int(PR_TIMER_CREATE_RESTORE_IDS),
                          ctypes.c_ulong(RESTORE_IDS_GET), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0))) >= 0
