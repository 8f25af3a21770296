"""Tracking state consumed by a pass is never trusted again (ckpt/track/ledger.py): a
second pass from the same parent, as after a pass that failed half-way or a branch of
the chain, falls back to whole copies instead of missing what the first one consumed."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest
from conftest import Bins, Harness, assert_one_error_line, assert_running_untraced, run_ckpt
from test_incremental import (
    covered_whole,
    final_dump,
    predump,
    require,
    restore,
    scenarios,
    show,
    stats,
)

from ckpt.collect import proc
from ckpt.errors import CkptError
from ckpt.images.pb import image_pb2
from ckpt.track import DirtySet, PassContext, Tracker, ledger

CONSUMED = "consumed by another pass"


@pytest.mark.parametrize("backend", [
    pytest.param("uffd-wp", id="uffd-wp"),
    pytest.param("soft-dirty", id="soft-dirty", marks=pytest.mark.soft_dirty),
])
def test_second_pass_from_a_consumed_parent(harness: Harness, bins: Bins, tmp_path: Path,
                                            backend: str) -> None:
    """ck/2 consumed the tracking ck/1 armed, and the phase's writes are in ck/2 only. A
    dump from ck/1 again must not trust the tracker (it would take those pages from ck/1,
    stale): every VMA is copied whole, saying why, and the restore verifies."""
    require(backend)
    t = scenarios(harness, bins, tmp_path)
    ck = tmp_path / "ck"
    predump(t.pid, ck / "1", f"--track={backend}")
    t.advance()
    predump(t.pid, ck / "2", "--prev-images-dir", "../1")
    res = final_dump(t, ck / "3", "../1")
    st = stats(show(ck / "3"))
    assert CONSUMED in res.stderr, res.stderr
    a = t.addr("a")
    assert covered_whole(st, a, a + 1024 * 4096), st
    restore(harness, ck / "3", t.pid)
    t.assert_verifies()


def test_unwritable_state_dir_is_one_error_line(harness: Harness, bins: Bins,
                                                tmp_path: Path) -> None:
    """Where the ledger cannot be written, the pass stops before it consumes anything:
    one error line naming the place, the target runs on untraced."""
    require("uffd-wp")
    t = scenarios(harness, bins, tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    res = run_ckpt("predump", "-t", str(t.pid), "-D", tmp_path / "ck",
                   prefix=("env", f"CKPT_STATE_DIR={blocker}"))
    line = assert_one_error_line(res)
    assert "cannot record the tracking state" in line and str(blocker) in line, line
    assert_running_untraced(t.pid)
    t.assert_verifies()


def test_ledger_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """claim swaps a pass's token in and returns the one it displaced."""
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path / "state"))
    me = os.getpid()
    start = proc.read_stat(me).starttime
    one, two = ledger.new_token(), ledger.new_token()
    assert one != two
    assert ledger.claim(me, start, one) == ""
    assert ledger.claim(me, start + 1, two) == ""  # the same pid, another process
    assert ledger.claim(me, start, two) == one
    assert ledger.claim(me, start, one) == two
    assert oct((tmp_path / "state" / "track").stat().st_mode & 0o777) == "0o700"
    ledger.forget(me, start)
    assert ledger.claim(me, start, one) == ""
    ledger.prune()
    assert os.listdir(tmp_path / "state" / "track") == [f"{me}-{start}"]  # start+1 pruned
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path / "state" / "track" / f"{me}-{start}"))
    with pytest.raises(CkptError, match="cannot record the tracking state"):
        ledger.claim(1, 2, one)


class Fake(Tracker):
    name = "fake"

    def _begin(self, ctx: PassContext) -> DirtySet:
        return DirtySet()


def parent_state(token: str) -> image_pb2.TrackerState:
    me = os.getpid()
    return image_pb2.TrackerState(backend="fake", pid=me,
                                  start_time=proc.read_stat(me).starttime, pass_token=token)


def test_stale_ledger_entries_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         ) -> None:
    """A pass that tracks drops the ledger records of processes that are gone (no such
    pid, or the pid reused by another process: another start time) and the 0-byte
    temporaries older versions left; live processes keep theirs."""
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path))
    track = tmp_path / "track"
    track.mkdir()
    me, parent = os.getpid(), os.getppid()
    start, pstart = proc.read_stat(me).starttime, proc.read_stat(parent).starttime
    gone = 4194000  # above any pid_max
    live = {f"{parent}-{pstart}": "keep\n", "notes.txt": "not ours\n",
            f".{parent}-{pstart}.{me}": ""}  # a temporary of a live writer
    stale = {f"{gone}-5": "t\n", f"{parent}-{pstart + 1}": "t\n",
             f".{gone}-5.{me}": "", f".{parent}-{pstart}.{gone}": ""}
    for name, text in {**live, **stale}.items():
        (track / name).write_text(text)
    Fake(me, None).claim()
    assert sorted(os.listdir(track)) == sorted([*live, f"{me}-{start}"])
    assert ledger.stale(f"{gone}-5", lambda pid: None)
    assert not ledger.stale(f"{parent}-{pstart}", {parent: pstart}.get)


def test_two_passes_from_one_parent_one_wins(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Both passes decide whether to trust their parent before either consumed the
    tracking (the interleaving that let both trust it): only one may."""
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path))
    parent = ledger.new_token()
    me = os.getpid()
    ledger.claim(me, proc.read_stat(me).starttime, parent)
    a, b = Fake(me, parent_state(parent)), Fake(me, parent_state(parent))
    why_a, why_b = a.continuity(), b.continuity()
    a.begin(PassContext(me, None, []))
    b.begin(PassContext(me, None, []))
    assert why_a == "" and CONSUMED in why_b, (why_a, why_b)
    assert a.token and b.token and a.token != b.token


def test_racing_claims_are_serialized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced interleaving on the ledger itself: the first claim is held between its
    read and its write until the second claim has had every chance to run. The second
    waits for the first (flock): exactly one claim displaces the parent's token."""
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path))
    me = os.getpid()
    start = proc.read_stat(me).starttime
    parent = ledger.new_token()
    ledger.claim(me, start, parent)
    first_read, second_done = threading.Event(), threading.Event()
    real_pread = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        data = real_pread(fd, n, off)
        if threading.current_thread().name == "first":
            first_read.set()
            second_done.wait(1.0)  # without a lock the second claim completes here
        return data

    monkeypatch.setattr(os, "pread", pread)
    got: dict[str, str] = {}

    def run(name: str) -> None:
        got[name] = ledger.claim(me, start, name)
        if name == "second":
            second_done.set()

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert first_read.wait(10)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    first.join(10)
    second.join(10)
    assert sorted(got.values()) == sorted([parent, "first"]), got
    assert got["first"] == parent and got["second"] == "first"


def test_parallel_claims_from_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        ) -> None:
    """Eight processes claim at once from one parent token: one displaces it, each of
    the others displaces another's token; nothing is lost or seen twice."""
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path))
    me = os.getpid()
    start = proc.read_stat(me).starttime
    ledger.claim(me, start, "parent")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        displaced = pool.starmap(ledger.claim, [(me, start, f"p{i}") for i in range(8)])
    last = ledger.claim(me, start, "end")
    assert sorted([*displaced, last]) == sorted(["parent", *(f"p{i}" for i in range(8))])
