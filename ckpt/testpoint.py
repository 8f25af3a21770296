"""Test-only: ``CKPT_TEST_PAUSE_AT=<point>[#N]`` makes ckpt SIGSTOP itself the N-th time
(default first) it reaches ``point``, so that a test can SIGKILL it exactly there;
``CKPT_TEST_SIGNAL_AT=<point>:<signo>`` makes it send signo to the process it works on
each time it reaches ``point``;
``CKPT_TEST_WITHOUT=<feature>[,...]`` makes it act as if the kernel lacked a feature."""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def pause_at(point: str) -> None:
    want = os.environ.get("CKPT_TEST_PAUSE_AT")
    if not want or want.partition("#")[0] != point:
        return
    _seen[point] = n = _seen.get(point, 0) + 1
    if n == int(want.partition("#")[2] or 1):
        os.kill(os.getpid(), signal.SIGSTOP)


def without(feature: str) -> bool:
    return feature in os.environ.get("CKPT_TEST_WITHOUT", "").split(",")


def signal_at(point: str, pid: int) -> None:
    want = os.environ.get("CKPT_TEST_SIGNAL_AT")
    if want and want.partition(":")[0] == point:
        os.kill(pid, int(want.partition(":")[2]))
