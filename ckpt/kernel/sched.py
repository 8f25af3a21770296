"""Scheduling constants (sched.h, ioprio.h) shared by the collector, the restore and the
image checks."""

from __future__ import annotations

SCHED_RESET_ON_FORK = 0x40000000
SCHED_DEADLINE = 6
POLICIES = (0, 1, 2, 3, 5)  # OTHER, FIFO, RR, BATCH, IDLE
IOPRIO_WHO_PROCESS = 1
