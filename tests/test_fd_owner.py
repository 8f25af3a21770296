"""Signal-driven I/O comes back for every fd kind: O_ASYNC and the other status flags, the
owner (F_SETOWN) and the signal (F_SETSIG) (ckpt/collect/fdkinds/fown.py)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    run_ckpt,
    shown_fds,
)
from test_validate import process

from ckpt.collect.fdkinds.fown import (
    F_OWNER_PGRP,
    F_OWNER_PID,
    F_OWNER_TID,
    Fown,
    owner_map,
    restore_owners,
)
from ckpt.collect.fdkinds.fown import refusal as fown_refusal
from ckpt.collect.restorable import table_lines
from ckpt.errors import ImageError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import problems, validate

PID, TIDS, SID = 100, (100, 101, 102), 100


@pytest.mark.parametrize(("own", "pgid", "sid", "shell_job", "says"), [
    (Fown(), 100, SID, False, None),  # no owner
    (Fown(F_OWNER_PID, 100), 100, SID, False, None),  # the process
    (Fown(F_OWNER_TID, 102), 100, SID, False, None),  # one of its threads
    (Fown(F_OWNER_PGRP, 100), 100, SID, False, None),  # its group, which it leads
    (Fown(F_OWNER_PID, 555), 100, SID, False, "process 555 (F_SETOWN), outside process 100"),
    (Fown(F_OWNER_TID, 556), 100, SID, False, "thread 556 (F_SETOWN), outside process 100"),
    (Fown(F_OWNER_PGRP, 77), 100, SID, False, "process group 77 (F_SETOWN), not the process's"),
    # its own group, which a restore does not make again
    (Fown(F_OWNER_PGRP, 100), 100, SID, True, "its process group 100 (F_SETOWN), which"),
    (Fown(F_OWNER_PGRP, 90), 90, SID, False, "its process group 90 (F_SETOWN), which"),
    (Fown(F_OWNER_PGRP, 100), 100, 90, False, "its process group 100 (F_SETOWN), which"),
])
def test_owner_refusals(own: Fown, pgid: int, sid: int, shell_job: bool,
                        says: str | None) -> None:
    why = fown_refusal(own, PID, TIDS, pgid, sid, shell_job)
    assert (why is None) if says is None else (why is not None and says in why), why


def test_owner_map_follows_new_ids() -> None:
    entry = process()
    entry.threads.add(tid=43)
    entry.pgid = 42
    owners = owner_map(entry, [900, 901], 900)
    assert owners[(F_OWNER_PID, 42)] == 900
    assert owners[(F_OWNER_TID, 43)] == 901
    assert owners[(F_OWNER_PGRP, 42)] == 900
    assert (F_OWNER_PID, 7) not in owners


def test_another_member_may_own_a_file_and_nothing_else_may() -> None:
    """A process owner outside the process passes validation (a tree's member may be
    it); the restore then sets only owners that are the tree's members."""
    entry = process()
    _owned(entry, F_OWNER_PID, 7)
    assert list(problems(entry)) == []
    calls: list[tuple[int, ...]] = []

    class Remote:
        pid = 42

        def sc(self, nr: int, *args: int, what: str = "", check: bool = True) -> int:
            calls.append((nr, *args))
            return 0

        def put(self, data: bytes, off: int = 0) -> int:
            return 0x1000

        def put_str(self, s: str, off: int = 0) -> int:
            return 0x1000

    entry.fds.add(fd=3, file_id=entry.files[0].id)
    with pytest.raises(RestoreError, match="owner, process 7, is not"):
        restore_owners(Remote(), entry, [42], 42)
    restore_owners(Remote(), entry, [42], 42, members=(42, 7))
    assert calls


def test_check_lists_the_owner_refusal() -> None:
    assert any(line.startswith("refused (fd): an owner (F_SETOWN)") for line in table_lines())


def _owned(entry: pb.ProcessEntry, kind: int, who: int) -> None:
    entry.files[0].owner_type, entry.files[0].owner = kind, who


@pytest.mark.parametrize(("change", "field"), [
    (lambda e: _owned(e, F_OWNER_TID, 7), "files[0].owner"),  # not its thread
    (lambda e: _owned(e, F_OWNER_PGRP, 7), "files[0].owner"),  # not its group
    (lambda e: _owned(e, 5, 42), "files[0].owner_type"),
    (lambda e: setattr(e.files[0], "signal", 65), "files[0].signal"),
])
def test_owner_fields_are_validated(change: Callable[[pb.ProcessEntry], None],
                                    field: str) -> None:
    entry = process()
    entry.pgid = 40
    for kind, who in ((F_OWNER_PID, 42), (F_OWNER_TID, 42), (F_OWNER_PGRP, 40)):
        _owned(entry, kind, who)
        entry.files[0].signal = 10
        assert list(problems(entry)) == []
    change(entry)
    with pytest.raises(ImageError, match=rf"\({re.escape(field)} = "):
        validate("core-42.img", entry)


# --------------------------------------------------------------------------- live

IGNORES_SIGUSR1 = "import signal; signal.signal(signal.SIGUSR1, signal.SIG_IGN); signal.pause()"
SIGNALLED = ["rt1", "usr1", "usr2"]  # each pipe's and the listener's (the eventfd: none)


