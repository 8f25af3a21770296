"""`ckpt migrate -t ROOT` of a process tree between the two network-namespace hosts of
tests/test_migrate.py: every member goes on in host B with its pid, parent, group and
session, the pipe between two members carries on without a gap, and nothing of the tree
is left in host A. What migrate refuses for one process it refuses for a member, naming
it, and the tree runs on untouched."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    ckpt_command,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    tree_ids,
    tree_members,
    wait_for,
    wait_for_lines,
    wait_for_tree,
)
from test_daemons import KEYS, check_redis, fill_redis, redis, require
from test_migrate import page_server_in, start_server, two_hosts  # noqa: F401 (a fixture)
from test_tree_nginx import PAGE

from ckpt.actions.migrate import Throttle
from ckpt.errors import RestoreError
from ckpt.transfer.client import commit_remote, connect, restore_remote, send_pass_on

pytestmark = needs_root
T = TypeVar("T")
LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
REDIS_SUCCESS = "Background saving terminated with success"
Hosts = tuple[str, str, str]
LINE = re.compile(r"n=(\d+) pid=(\d+)")

# A parent (waiting in wait4) with three children: "a" counts into a pipe and its own
# log, "b" reads the pipe and logs each number it gets, "d" sleeps. Given an fd (the read
# end of a pipe whose write end is the test's), only "d" keeps it: migrate must refuse
# that. SIGUSR1 makes the parent fork "c", counting into its log; SIGUSR2 kills "d".
TREE = r'''
import os, signal, sys, time
here, ext = sys.argv[1], int(sys.argv[2])
def log_to(name):
    return os.open(os.path.join(here, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def child(keep_ext=False):
    pid = os.fork()
    if pid == 0 and ext >= 0 and not keep_ext:
        os.close(ext)
    return pid
def count(name, pipe=-1):
    fd, n = log_to(name), 0
    while True:
        n += 1
        if pipe >= 0:
            os.write(pipe, b"%d\n" % n)
        os.write(fd, b"n=%d pid=%d\n" % (n, os.getpid()))
        time.sleep(0.01)
r, w = os.pipe()
if child() == 0:
    os.close(r)
    count("a.txt", w)
if child() == 0:
    os.close(w)
    fd, buf = log_to("b.txt"), b""
    while True:
        buf += os.read(r, 4096)
        *lines, buf = buf.split(b"\n")
        for line in lines:
            os.write(fd, b"n=%d pid=%d\n" % (int(line), os.getpid()))
os.close(r)
os.close(w)
d = child(keep_ext=True)
if d == 0:
    while True:
        time.sleep(1)
if ext >= 0:
    os.close(ext)
def grow(*_):
    if os.fork() == 0:
        count("c.txt")
signal.signal(signal.SIGUSR1, grow)
signal.signal(signal.SIGUSR2, lambda *_: os.kill(d, signal.SIGKILL))
print("ready", flush=True)
while True:
    os.waitpid(-1, 0)
'''


def in_a(hosts: Hosts) -> tuple[str, ...]:
    return ("ip", "netns", "exec", hosts[0])


def read_ids(pid: int) -> tuple[int, int, int, int, int]:
    """(pid, ppid, pgid, sid, starttime) from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def children(pid: int) -> list[int]:
    return sorted(int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def launch_tree(harness: Harness, hosts: Hosts | None, ext: int = -1,
                ) -> tuple[subprocess.Popen[bytes], list[int]]:
    """The TREE in host A (or here, without ``hosts``): (its root, [root, a, b, d])."""
    script = harness.tmp / "tree.py"
    script.write_text(TREE)
    where = in_a(hosts) if hosts else ()
    proc = harness.launch([*where, "python3", script, harness.tmp, str(ext)],
                          harness.tmp / "out.txt", [ext] if ext >= 0 else [])
    size = 4
    kids = wait_for(lambda: (k if len(k := children(proc.pid)) == size - 1 else None), 10,
                    "the tree's children")
    for pid in kids:
        harness.track(pid)
    wait_for_lines(harness.tmp / "b.txt", 5)
    return proc, [proc.pid, *kids]


def counted(path: Path) -> list[tuple[int, int]]:
    """(n, pid) of every line of a child's log; every line must be one."""
    lines = read_lines(path)
    found = [(int(m[1]), int(m[2])) for line in lines if (m := LINE.fullmatch(line))]
    assert len(found) == len(lines) > 0, f"unexpected output: {lines[:3]}"
    return found


@contextlib.contextmanager
def reaping(left: set[int]) -> Iterator[None]:
    """Reap each pid of ``left`` (which the caller may add to) once it is our dead child:
    the members a migration kills are reparented to us (a child subreaper), and would
    hold their pids as zombies."""
    stop = threading.Event()

    def loop() -> None:
        while left and not stop.is_set():
            for pid in sorted(left):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        left.discard(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def serve_in_b(harness: Harness, hosts: Hosts, port: int) -> tuple[str, Path, int]:
    """A page server in host B: (its HOST:PORT, the token file, its pid)."""
    _, b, b_addr = hosts
    token = harness.tmp / "token"
    token.write_text("a-tree\n")
    server = page_server_in(harness, b, f"{b_addr}:{port}", harness.tmp, token)
    return f"{b_addr}:{port}", token, server.pid


def logged_pid(name: str, harness: Harness) -> int:
    return counted(harness.tmp / name)[0][1]


def assert_moved(harness: Harness, hosts: Hosts, root: int,
                 before: dict[int, tuple[int, int, int, int, int]]) -> None:
    """Every member of ``before`` runs in host B with its pid, ppid, pgid and sid (the
    root's ppid aside), as another process (the source's is gone), untraced."""
    after = {pid: read_ids(pid) for pid in before}
    assert {p: ids[:4] for p, ids in after.items() if p != root} == \
        {p: ids[:4] for p, ids in before.items() if p != root}
    assert after[root][2:4] == before[root][2:4]
    assert all(after[p][4] != before[p][4] for p in before), "the source's own processes"
    assert children(root) == sorted(p for p in before if p != root)
    b_net = os.stat(f"/run/netns/{hosts[1]}").st_ino
    for pid in before:
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == b_net, pid
        assert_running_untraced(pid)


def assert_counting_on(harness: Harness, *logs: str) -> None:
    """Each log goes on, by one process, from 1 without a gap or a repeat."""
    for log in logs:
        wait_for_lines(harness.tmp / log, len(read_lines(harness.tmp / log)) + 20)
        seq = counted(harness.tmp / log)
        assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), f"{log}: a gap or a repeat"
        assert len({p for _, p in seq}) == 1, log


def assert_back_here(harness: Harness, root: int,
                     before: dict[int, tuple[int, int, int, int, int]]) -> None:
    """The tree of ``before`` restored on this host: same ppid, pgid and sid (the root's
    ppid aside), running untraced, counting on; then killed."""
    after = {pid: read_ids(pid) for pid in before}
    assert {p: ids[1:4] for p, ids in after.items() if p != root} == \
        {p: ids[1:4] for p, ids in before.items() if p != root}
    for pid in before:
        assert_running_untraced(pid)
    assert_counting_on(harness, "a.txt", "b.txt")
    kill_tree(list(before))


def kill_tree(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_tree_with_a_pipe_migrates(harness: Harness, two_hosts: Hosts) -> None:  # noqa: F811
    """A parent in wait4, two children counting through a pipe, a sleeping one."""
    address, token, server = serve_in_b(harness, two_hosts, 27078)
    proc, members = launch_tree(harness, two_hosts)
    before = {pid: read_ids(pid) for pid in members}
    with reaping(set(members[1:])):
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address,
                       "--auth-token-file", token, reap=proc, prefix=in_a(two_hosts))
    assert_ckpt_ok(res)
    assert f"as pid {proc.pid}:" in res.stdout, res.stdout
    assert re.search(r"round 1: \d+ dirty pages", res.stdout), res.stdout
    assert_moved(harness, two_hosts, proc.pid, before)
    assert_counting_on(harness, "a.txt", "b.txt")
    assert {logged_pid("a.txt", harness), logged_pid("b.txt", harness)} < set(members[1:])
    harness.kill(server)
    kill_tree(members)


def test_members_change_between_rounds(harness: Harness, two_hosts: Hosts) -> None:  # noqa: F811
    """After round 1 the root forks a new counting child and one child exits: the new one
    is copied whole by a later pass and arrives counting on, the gone one is not
    restored."""
    address, token, server = serve_in_b(harness, two_hosts, 27080)
    proc, members = launch_tree(harness, two_hosts)
    d = (set(members[1:]) - {logged_pid("a.txt", harness), logged_pid("b.txt", harness)}).pop()
    log = harness.tmp / "migrate.txt"
    pending = set(members[1:])
    with log.open("w") as out, reaping(pending):
        migrate = subprocess.Popen(
            [*in_a(two_hosts), ckpt_command(), "migrate", "-t", str(proc.pid), "--to",
             address, "--auth-token-file", str(token), "--max-rounds", "4"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "CKPT_TEST_PAUSE_AT": "round-sent#1"})
        try:
            wait_for(lambda: proc_state(migrate.pid) == "T" or None, 60, "round 1 sent")
            os.kill(proc.pid, signal.SIGUSR1)  # grow: a new member, "c"
            os.kill(proc.pid, signal.SIGUSR2)  # shrink: "d" exits, reaped by the root
            wait_for_lines(harness.tmp / "c.txt", 5)
            wait_for(lambda: not Path(f"/proc/{d}").exists() or None, 10, "d reaped")
            c = logged_pid("c.txt", harness)
            harness.track(c)
            pending.add(c)
            before = {pid: read_ids(pid) for pid in [*members, c] if pid != d}
            os.kill(migrate.pid, signal.SIGCONT)
            wait_for(lambda: (proc.poll() is not None and migrate.poll() is not None) or None,
                     120, "the migration")  # reaps the root as its shell would
            assert migrate.returncode == 0, log.read_text()
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait()
    text = log.read_text()
    assert "round 2" in text and f"as pid {proc.pid}:" in text, text
    assert_moved(harness, two_hosts, proc.pid, before)
    assert d not in children(proc.pid)
    assert_counting_on(harness, "a.txt", "b.txt", "c.txt")
    harness.kill(server)
    kill_tree(list(before))


def is_stopped(pid: int) -> bool | None:
    return proc_state(pid) == "T" or None


def proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2:].split()[0]


