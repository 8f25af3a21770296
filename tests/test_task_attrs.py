"""Per-thread names, CPU affinity, nice, scheduling policy and I/O priority come back
(ckpt/collect/taskattrs.py); SCHED_DEADLINE is refused before the freeze."""

from __future__ import annotations

import os

from conftest import Asker, Harness

from ckpt.collect.sched import refusals

SCHED_DEADLINE = 6


def test_deadline_refused() -> None:
    policies = [(10, os.SCHED_OTHER), (11, SCHED_DEADLINE | os.SCHED_RESET_ON_FORK),
                (12, os.SCHED_FIFO)]
    assert refusals(10, policies) == [
        "thread 11 of process 10 runs under SCHED_DEADLINE: not supported yet"]


def test_thread_attributes_survive(harness: Harness) -> None:
    target = Asker(harness, "task_attrs.py")
    before = target.ask()
    assert isinstance(before, dict)
    assert len(before) == 4 and {"w-idle", "w-batch", "w-fifo"} <= set(before)
    assert before["w-fifo"][0] == os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
    assert before["w-batch"][2] == 7
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    assert target.ask() == before
