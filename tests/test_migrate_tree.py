"""`ckpt migrate -t ROOT` of a process tree between the two network-namespace hosts of
tests/test_migrate.py: every member goes on in host B with its pid, parent, group and
session, the pipe between two members carries on without a gap, and nothing of the tree
is left in host A. What migrate refuses for one process it refuses for a member, naming
it, and the tree runs on untouched."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_lines,
)
from test_migrate import page_server_in, two_hosts  # noqa: F401 (a fixture)

pytestmark = needs_root
Hosts = tuple[str, str, str]
LINE = re.compile(r"n=(\d+) pid=(\d+)")

# A parent (waiting in wait4) with two children: "a" counts into a pipe and its own log,
# "b" reads the pipe and logs each number it gets. Given an fd (the read end of a pipe
# whose write end is the test's), only a third child keeps it: migrate must refuse that.
TREE = r'''
import os, sys, time
here = sys.argv[1]
ext = int(sys.argv[2]) if len(sys.argv) > 2 else -1
def drop_ext():
    if ext >= 0:
        os.close(ext)
def log_to(name):
    return os.open(os.path.join(here, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
r, w = os.pipe()
if os.fork() == 0:
    drop_ext()
    os.close(r)
    fd, n = log_to("a.txt"), 0
    while True:
        n += 1
        os.write(w, b"%d\n" % n)
        os.write(fd, b"n=%d pid=%d\n" % (n, os.getpid()))
        time.sleep(0.01)
if os.fork() == 0:
    drop_ext()
    os.close(w)
    fd, buf = log_to("b.txt"), b""
    while True:
        buf += os.read(r, 4096)
        *lines, buf = buf.split(b"\n")
        for line in lines:
            os.write(fd, b"n=%d pid=%d\n" % (int(line), os.getpid()))
os.close(r)
os.close(w)
if ext >= 0 and os.fork() == 0:
    while True:
        time.sleep(1)
drop_ext()
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


def launch_tree(harness: Harness, hosts: Hosts, *extra: str,
                pass_fds: Sequence[int] = ()) -> tuple[subprocess.Popen[bytes], list[int]]:
    script = harness.tmp / "tree.py"
    script.write_text(TREE)
    proc = harness.launch([*in_a(hosts), "python3", script, harness.tmp, *extra],
                          harness.tmp / "out.txt", pass_fds)
    size = 3 + len(extra)
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
def reaping(pids: Sequence[int]) -> Iterator[None]:
    """Reap each of pids once it is our dead child: the members a migration kills are
    reparented to us (a child subreaper), and would hold their pids as zombies."""
    left, stop = set(pids), threading.Event()

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


def test_tree_with_a_pipe_migrates(harness: Harness, two_hosts: Hosts) -> None:  # noqa: F811
    _, b, b_addr = two_hosts
    token = harness.tmp / "token"
    token.write_text("a-tree\n")
    server = page_server_in(harness, b, f"{b_addr}:27078", harness.tmp, token)
    proc, members = launch_tree(harness, two_hosts)
    before = {pid: read_ids(pid) for pid in members}
    with reaping(members[1:]):
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", f"{b_addr}:27078",
                       "--auth-token-file", token, reap=proc, prefix=in_a(two_hosts))
    assert_ckpt_ok(res)
    assert f"as pid {proc.pid}:" in res.stdout, res.stdout
    assert re.search(r"round 1: \d+ dirty pages", res.stdout), res.stdout
    after = {pid: read_ids(pid) for pid in members}
    # the same ids, but other processes: the source's tree is gone, these live in B
    assert {p: ids[:3] for p, ids in after.items() if p != proc.pid} == \
        {p: ids[:3] for p, ids in before.items() if p != proc.pid}
    assert after[proc.pid][2:4] == before[proc.pid][2:4]
    assert all(after[p][4] != before[p][4] for p in members)
    assert children(proc.pid) == members[1:]
    b_net = os.stat(f"/run/netns/{b}").st_ino
    for pid in members:
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == b_net, pid
    a_lines, b_lines = len(read_lines(harness.tmp / "a.txt")), len(read_lines(harness.tmp /
                                                                               "b.txt"))
    wait_for_lines(harness.tmp / "a.txt", a_lines + 20)
    wait_for_lines(harness.tmp / "b.txt", b_lines + 20)
    for pid in members:
        assert_running_untraced(pid)
    for log, pid in (("a.txt", members[1]), ("b.txt", members[2])):
        seq = counted(harness.tmp / log)
        assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), f"{log}: a gap or a repeat"
        assert {p for _, p in seq} == {pid}
    harness.kill(server.pid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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
        proc, members = launch_tree(harness, two_hosts, str(r), pass_fds=[r])
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
