"""The acceptance trees moved by `ckpt migrate` between the two network-namespace hosts
of tests/test_migrate.py (a veth pair; the page server runs in host B): each tree goes on
in B with every member's pid, parent, group and session, and does there what it does
after a plain restore (tests/test_tree_pipeline.py, test_tree_mp.py, test_tree_zombies.py,
test_tree_sessions.py)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    needs_root,
    py_target,
    reaping,
    run_ckpt,
    track_tree,
    tree_ids,
    wait_for_line,
    wait_for_lines,
    wait_for_tree,
)
from test_migrate import page_server_in, two_hosts  # noqa: F401 (a fixture)
from test_tree_mp import finish_mp, launch_mp
from test_tree_pipeline import check_output, start_pipeline
from test_tree_sessions import assert_ticking_on
from test_tree_zombies import launch_zombies

pytestmark = needs_root
Hosts = tuple[str, str, str]


def in_a(hosts: Hosts) -> tuple[str, ...]:
    return ("ip", "netns", "exec", hosts[0])


def migrate_tree(harness: Harness, proc: subprocess.Popen[bytes], hosts: Hosts) -> int:
    """`ckpt migrate` of proc's tree from host A to B; assert every member came back in B
    with its ids; return the root's pid."""
    _, b, b_addr = hosts
    token = harness.tmp / "token"
    token.write_text("a-tree\n")
    page_server_in(harness, b, f"{b_addr}:27077", harness.tmp, token)
    members = [m.pid for m in track_tree(harness, proc.pid)]
    before = tree_ids(proc.pid)
    with reaping([pid for pid in members if pid != proc.pid]):
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", f"{b_addr}:27077",
                       "--auth-token-file", token, reap=proc, prefix=in_a(hosts))
    assert_ckpt_ok(res)
    found = re.search(r"as pid (\d+)", res.stdout)
    assert found, res.describe()
    root = int(found[1])
    moved = track_tree(harness, root)
    assert tree_ids(root) == before
    b_net = os.stat(f"/run/netns/{b}").st_ino
    for member in moved:
        if member.state != "Z":
            assert os.stat(f"/proc/{member.pid}/ns/net").st_ino == b_net, member
    return root


def test_pipeline_migrates(harness: Harness, two_hosts: Hosts) -> None:  # noqa: F811
    proc, out = start_pipeline(harness, in_a(two_hosts))
    migrate_tree(harness, proc, two_hosts)
    at_move = check_output(out)
    wait_for_lines(out, at_move + 500, timeout=30)
    assert check_output(out) >= at_move + 500


def test_pool_migrates(harness: Harness, two_hosts: Hosts,  # noqa: F811
                       request: pytest.FixtureRequest) -> None:
    proc, out, go = launch_mp(harness, request, in_a(two_hosts))
    before = tree_ids(proc.pid)
    root = migrate_tree(harness, proc, two_hosts)
    finish_mp(harness, root, before, out, go)


def test_zombies_migrate(harness: Harness, two_hosts: Hosts) -> None:  # noqa: F811
    zombies = launch_zombies(harness, in_a(two_hosts))
    root = migrate_tree(harness, zombies.proc, two_hosts)
    zombies.assert_zombies_of(root)
    zombies.assert_reaped()


def test_sessions_migrate(harness: Harness, two_hosts: Hosts) -> None:  # noqa: F811
    out = harness.tmp / "out.txt"
    proc = harness.launch([*in_a(two_hosts), *py_target("tree_sessions.py")], out)
    wait_for_line(out, lambda s: s == "ready", 30, "ready")
    wait_for_tree(harness, proc.pid, 4)
    migrate_tree(harness, proc, two_hosts)
    assert_ticking_on(out, ("root", "peer", "leader", "grandchild"))
