"""ckpt.collect.inject.find_gadgets: searched once per code layout (a tree's members
forked without exec share theirs), and a pair found before is used only where its bytes
still are."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from ckpt.collect import inject
from ckpt.collect.inject import RESTORERS, SYSCALL_RET, Gadgets, find_gadgets
from ckpt.collect.vmas import collect_vmas
from ckpt.kernel.sys import kill_and_reap, vm_read


@pytest.fixture
def child(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A fork of this process (same code layout), paused; killed and reaped after."""
    monkeypatch.setattr(inject, "_found", {})
    monkeypatch.setattr(inject, "_missing", set())
    pid = os.fork()
    if pid == 0:
        while True:
            signal.pause()
    yield pid
    kill_and_reap(pid)


def test_a_forks_gadgets_are_checked_not_searched(child: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    mine = find_gadgets(os.getpid(), collect_vmas(os.getpid()))
    assert mine is not None
    read: list[int] = []

    def counting(pid: int, addr: int, n: int) -> bytes:
        read.append(n)
        return vm_read(pid, addr, n)

    monkeypatch.setattr(inject, "vm_read", counting)
    assert find_gadgets(child, collect_vmas(child)) == mine
    assert sum(read) <= len(SYSCALL_RET) + max(len(p) for p in RESTORERS), read


def test_a_stale_pair_is_searched_again(child: int) -> None:
    vmas = collect_vmas(child)
    real = find_gadgets(child, vmas)
    assert real is not None
    wrong = Gadgets(real.syscall_ret + 1, real.restorer + 1)
    assert vm_read(child, wrong.syscall_ret, len(SYSCALL_RET)) != SYSCALL_RET
    layout = next(iter(inject._found))
    inject._found[layout] = wrong
    assert find_gadgets(child, vmas) == real
