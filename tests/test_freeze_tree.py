"""FrozenTree freezes a root and all its live descendants, every thread of each, and lets
go of all of them on every path: a fork or an exit racing the freeze is caught, zombies
are recorded, stopped members stay stopped, and kill -9 of the freezer lets the whole tree
run on. The pure parts (pre-order, the /proc walk) run without root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Harness,
    assert_running_untraced,
    is_alive,
    needs_root,
    proc_status,
    read_lines,
    thread_ids,
    wait_for,
    wait_for_lines,
)

from ckpt.collect.proc import list_children
from ckpt.errors import NotDumpable
from ckpt.freeze.tree import FrozenTree, fate, list_tree
from ckpt.tree import preorder

# --------------------------------------------------------------------------- pure parts


def test_preorder_parents_first_siblings_by_pid() -> None:
    #        10
    #      /    \
    #    12      11        (12 forked first, but siblings go by pid)
    #    |      /  \
    #    13   20    14
    parent = {10: 1, 12: 10, 11: 10, 13: 12, 20: 11, 14: 11}
    assert preorder(10, parent) == [10, 11, 14, 20, 12, 13]


def test_preorder_leaves_out_what_does_not_lead_to_root() -> None:
    # 30 hangs under 99, outside the tree; 10's own parent entry is ignored
    assert preorder(10, {10: 5, 11: 10, 30: 99, 5: 1}) == [10, 11]
    assert preorder(10, {}) == [10]


def test_preorder_survives_a_cycle() -> None:
    assert preorder(10, {11: 10, 12: 11, 10: 12}) == [10, 11, 12]


def fake_proc(root: Path, procs: dict[int, tuple[int, str]],
              threads: dict[int, dict[int, str]] | None = None) -> str:
    """A /proc with pid -> (ppid, state): stat and task/PID/children files; ``threads``:
    pid -> {tid: state} of its other threads."""
    def stat(pid: int, state: str, ppid: int) -> str:
        return f"{pid} (p {pid}) {state} {ppid} {pid} {pid} 0 -1 0" + " 0" * 40 + "\n"

    for pid, (ppid, state) in procs.items():
        task = root / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (root / str(pid) / "stat").write_text(stat(pid, state, ppid))
        (task / "stat").write_text(stat(pid, state, ppid))
        kids = sorted(k for k, (pp, _) in procs.items() if pp == pid)
        (task / "children").write_text("".join(f"{k} " for k in kids))
        for tid, tstate in (threads or {}).get(pid, {}).items():
            (root / str(pid) / "task" / str(tid)).mkdir()
            (root / str(pid) / "task" / str(tid) / "stat").write_text(stat(tid, tstate, ppid))
    return str(root)


def test_fate_tells_zombies_from_processes_whose_leader_exited(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {10: (1, "S"), 11: (10, "Z"), 12: (10, "Z"), 13: (10, "Z")},
                     threads={11: {21: "Z"}, 12: {22: "Z", 23: "S"}, 10: {24: "Z"}})
    assert fate(10, root) == "live"
    assert fate(11, root) == "zombie"  # every thread dead
    assert fate(12, root) == "exiting"  # thread 23 still runs
    assert fate(13, root) == "zombie"
    assert fate(99, root) == "gone"


def test_list_tree_walks_children_and_skips_zombies(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {100: (1, "S"), 105: (100, "S"), 103: (100, "R"),
                                107: (103, "S"), 104: (100, "Z"), 200: (1, "S")})
    assert list_tree(100, root) == [100, 103, 107, 105]
    assert list_tree(107, root) == [107]


# --------------------------------------------------------------------------- real trees

# root r forks c1 (which forks g, with a second thread gt) and c2; each prints its role and
# pid once, then "ROLE N" lines forever
TREE = """
import os, sys, threading, time
def loop(role):
    n = 0
    while True:
        n += 1
        os.write(1, f"{role} {n}\\n".encode())
        time.sleep(0.02)
def spawn(body, role):
    pid = os.fork()
    if pid == 0:
        try:
            os.write(1, f"start {role} {os.getpid()}\\n".encode())
            body(role)
        finally:
            os._exit(0)
    return pid
def grandchild(role):
    threading.Thread(target=loop, args=(role + "t",), daemon=True).start()
    loop(role)