def expected(pid_owner: object = "self") -> dict[str, object]:
    def fd(owner: list[object], signal: int, nonblock: bool = False,
           asynchronous: bool = True) -> dict[str, object]:
        return {"async": asynchronous, "nonblock": nonblock, "owner": owner, "signal": signal}

    return {"pipe": fd([F_OWNER_PID, pid_owner], 10),
            "thread_pipe": fd([F_OWNER_TID, "thread"], 35),
            "listener": fd([F_OWNER_PGRP, "group"], 12, nonblock=True),
            # F_SETFL keeps no O_ASYNC on a file without fasync: only its owner and signal
            "eventfd": fd([F_OWNER_PID, "self"], 10, asynchronous=False),
            # a regular file has no fasync either, but open(2) keeps its O_ASYNC
            "file": fd([F_OWNER_PID, "self"], 10)}


@needs_root
@pytest.mark.parametrize(("extra", "predump"), [((), False), (("--new-pid",), False),
                                                ((), True)],
                         ids=["same-pid", "new-pid", "predump-incremental"])
def test_signal_driven_io_survives(harness: Harness, extra: tuple[str, ...],
                                   predump: bool) -> None:
    """A pipe owned by the process, one by a thread, a TCP listener by the process group,
    an eventfd, a regular file: each keeps O_ASYNC, its owner (mapped to the new ids under
    --new-pid) and its signal, and the signals still come when input arrives."""
    target = Asker(harness, "fd_owner.py")
    assert target.ask() == {"signals": SIGNALLED, "fds": expected()}
    images = harness.images("2")
    chain: tuple[str, ...] = ()
    if predump:
        assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D",
                                harness.images("1")))
        chain = ("--incremental", "--prev-images-dir", "../1")
    harness.dump_and_reap(target.proc, images, *chain)
    pid = harness.restore_detached(images, *extra)
    assert (pid != target.proc.pid) == bool(extra)
    assert target.ask() == {"signals": SIGNALLED, "fds": expected()}
    assert target.ask() == {"signals": SIGNALLED, "fds": expected()}


@needs_root
@pytest.mark.parametrize(("mode", "says"), [
    ("other", "its SIGIO goes to process {pid} (F_SETOWN), outside process"),
    ("group", "its SIGIO goes to process group {pid} (F_SETOWN), not the process's own"),
])
def test_owner_outside_is_refused(harness: Harness, mode: str, says: str) -> None:
    """An fd whose SIGIO goes to another process (or its group) is refused before the
    freeze, naming the fd; the target runs on."""
    other = harness.launch([sys.executable, "-c", IGNORES_SIGUSR1], harness.tmp / "other.out")
    target = Asker(harness, "fd_owner.py", mode, str(other.pid))
    images = harness.images()
    for action in ("dump", "predump"):
        line = assert_one_error_line(run_ckpt(action, "-t", str(target.proc.pid), "-D",
                                              images))
        assert re.search(r"fd \d+ is a pipe \(pipe:\[\d+\]\): ", line), line
        assert says.format(pid=other.pid) in line, line
    assert_running_untraced(target.proc.pid)
    answer = target.ask()
    assert isinstance(answer, dict)
    assert answer["fds"]["pipe"]["owner"] == [F_OWNER_PGRP if mode == "group" else F_OWNER_PID,
                                              other.pid]


@needs_root
def test_own_group_owner_needs_its_session_back(harness: Harness) -> None:
    """A listener owned by the process's own group (it leads its session): --shell-job
    restores keep the restoring shell's session and group, so dump --shell-job refuses it
    before the freeze; a predump passes (the final dump decides)."""
    target = Asker(harness, "fd_owner.py")
    line = assert_one_error_line(run_ckpt("dump", "-t", str(target.proc.pid), "-D",
                                          harness.images("1"), "--shell-job"))
    assert re.search(r"fd \d+ is a socket \(socket:\[\d+\]\): its SIGIO goes to its process "
                     rf"group {target.proc.pid} \(F_SETOWN\), which a restore makes again only "
                     "for a session leader without --shell-job", line), line
    assert_running_untraced(target.proc.pid)
    assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", harness.images("2")))
    assert target.ask() == {"signals": SIGNALLED, "fds": expected()}


@needs_root
@pytest.mark.parametrize("kind", [(), ("unix",)], ids=["pipe", "unix"])
def test_owner_has_the_process_credentials(harness: Harness, kind: tuple[str, ...]) -> None:
    """F_SETOWN records the caller's uid and euid, and SIGIO reaches only the members of
    the owning group they may signal. The owner comes back with the process's
    credentials, not the restoring root's: a uid 65534 target's pipe (or unix socket,
    whose owner goes the way of every fd's) owned by its group signals the target, not a
    child of it that became root."""
    target = Asker(harness, "fd_owner_creds.py", *kind)
    want = {"self": True, "root_child": False}
    assert target.ask() == want
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    assert target.ask() == want


@needs_root
def test_show_lists_owner_and_signal(harness: Harness) -> None:
    target = Asker(harness, "fd_owner.py")
    fds = shown_fds(harness, target.proc.pid, harness.images())
    pid = target.proc.pid
    owned = {(f["type"], f["state"]["owner"], f["state"].get("signal"),
              int(f["flags"], 8) & os.O_ASYNC != 0)
             for f in fds if "owner" in f.get("state", {})}
    tid = next(t for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert owned == {("PIPE", f"pid {pid}", 10, True), ("PIPE", f"tid {tid}", 35, True),
                     ("INET_SOCKET", f"pgrp {pid}", 12, True),  # a session leader's group
                     ("EVENTFD", f"pid {pid}", 10, False), ("REGULAR", f"pid {pid}", 10, True)}
