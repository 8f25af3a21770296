"""A restored process is put back in its cgroups (ckpt/collect/cgroups.py); one that is
gone stops the restore; a thread in another cgroup than its process is refused."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import pytest
from conftest import Asker, Harness, assert_one_error_line, run_ckpt

from ckpt.collect.cgroups import (
    Membership,
    cgroup_dir,
    parse_cgroup_mounts,
    parse_proc_cgroup,
    thread_refusals,
)
from ckpt.images.checks import clean_path
from ckpt.restore.stub import colocation_cpu

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 /sub /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_where_each_cgroup_is() -> None:
    found = parse_proc_cgroup("2:cpu,cpuacct:/app\n1:name=systemd:/\n0::/sub/web\n")
    assert found == [Membership(2, "cpu,cpuacct", "/app"), Membership(1, "name=systemd", "/"),
                     Membership(0, "", "/sub/web")]
    mounts = parse_cgroup_mounts(MOUNTINFO)
    assert [cgroup_dir(m, mounts) for m in found] == [
        "/sys/fs/cgroup/cpu,cpuacct/app", "/sys/fs/cgroup/systemd/",
        "/sys/fs/cgroup/unified/web"]
    assert cgroup_dir(Membership(0, "", "/other"), mounts) is None  # not under /sub
    assert cgroup_dir(Membership(3, "memory", "/"), mounts) is None
    assert clean_path("/a/b") is None
    assert all(clean_path(p) for p in ("/a/../b", "a", "/a/./b", "/a/", "/a\0b", "//a"))


def own_cgroup(pid: int, controllers: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(m.path for m in parse_proc_cgroup(f.read()) if m.controllers == controllers)


@pytest.mark.parametrize("gone", [False, True], ids=["kept", "gone"])
def test_restored_into_its_cgroup(harness: Harness, gone: bool) -> None:
    base = Path("/sys/fs/cgroup/pids")
    if not (base / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy mounted at /sys/fs/cgroup/pids")
    mine = own_cgroup(os.getpid(), "pids")
    name = f"ckpt-test-{secrets.token_hex(4)}"
    where = base / mine.lstrip("/") / name
    where.mkdir()
    try:
        target = Asker(harness, "fd_eventfd.py")
        (where / "cgroup.procs").write_text(str(target.proc.pid))
        want = f"{mine.rstrip('/')}/{name}"
        assert own_cgroup(target.proc.pid, "pids") == want
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        if gone:  # made again empty, it would lack its limits: the user makes it
            where.rmdir()
            res = run_ckpt("restore", "-D", images, "--restore-detached")
            line = assert_one_error_line(res)
            assert f"cgroup pids:{want} of the dumped process does not exist here" in line
            assert not where.exists()
            where.mkdir()
        pid = harness.restore_detached(images)
        assert own_cgroup(pid, "pids") == want
        assert {own_cgroup(int(t), "pids") for t in os.listdir(f"/proc/{pid}/task")} == {want}
        assert target.ask() == {"plain": 5, "sem": 1, "empty": "EAGAIN"}
        harness.kill(pid)
    finally:
        harness.cleanup()
        with contextlib.suppress(FileNotFoundError):
            where.rmdir()


def test_restored_into_a_cpuset_without_our_cpu(harness: Harness) -> None:
    """The cpuset the stub joins excludes the CPU ckpt runs on: ckpt does not pin the
    stub there (EINVAL), and the process gets the cpuset's CPUs."""
    base = Path("/sys/fs/cgroup/cpuset")
    if not (base / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 cpuset hierarchy mounted at /sys/fs/cgroup/cpuset")
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    parent = base / own_cgroup(os.getpid(), "cpuset").lstrip("/")
    where = parent / f"ckpt-test-{secrets.token_hex(4)}"
    where.mkdir()
    mine = os.sched_getaffinity(0)
    try:
        (where / "cpuset.mems").write_text((parent / "cpuset.mems").read_text())
        (where / "cpuset.cpus").write_text("1")
        target = Asker(harness, "fd_eventfd.py")
        (where / "cgroup.procs").write_text(str(target.proc.pid))
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        os.sched_setaffinity(0, {0})  # ckpt (our child) runs on CPU 0 only
        try:
            pid = harness.restore_detached(images)
        finally:
            os.sched_setaffinity(0, mine)
        assert os.sched_getaffinity(pid) == {1}
        assert target.ask() == {"plain": 5, "sem": 1, "empty": "EAGAIN"}
        harness.kill(pid)
    finally:
        harness.cleanup()
        with contextlib.suppress(OSError):
            where.rmdir()


def test_thread_in_another_cgroup_is_refused(harness: Harness) -> None:
    base = Path("/sys/fs/cgroup/pids")
    if not (base / "tasks").exists():
        pytest.skip("no cgroup v1 pids hierarchy mounted at /sys/fs/cgroup/pids")
    mine = own_cgroup(os.getpid(), "pids")
    where = base / mine.lstrip("/") / f"ckpt-test-{secrets.token_hex(4)}"
    where.mkdir()
    target = Asker(harness, "task_attrs.py")
    try:
        tid = max(int(t) for t in os.listdir(f"/proc/{target.proc.pid}/task"))
        (where / "tasks").write_text(str(tid))
        res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images())
        line = assert_one_error_line(res)
        assert f"thread {tid} of process {target.proc.pid} is in cgroup pids:" in line
        assert target.ask()  # runs on
    finally:
        harness.cleanup()
        with contextlib.suppress(OSError):
            where.rmdir()


def test_thread_refusals_pure() -> None:
    lead = [Membership(1, "cpu", "/"), Membership(0, "", "/")]
    assert thread_refusals(5, [(5, lead), (6, lead)]) == []
    assert thread_refusals(5, [(5, lead), (6, [Membership(1, "cpu", "/rt"), lead[1]])]) == [
        "thread 6 of process 5 is in cgroup cpu:/rt, not its process's: not supported yet"]


def test_colocation_cpu_pure() -> None:
    assert colocation_cpu(1, {0, 1}, {0, 1}) == 1
    assert colocation_cpu(0, {0, 1}, {1, 3}) == 1  # ours excluded: one both may use
    assert colocation_cpu(0, {0}, {1}) is None  # none: no colocation
