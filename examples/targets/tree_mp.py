"""A deterministic multiprocessing job: a fork Pool(3), a Queue and a SharedMemory block.

Job i (0 <= i < JOBS) hashes a chain seeded by i, writes its 32-byte digest into slot i
of the shared memory (/dev/shm/ckpt-tree-mp-PID) and puts (i, first 8 hex digits) on the
Queue; the main process gathers the Queue, printing ``progress N`` after each item, and
at the end prints ``result H``: one hash over the Queue's items in job order and the
shared memory, the same in every run that is not disturbed. Jobs from GATE on first
wait, polling, for the file GO to exist, so a test can checkpoint the run in its middle:
the first GATE results are in, three workers sit inside jobs, the rest is queued.

usage: tree_mp.py GO
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
import time
from multiprocessing import shared_memory
from multiprocessing.queues import Queue
from typing import Any

JOBS = 60
GATE = 20
SLOT = 32
ROUNDS = 20000
SHM_NAME = "ckpt-tree-mp-%d"  # of the main process's pid: a test removes what a kill left

# set in the main process before the fork: the workers inherit them
state: dict[str, Any] = {}


def job(i: int) -> None:
    if i >= GATE:
        while not os.path.exists(state["go"]):
            time.sleep(0.01)
    digest = hashlib.sha256(b"seed %d" % i).digest()
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    shm: shared_memory.SharedMemory = state["shm"]
    shm.buf[i * SLOT:(i + 1) * SLOT] = digest
    queue: Queue[tuple[int, str]] = state["queue"]
    queue.put((i, digest.hex()[:8]))


def main() -> None:
    state["go"] = sys.argv[1]
    ctx = mp.get_context("fork")
    state["queue"] = ctx.Queue()
    shm = state["shm"] = shared_memory.SharedMemory(SHM_NAME % os.getpid(), create=True,
                                                    size=JOBS * SLOT)
    try:
        with ctx.Pool(3) as pool:
            pending = pool.map_async(job, range(JOBS), chunksize=1)
            got: dict[int, str] = {}
            while len(got) < JOBS:
                i, head = state["queue"].get()
                got[i] = head
                print(f"progress {len(got)}", flush=True)
            pending.get()
        total = hashlib.sha256()
        for i in range(JOBS):
            total.update(f"{i}:{got[i]};".encode())
        total.update(bytes(shm.buf[:JOBS * SLOT]))
        print(f"result {total.hexdigest()}", flush=True)
    finally:
        shm.close()
        shm.unlink()


if __name__ == "__main__":
    main()