def test_member_with_an_external_pipe_is_refused(harness: Harness,
                                                 two_hosts: Hosts) -> None:  # noqa: F811
    """A member holding a pipe to a process outside the tree: refused before any round,
    naming that member; the whole tree runs on untouched."""
    _, b, b_addr = two_hosts
    token = harness.tmp / "token"
    token.write_text("a-tree\n")
    server = page_server_in(harness, b, f"{b_addr}:27079", harness.tmp, token)
    r, w = os.pipe()
    try:
        proc, members = launch_tree(harness, two_hosts, r)
    finally:
        os.close(r)
    try:
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", f"{b_addr}:27079",
                       "--auth-token-file", token, prefix=in_a(two_hosts))
        message = assert_one_error_line(res)
        assert "pipe" in message and str(members[3]) in message, message
        assert not (harness.tmp / "dest").exists() or not any((harness.tmp / "dest").iterdir())
        for pid in members:
            assert_running_untraced(pid)
        lines = len(read_lines(harness.tmp / "b.txt"))
        wait_for_lines(harness.tmp / "b.txt", lines + 5)
    finally:
        os.close(w)
    harness.kill(server.pid)


def test_tree_restored_before_the_commit_waits_stopped(harness: Harness,
                                                       tmp_path: Path) -> None:
    """A destination where the tree's pids are free (another host; here: the tree dumped
    and reaped first) restores it at once, every member stopped, and the commit resumes
    every member."""
    port = start_server(tmp_path / "dest")
    proc, members = launch_tree(harness, None)
    before = {pid: read_ids(pid) for pid in members}
    images = harness.images()
    pending = set(members[1:])
    with reaping(pending):
        harness.dump_and_reap(proc, images)
        wait_for(lambda: not pending or None, 10, "the dumped tree reaped")
    with connect("127.0.0.1", port, b"migrate-me") as conn:
        send_pass_on(conn, images, "final")
        done = restore_remote(conn, "final")
        for pid in members:
            harness.track(pid)
        assert done.pid == proc.pid and not done.warm
        assert {proc_state(pid) for pid in members} == {"T"}  # until the commit
        commit_remote(conn)
    assert_back_here(harness, proc.pid, before)


