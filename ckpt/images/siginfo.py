"""Queued signals in a core image: 128-byte siginfo_t records (ProcessEntry.shared_pending,
ThreadCore.pending_signals), and the mark of a process dumped in a job-control stop.

A stopped process has no state of its own that says so, and a real SIGSTOP is never
left queued (it is taken at once), so a SIGSTOP among the process's pending signals
marks the stop: ckpt.freeze.seize ends the stop to dump the process, the dump adds the
mark, and a restore stops the process again, last, before it runs an instruction.
"""

from __future__ import annotations

import signal

from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.siginfo import SIGINFO_SIZE as SIGINFO_SIZE  # the kernel ABI, re-exported
from ckpt.kernel.siginfo import signo as signo

STOPPED_MARK = signal.SIGSTOP.to_bytes(4, "little") + bytes(SIGINFO_SIZE - 4)


def is_stop_mark(siginfo: bytes) -> bool:
    return signo(siginfo) == signal.SIGSTOP


def was_stopped(entry: pb.ProcessEntry) -> bool:
    """Was the process in a job-control stop when dumped?"""
    return any(is_stop_mark(i) for i in entry.shared_pending)