def child1(role):
    spawn(grandchild, "g")
    loop(role)
os.write(1, f"start r {os.getpid()}\\n".encode())
spawn(child1, "c1")
spawn(loop, "c2")
loop("r")
"""

# the freezer in a process of its own: freezes argv[1]'s tree, prints what it holds as one
# JSON line, holds it until a line (or EOF) on stdin, releases it
HOLDER = """
import json, sys
from ckpt.freeze.tree import FrozenTree
with FrozenTree(int(sys.argv[1])) as tree:
    print(json.dumps({"pids": tree.pids, "zombies": tree.zombies,
                      "ppid": {str(k): v for k, v in tree.ppid.items()}}), flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


class Tree:
    """A running TREE: role -> pid, and how many lines each role has written."""

    def __init__(self, harness: Harness, out: Path) -> None:
        self.out = out
        self.proc = harness.launch([sys.executable, "-c", TREE], out)
        self.role = wait_for(self._roles, 10, "the tree to start")
        for pid in self.role.values():
            harness.track(pid)
        self.root = self.role["r"]

    def _roles(self) -> dict[str, int] | None:
        roles = {line.split()[1]: int(line.split()[2]) for line in read_lines(self.out)
                 if line.startswith("start ")}
        return roles if len(roles) == 4 else None

    def counts(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for line in read_lines(self.out):
            role = line.partition(" ")[0]
            if role != "start":
                seen[role] = seen.get(role, 0) + 1
        return seen

    def assert_computing(self, roles: tuple[str, ...] = ("r", "c1", "c2", "g", "gt")) -> None:
        before = self.counts()
        wait_for(lambda: all(self.counts().get(r, 0) >= before.get(r, 0) + 3 for r in roles),
                 10, f"{roles} to write more lines")


def assert_traced_by(tracer: int, pid: int) -> None:
    tids = thread_ids(pid)
    assert tids, f"process {pid} is gone"
    for tid in tids:
        st = proc_status(pid, tid)
        assert st is not None, f"thread {tid} of {pid} is gone"
        assert st["TracerPid"] == str(tracer), f"tid {tid} of {pid}: {st['TracerPid']}"
        assert st["State"].startswith("t"), f"tid {tid} of {pid}: {st['State']}"


def proc_descendants(root: int) -> tuple[set[int], set[int]]:
    """(live, zombie) descendants of root in /proc right now, root included in live."""
    live, zombies, todo = {root}, set(), [root]
    while todo:
        for kid in list_children(todo.pop()):
            st = proc_status(kid)
            if st is None:
                continue
            if st["State"].startswith("Z"):
                zombies.add(kid)
            else:
                live.add(kid)
                todo.append(kid)
    return live, zombies


@contextmanager
def holder(tmp_path: Path, root: int, pause_at: str = "") -> Iterator[subprocess.Popen[str]]:
    """HOLDER started on root (stopped at ckpt's testpoint ``pause_at`` if given); killed
    at the end if still there."""
    env = dict(os.environ)
    env.pop("CKPT_TEST_PAUSE_AT", None)
    if pause_at:
        env["CKPT_TEST_PAUSE_AT"] = pause_at
    with open(tmp_path / "holder.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], env=env,
                                stdin=subprocess.PIPE, stdout=out, stderr=out, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


def held(tmp_path: Path, proc: subprocess.Popen[str]) -> dict[str, Any]:
    """What HOLDER printed: pids, zombies, ppid (keys as strings)."""
    line = wait_for_lines(tmp_path / "holder.out", 1, timeout=30)[0]
    assert proc.poll() is None, (tmp_path / "holder.out").read_text()
    answer: dict[str, Any] = json.loads(line)
    return answer


def wait_paused(proc: subprocess.Popen[str]) -> None:
    wait_for(lambda: (proc_status(proc.pid) or {}).get("State", "").startswith("T"), 30,
             "the holder to pause at its testpoint")


def release(tmp_path: Path, proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0, (tmp_path / "holder.out").read_text()


def parent_and_child(harness: Harness, tmp_path: Path,
                     child: str) -> tuple[subprocess.Popen[bytes], int]:
    """A process that forks one child running ``child`` (Python, indented for an if
    block), then sleeps and never reaps it; returns both once the child exists."""
    out = tmp_path / "out"
    code = (f"import os, time\nif os.fork() == 0:\n    {child}\n"
            "print('ready', flush=True)\nwhile True:\n    time.sleep(0.01)\n")
    proc = harness.launch([sys.executable, "-c", code], out)
    wait_for_lines(out, 1)
    kid: int = wait_for(lambda: next(iter(list_children(proc.pid)), None), 10, "the child")
    harness.track(kid)
    return proc, kid


def wait_zombie(pid: int) -> None:
    wait_for(lambda: (proc_status(pid) or {}).get("State", "").startswith("Z"), 10,
             f"process {pid} to become a zombie")


@needs_root
def test_tree_is_frozen_whole_and_runs_on_untraced(harness: Harness, tmp_path: Path) -> None:
    tree = Tree(harness, tmp_path / "out")
    r = tree.role
    preflight = list_tree(tree.root)
    with FrozenTree(tree.root) as frozen:
        assert frozen.pids == preflight
        assert set(frozen.pids) == set(r.values()) and frozen.pids[0] == r["r"]
        assert frozen.zombies == []
        assert frozen.ppid[r["c1"]] == frozen.ppid[r["c2"]] == r["r"]
        assert frozen.ppid[r["g"]] == r["c1"]
        for pid in frozen.pids:
            assert_traced_by(os.getpid(), pid)
            assert {t.tid for t in frozen.members[pid].threads()} == thread_ids(pid)
        assert len(frozen.members[r["g"]].threads()) == 2
        assert frozen.frozen_at > 0 and not frozen.killed
    for pid in r.values():
        assert_running_untraced(pid)
    tree.assert_computing()


@needs_root
def test_stopped_member_stays_stopped(harness: Harness, tmp_path: Path) -> None:
    tree = Tree(harness, tmp_path / "out")
    g = tree.role["g"]
    os.kill(g, signal.SIGSTOP)
    wait_for(lambda: all((proc_status(g, t) or {}).get("State", "").startswith("T")
                         for t in thread_ids(g)), 10, "the grandchild to stop")
    with FrozenTree(tree.root) as frozen:
        assert frozen.members[g].stop_signal == signal.SIGSTOP
        for pid in frozen.pids:
            assert_traced_by(os.getpid(), pid)
        # ending g's stop for the freeze sent its parent no SIGCHLD it could see
        shdpnd = int((proc_status(tree.role["c1"]) or {})["ShdPnd"], 16)
        assert not shdpnd & 1 << (signal.SIGCHLD - 1), f"c1 has SIGCHLD queued: {shdpnd:#x}"

    def g_stopped_untraced() -> bool:
        states = [proc_status(g, t) for t in thread_ids(g)]
        return all(st is not None and st["State"].startswith("T") and st["TracerPid"] == "0"
                   for st in states)

    wait_for(g_stopped_untraced, 10, "the grandchild back in its stop, untraced")
    for role in ("r", "c1", "c2"):
        assert_running_untraced(tree.role[role])
    tree.assert_computing(("r", "c1", "c2"))
    assert g_stopped_untraced()
    os.kill(g, signal.SIGCONT)
    tree.assert_computing()


@needs_root
def test_exception_inside_releases_every_member(harness: Harness, tmp_path: Path) -> None:
    tree = Tree(harness, tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"), FrozenTree(tree.root) as frozen:
        assert len(frozen.pids) == 4
        raise RuntimeError("boom")
    for pid in tree.role.values():
        assert_running_untraced(pid)
    tree.assert_computing()


@needs_root
def test_kill_leaves_no_member_alive(harness: Harness, tmp_path: Path) -> None:
    tree = Tree(harness, tmp_path / "out")
    called: list[bool] = []
    with FrozenTree(tree.root) as frozen:
        frozen.kill(then=lambda: called.append(True))
        assert frozen.killed
    assert called == [True]
    for pid in tree.role.values():
        assert not is_alive(pid), f"member {pid} still runs"


@needs_root
def test_zombie_child_is_recorded_never_seized(harness: Harness, tmp_path: Path) -> None:
    proc, kid = parent_and_child(harness, tmp_path, "os._exit(7)")
    wait_zombie(kid)
    with FrozenTree(proc.pid) as frozen:
        assert frozen.pids == [proc.pid]
        assert frozen.zombies == [kid]
        assert frozen.ppid[kid] == proc.pid
        assert list(frozen.members) == [proc.pid]
        assert (proc_status(kid) or {}).get("TracerPid") == "0"
    assert_running_untraced(proc.pid)
    assert (proc_status(kid) or {}).get("State", "").startswith("Z")


@needs_root
def test_zombie_root_is_refused(harness: Harness, tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        wait_zombie(pid)
        with pytest.raises(NotDumpable, match=f"process {pid} is a zombie"), FrozenTree(pid):
            pass
    finally:
        os.waitpid(pid, 0)


@needs_root
def test_member_traced_by_another_refuses_the_tree(harness: Harness, tmp_path: Path) -> None:
    tree = Tree(harness, tmp_path / "out")
    c2 = tree.role["c2"]
    tracer_src = ("import ctypes, sys, time\n"
                  "libc = ctypes.CDLL(None, use_errno=True)\n"
                  "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, "
                  "ctypes.c_void_p]\n"
                  "if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:\n"
                  "    sys.exit(1)\n"
                  "print('seized', flush=True)\n"
                  "time.sleep(60)\n")
    tracer = harness.launch([sys.executable, "-c", tracer_src, str(c2)], tmp_path / "t.out")
    wait_for_lines(tmp_path / "t.out", 1)
    with pytest.raises(NotDumpable) as err, FrozenTree(tree.root):
        pass
    assert f"process {c2} is already traced by process {tracer.pid}" in str(err.value)
    harness.kill(tracer.pid)
    for pid in tree.role.values():
        assert_running_untraced(pid)
    tree.assert_computing()


@needs_root
def test_fork_after_the_root_is_seized_is_caught(harness: Harness, tmp_path: Path) -> None:
    """The root forks after PTRACE_SEIZE, before its interrupt stops it: the child is
    listed once the root is stopped, and seized too."""
    out, trigger = tmp_path / "out", tmp_path / "fork-now"
    code = ("import os, sys, time\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            f"    if os.path.exists({str(trigger)!r}):\n"
            f"        os.unlink({str(trigger)!r})\n"
            "        if os.fork() == 0:\n"
            "            while True:\n                time.sleep(0.01)\n"
            "    time.sleep(0.005)\n")
    proc = harness.launch([sys.executable, "-c", code], out)
    wait_for_lines(out, 1)
    with holder(tmp_path, proc.pid, pause_at="seized#1") as h:
        wait_paused(h)
        assert list_children(proc.pid) == []
        trigger.touch()
        kid = wait_for(lambda: next(iter(list_children(proc.pid)), None), 10, "the fork")
        harness.track(kid)
        os.kill(h.pid, signal.SIGCONT)
        answer = held(tmp_path, h)
        assert answer["pids"] == [proc.pid, kid]
        live, zombies = proc_descendants(proc.pid)
        assert live == {proc.pid, kid} and not zombies
        for pid in live:
            assert_traced_by(h.pid, pid)
        release(tmp_path, h)
    for pid in (proc.pid, kid):
        assert_running_untraced(pid)


# forks in a tight loop: each child forks a grandchild that exits at once (a zombie until
# the child reaps it), lives a few ms, and exits; the root reaps without waiting
STORM = """
import os, time
print('ready', flush=True)
while True:
    if os.fork() == 0:
        if os.fork() == 0:
            os._exit(0)
        time.sleep(0.005)
        os.wait()
        os._exit(0)
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
"""


@needs_root
def test_forking_tree_is_frozen_whole(harness: Harness, tmp_path: Path) -> None:
    """Whatever the moment, every live process of the frozen root's /proc tree is a
    traced member, and every zombie in it is recorded."""
    out = tmp_path / "out"
    proc = harness.launch([sys.executable, "-c", STORM], out)
    wait_for_lines(out, 1)
    sizes = set()
    for _ in range(15):
        with FrozenTree(proc.pid) as frozen:
            live, zombies = proc_descendants(proc.pid)
            assert set(frozen.pids) == live
            assert set(frozen.zombies) == zombies
            for pid in frozen.pids:
                assert_traced_by(os.getpid(), pid)
                assert frozen.ppid[pid] == int((proc_status(pid) or {})["PPid"])
            sizes.add(len(frozen.pids))
        assert_running_untraced(proc.pid)
    assert max(sizes) > 1, "never caught a child: the storm did not run"


@needs_root
def test_member_killed_while_being_frozen_is_a_zombie(harness: Harness,
                                                      tmp_path: Path) -> None:
    """A child SIGKILLed between its seize and its interrupt: reaped from ckpt's ptrace,
    recorded as a zombie of its frozen parent; the root runs on."""
    proc, kid = parent_and_child(harness, tmp_path, "while True:\n        time.sleep(0.01)")
    with holder(tmp_path, proc.pid, pause_at="seized#2") as h:
        wait_paused(h)
        assert (proc_status(kid) or {}).get("TracerPid") == str(h.pid)
        os.kill(kid, signal.SIGKILL)
        wait_zombie(kid)
        os.kill(h.pid, signal.SIGCONT)
        answer = held(tmp_path, h)
        assert answer["pids"] == [proc.pid] and answer["zombies"] == [kid]
        assert answer["ppid"][str(kid)] == proc.pid
        assert_traced_by(h.pid, proc.pid)
        st = proc_status(kid)
        assert st is not None and st["State"].startswith("Z") and st["TracerPid"] == "0"
        release(tmp_path, h)
    assert_running_untraced(proc.pid)


@needs_root
def test_freezer_killed_leaves_the_tree_running(harness: Harness, tmp_path: Path) -> None:
    tree = Tree(harness, tmp_path / "out")
    with holder(tmp_path, tree.root) as h:
        answer = held(tmp_path, h)
        assert sorted(answer["pids"]) == sorted(tree.role.values())
        for pid in answer["pids"]:
            assert_traced_by(h.pid, pid)
        h.kill()
        h.wait()
    for pid in tree.role.values():
        assert_running_untraced(pid)
    tree.assert_computing()


@needs_root
def test_child_whose_main_thread_exited_refuses_the_tree(harness: Harness,
                                                         tmp_path: Path) -> None:
    """A member whose leader called pthread_exit (state Z, threads running) is no zombie:
    never dropped from the tree unfrozen, but refused, naming it."""
    body = ("import ctypes, threading\n"
            "    threading.Thread(target=lambda: time.sleep(600)).start()\n"
            "    ctypes.CDLL(None).pthread_exit(None)")
    proc, kid = parent_and_child(harness, tmp_path, body)
    wait_zombie(kid)
    assert len(thread_ids(kid)) == 2
    with pytest.raises(NotDumpable, match=f"process {kid}: its main thread has exited"), \
            FrozenTree(proc.pid):
        pass
    assert_running_untraced(proc.pid)
    with pytest.raises(NotDumpable, match=f"process {kid}: its main thread has exited"), \
            FrozenTree(kid):
        pass
    os.kill(kid, signal.SIGKILL)  # shows as a zombie (state Z): the harness would spare it


@needs_root
@pytest.mark.parametrize("when", ["seized#3", "frozen"])
def test_freezer_interrupted_releases_the_tree(harness: Harness, tmp_path: Path,
                                               when: str) -> None:
    """SIGTERM to the freezer half-way through the freeze, or once frozen: one
    Interrupted, every member released, the stopped one stopped again."""
    tree = Tree(harness, tmp_path / "out")
    c2 = tree.role["c2"]
    os.kill(c2, signal.SIGSTOP)
    with holder(tmp_path, tree.root, pause_at=when if when != "frozen" else "") as h:
        if when == "frozen":
            held(tmp_path, h)
        else:
            wait_paused(h)
        os.kill(h.pid, signal.SIGTERM)
        os.kill(h.pid, signal.SIGCONT)
        assert h.wait(timeout=30) != 0
    assert "Interrupted: interrupted by SIGTERM" in (tmp_path / "holder.out").read_text()
    for role in ("r", "c1", "g"):
        assert_running_untraced(tree.role[role])
    wait_for(lambda: all((proc_status(c2, t) or {}).get("State", "").startswith("T")
                         and (proc_status(c2, t) or {}).get("TracerPid") == "0"
                         for t in thread_ids(c2)), 10, "c2 stopped again, untraced")
    os.kill(c2, signal.SIGCONT)
    tree.assert_computing()
