"""Pure decisions of the release (ckpt.restore.tasks, ckpt.restore.release), without root:
which registers are loaded, which signal parks the leader, which action SIGTRAP gets,
which threads are let go at their call's entry and which signals met on the way are
dropped; and the stub's reset of every signal action to the kernel's default."""

from __future__ import annotations

import ctypes
import errno
import os
import signal

import pytest

from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.ptrace import Regs
from ckpt.kernel.sys import KSIGACTION_SIZE, NR, NSIG, default_all_sigactions, syscall
from ckpt.restore.release import ignored, through_window
from ckpt.restore.tasks import (
    KSIGACTION,
    NOT_PARKING,
    U64,
    image_action,
    park_signal,
    restart_regs,
)

NR_PAUSE, NR_NANOSLEEP = 34, 35
SYSCALL_END = 0x401002  # rip after a `syscall` at 0x401000


def regs(rax: int, orig_rax: int) -> Regs:
    r = Regs()
    r.rax, r.orig_rax, r.rip = rax & U64, orig_rax & U64, SYSCALL_END
    return r


@pytest.mark.parametrize("code", [512, 513, 514])  # ERESTARTSYS, NOINTR, NOHAND
def test_restartable_calls_are_left_to_the_kernel(code: int) -> None:
    """-ERESTARTSYS/-NOINTR/-NOHAND stay raw: the kernel restarts or fails them on the
    way out, depending on whether a handler runs first."""
    got = restart_regs(regs(-code, NR_PAUSE))
    assert (got.rax, got.orig_rax, got.rip) == ((-code) & U64, NR_PAUSE, SYSCALL_END)


def test_restart_block_returns_eintr() -> None:
    """-ERESTART_RESTARTBLOCK would run a restart block the image does not carry."""
    got = restart_regs(regs(-516, NR_NANOSLEEP))
    assert (got.rax, got.orig_rax, got.rip) == ((-errno.EINTR) & U64, NR_NANOSLEEP,
                                                SYSCALL_END)


@pytest.mark.parametrize(("rax", "orig"), [(-516, -1), (-514, -1), (0, NR_PAUSE), (7, -1)])
def test_other_registers_untouched(rax: int, orig: int) -> None:
    """Outside a syscall (orig_rax -1) or after one that returned, nothing changes, even a
    value that looks like a restart code."""
    got = restart_regs(regs(rax, orig))
    assert (got.rax, got.orig_rax, got.rip) == (rax & U64, orig & U64, SYSCALL_END)


@pytest.mark.parametrize(("rax", "orig", "through"), [
    (-512, NR_PAUSE, True), (-514, NR_PAUSE, True),  # EINTR if a handler runs first
    (-513, NR_PAUSE, False),  # ERESTARTNOINTR: restarted after a handler too
    (-516, NR_NANOSLEEP, False),  # ERESTART_RESTARTBLOCK: restart_regs makes it EINTR
    (-514, -1, False), (0, NR_PAUSE, False), (-4, NR_PAUSE, False)])
def test_through_window(rax: int, orig: int, through: bool) -> None:
    """Only a call the kernel restarts and a handler would interrupt is let go at its
    entry; everything else is detached from its park as before."""
    assert through_window(regs(rax, orig)) is through


def test_ignored_signals_are_dropped() -> None:
    """SIG_IGN, or SIG_DFL of a signal whose default is to ignore, never woke the
    original; a handler or any other default action did."""
    entry = pb.ProcessEntry(sigactions=[
        pb.SigAction(signo=signal.SIGUSR1, handler=0x401000),
        pb.SigAction(signo=signal.SIGUSR2, handler=1),
        pb.SigAction(signo=signal.SIGCHLD, handler=0x401000),
        pb.SigAction(signo=signal.SIGWINCH, handler=0, flags=0x4000000),
        pb.SigAction(signo=signal.SIGTERM, handler=0)])
    assert [sig for sig in range(1, 65) if ignored(entry, sig)] == sorted(
        [signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT, signal.SIGURG])


def test_park_signal_is_sigtrap_unless_pending() -> None:
    assert park_signal(set()) == signal.SIGTRAP
    assert park_signal({signal.SIGUSR1, signal.SIGHUP}) == signal.SIGTRAP
    got = park_signal({signal.SIGTRAP})
    assert got != signal.SIGTRAP and got not in NOT_PARKING


def test_park_signal_never_pending_nor_side_effecting() -> None:
    """Whatever is pending, the choice is neither pending nor a signal whose sending acts
    on the queues (SIGCONT, stop signals) or cannot be caught."""
    for pending in (set(range(1, 20)), set(range(1, 64)) - {33}, {5, 1, 2, 3}):
        got = park_signal(pending)
        assert got not in pending and got not in NOT_PARKING
    with pytest.raises(RestoreError):
        park_signal(set(range(1, 65)))


def test_sigtrap_action_from_the_image_or_default() -> None:
    """An image without an entry for a signal (only non-default actions are dumped) gives
    SIG_DFL with no flags, mask or restorer."""
    entry = pb.ProcessEntry()
    entry.sigactions.add(signo=signal.SIGINT, handler=1)  # SIG_IGN
    assert image_action(entry, signal.SIGTRAP) == bytes(KSIGACTION.size)
    entry.sigactions.add(signo=signal.SIGTRAP, handler=0x401234, flags=0x04000000,
                         restorer=0x401000, mask=1 << 14)
    assert KSIGACTION.unpack(image_action(entry, signal.SIGTRAP)) == (
        0x401234, 0x04000000, 0x401000, 1 << 14)


def _all_actions() -> list[bytes]:
    buf = ctypes.create_string_buffer(KSIGACTION_SIZE)
    out = []
    for sig in range(1, NSIG + 1):
        syscall(NR.rt_sigaction, sig, 0, ctypes.addressof(buf), 8)
        out.append(buf.raw)
    return out


def test_stub_starts_from_default_actions() -> None:
    """What the stub does right after fork: a process that ignored SIGPIPE and caught
    SIGUSR1 and SIGINT (as ckpt's Python does) ends with every action all zero."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, lambda *_: None)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            changed = _all_actions() != [bytes(KSIGACTION_SIZE)] * NSIG
            default_all_sigactions()
            code = 0 if changed and _all_actions() == [bytes(KSIGACTION_SIZE)] * NSIG else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