def test_tree_comes_back_when_the_destination_cannot_restore_it(
        harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination fails to restore the tree after the source killed it (one kernel:
    restored only then): the source restores it again from its images, says so in one
    line, and the tree counts on without a gap."""
    from ckpt.transfer.tree import restore_tree_here as real

    def failing(path: str, entries: Any, stopped: bool) -> Any:
        if not stopped:  # the restore after the source's kill
            raise RestoreError("simulated restore failure on the destination")
        return real(path, entries, stopped)

    monkeypatch.setattr("ckpt.transfer.prerestore.restore_tree_here", failing)
    port = start_server(tmp_path / "dest")
    token = tmp_path / "token"
    token.write_text("migrate-me\n")
    proc, members = launch_tree(harness, None)
    before = {pid: read_ids(pid) for pid in members}
    with reaping(set(members[1:])):
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", f"127.0.0.1:{port}",
                       "--auth-token-file", token, reap=proc)
    for pid in members:
        harness.track(pid)
    message = assert_one_error_line(res)
    assert "simulated restore failure" in message and \
        f"runs here again as pid {proc.pid}" in message, message
    assert_back_here(harness, proc.pid, before)


def test_throttle_stops_every_member(harness: Harness) -> None:
    """--auto-converge's throttle stops each member of a tree, and ends with all of them
    running, but a member its user had stopped: that one stays stopped."""
    proc, members = launch_tree(harness, None)
    a, b = logged_pid("a.txt", harness), logged_pid("b.txt", harness)
    d = (set(members[1:]) - {a, b}).pop()
    os.kill(d, signal.SIGSTOP)
    wait_for(lambda: proc_state(d) == "T" or None, 10, "d stopped")
    with Throttle(members, 0.6) as throttle:
        for pid in (proc.pid, a, b):
            wait_for(partial(is_stopped, pid), 10, f"{pid} throttled")
    assert throttle.duty == 0.6 and d not in throttle.pids
    assert proc_state(d) == "T"
    os.kill(d, signal.SIGCONT)
    for pid in members:
        assert_running_untraced(pid)
    assert_counting_on(harness, "a.txt", "b.txt")
    kill_tree(members)


def curl_in(ns: str, port: int) -> str:
    """GET http://127.0.0.1:PORT/ in network namespace ``ns`` ('' if it fails)."""
    done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "5",
                           f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def test_nginx_migrates_serves_and_reloads(harness: Harness,
                                           two_hosts: Hosts) -> None:  # noqa: F811
    """nginx (a master and two workers sharing a listener, socketpairs, shared memory)
    moved to host B: it serves there, and its master still replaces its workers on
    SIGHUP."""
    require("nginx")
    a, b, _ = two_hosts
    address, token, server = serve_in_b(harness, two_hosts, 27081)
    port = 28080
    proc = harness.launch([*in_a(two_hosts), *py_target("tree_nginx.py"),
                           harness.tmp / "nginx", str(port)], harness.tmp / "nginx.out")
    wait_for(lambda: curl_in(a, port) == PAGE or None, 15, "nginx serving in A")
    tree = wait_for_tree(harness, proc.pid, 3)
    before = tree_ids(proc.pid)
    with reaping({m.pid for m in tree[1:]}):
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address,
                       "--auth-token-file", token, reap=proc, prefix=in_a(two_hosts))
    assert_ckpt_ok(res)
    assert tree_ids(proc.pid) == before
    for _ in range(5):
        assert curl_in(b, port) == PAGE
    assert curl_in(a, port) == ""
    old = {m.pid for m in tree_members(proc.pid)[1:]}
    os.kill(proc.pid, signal.SIGHUP)

    def replaced() -> set[int] | None:
        now = {m.pid for m in tree_members(proc.pid)[1:]}
        for pid in now:
            harness.track(pid)
        return now if len(now) == 2 and not now & old else None

    wait_for(replaced, 20, "the master to replace its workers")
    for _ in range(5):
        assert curl_in(b, port) == PAGE
    harness.kill(server)
    kill_tree([*sorted(replaced() or ()), proc.pid])


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """fn() on a thread of ours moved into network namespace ``ns`` (sockets it makes
    are that namespace's)."""
    out: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if LIBC.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns}")
        finally:
            os.close(fd)
        try:
            out.append(fn())
        except BaseException as exc:  # raised on the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return out[0]


