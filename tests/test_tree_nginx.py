"""nginx (Debian's nginx-light, examples/targets/tree_nginx.py): a master and two
workers sharing one listening socket, with socketpairs between master and workers and
shared anonymous memory. After a restore it serves pages, and is still managed by its
master: SIGHUP makes the master start two new workers and retire the old ones (which it
reaps), and the new workers serve too."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request

import pytest
from conftest import (
    TREE_HOWS,
    Harness,
    dump_tree,
    kill_tree,
    needs_root,
    py_target,
    read_member,
    restore_tree,
    tree_ids,
    tree_members,
    wait_for,
    wait_for_tree,
)
from test_daemons import free_port, require

pytestmark = needs_root
PAGE = "hello from a restored nginx\n"


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
        body: bytes = reply.read()
    return body.decode()


def serving(port: int) -> bool | None:
    try:
        return get(port) == PAGE or None
    except OSError:
        return None


def start_nginx(harness: Harness, request: pytest.FixtureRequest
                ) -> tuple[subprocess.Popen[bytes], int]:
    require("nginx")
    port = free_port()
    where = harness.tmp / "nginx"
    proc = harness.launch([*py_target("tree_nginx.py"), where, str(port)],
                          harness.tmp / "nginx.out")
    request.addfinalizer(lambda: kill_tree(proc.pid))  # the master (restored or not) first
    wait_for(lambda: serving(port), 15, "nginx serving its page")
    wait_for_tree(harness, proc.pid, 3)
    return proc, port


def workers(master: int) -> set[int]:
    return {m.pid for m in tree_members(master)[1:]}


@pytest.mark.parametrize("how", TREE_HOWS)
def test_nginx_serves_and_reloads_after_restore(harness: Harness, how: str,
                                               request: pytest.FixtureRequest) -> None:
    proc, port = start_nginx(harness, request)
    for _ in range(10):
        assert get(port) == PAGE
    before = tree_ids(proc.pid)

    def between() -> None:
        for _ in range(10):
            assert get(port) == PAGE

    images = dump_tree(harness, proc, how, between)
    master = restore_tree(harness, images, before)
    serves_and_reloads(harness, master, port)


def test_nginx_reloads_without_a_checkpoint(harness: Harness,
                                           request: pytest.FixtureRequest) -> None:
    """The reference: what the restored nginx must do, done by one never dumped."""
    proc, port = start_nginx(harness, request)
    serves_and_reloads(harness, proc.pid, port)


def serves_and_reloads(harness: Harness, master: int, port: int) -> None:
    """nginx serves; on SIGHUP its master starts two new workers, the old ones exit and
    are reaped by it; the new ones serve."""
    for _ in range(10):
        assert get(port) == PAGE
    old = workers(master)
    os.kill(master, signal.SIGHUP)

    def replaced() -> set[int] | None:
        now = workers(master)
        for pid in now:
            harness.track(pid)
        return now if len(now) == 2 and not now & old else None

    wait_for(replaced, 20, "the master to replace its workers")
    wait_for(lambda: all(read_member(pid) is None for pid in old) or None, 20,
             "the old workers to exit and be reaped by the master")
    for _ in range(10):
        assert get(port) == PAGE