def test_redis_bgsave_child_migrates(harness: Harness, two_hosts: Hosts) -> None:  # noqa: F811
    """redis-server migrated mid-BGSAVE (its child writing the RDB slowly): in host B the
    child finishes the RDB, the parent reaps it and logs success, and B's redis serves
    every key."""
    exe = require("redis-server")
    a, b, _ = two_hosts
    address, token, server = serve_in_b(harness, two_hosts, 27082)
    port = 26390
    proc = harness.launch([*in_a(two_hosts), exe, "--port", str(port), "--bind",
                           "127.0.0.1 ::1", "--save", "", "--appendonly", "no", "--dir",
                           str(harness.tmp), "--protected-mode", "no", "--daemonize", "no"],
                          harness.tmp / "redis.out")
    wait_for(lambda: redis_up(a, port), 15, "redis answering PING in A")
    in_netns(a, lambda: fill_redis(port))
    assert in_netns(a, lambda: redis("127.0.0.1", port, [
        ("CONFIG", "SET", "rdb-key-save-delay", "20000"), ("BGSAVE",)])) == \
        ["+OK", "+Background saving started"]
    tree = wait_for_tree(harness, proc.pid, 2)  # the BGSAVE child
    before = tree_ids(proc.pid)
    with reaping({m.pid for m in tree[1:]}):
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file",
                       token, "--tcp-close", reap=proc, prefix=in_a(two_hosts))
    assert_ckpt_ok(res)
    assert tree_ids(proc.pid) == before
    log = harness.tmp / "redis.out"
    assert REDIS_SUCCESS not in "\n".join(read_lines(log))
    wait_for(lambda: any(REDIS_SUCCESS in line for line in read_lines(log)) or None, 60,
             "redis to log the BGSAVE's success")
    wait_for_tree(harness, proc.pid, 1)  # the child reaped
    assert (harness.tmp / "dump.rdb").stat().st_size > KEYS * 10
    in_netns(b, lambda: check_redis(port))
    harness.kill(server)
    kill_tree([proc.pid])


def redis_up(ns: str, port: int) -> bool | None:
    try:
        return in_netns(ns, lambda: redis("127.0.0.1", port, [("PING",)])) == ["+PONG"] or None
    except OSError:
        return None
