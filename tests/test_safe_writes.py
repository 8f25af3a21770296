"""Image writes never follow a link someone planted, never write into a directory others
control, and create the directories of -D 0700 (ckpt/images/safedir.py, shared by local
passes and the page server)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import (
    Bins,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    read_lines,
    run_ckpt,
    wait_for_lines,
)
from test_transfer import HOST, TOKEN, Server

from ckpt.errors import ImageError
from ckpt.images import ImageDir
from ckpt.images.pb.core_pb2 import Creds, ProcessEntry, ThreadCore
from ckpt.images.pb.image_pb2 import Inventory
from ckpt.images.safedir import unsafe_dir
from ckpt.transfer import send_pass

NOBODY = 65534
PRECIOUS = "precious root-owned data\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def victim_file(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text(PRECIOUS)
    os.chmod(victim, 0o644)
    return victim


def assert_intact(victim: Path) -> None:
    assert victim.read_text() == PRECIOUS
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_unsafe_dir_rule() -> None:
    d = stat.S_IFDIR
    assert unsafe_dir("/x", 0, d | 0o700, 0) == ""
    assert unsafe_dir("/x", 0, d | 0o755, 0) == ""
    assert unsafe_dir("/x", 1000, d | 0o755, 1000) == ""
    assert "belongs to uid 65534, not to you (uid 0)" in unsafe_dir("/x", NOBODY, d | 0o700, 0)
    assert "writable by group (mode 0770)" in unsafe_dir("/x", 0, d | 0o770, 0)
    assert "writable by others (mode 1757)" in unsafe_dir("/x", 0, d | 0o1757, 0)
    assert "group and others" in unsafe_dir("/x", 0, d | 0o777, 0)
    assert "not a directory" in unsafe_dir("/x", 0, stat.S_IFREG | 0o600, 0)


def test_planted_temp_link_is_not_followed(tmp_path: Path) -> None:
    """A link at the temp name (a leftover, or planted) is replaced, never written
    through: the file it points to keeps its bytes and its mode."""
    victim = victim_file(tmp_path)
    d = ImageDir.create(tmp_path / "images")
    (d.path / ".inventory.img.tmp").symlink_to(victim)
    os.link(victim, d.path / ".core-1.img.tmp")  # a hard link: O_EXCL, not O_TRUNC
    d.write_inventory(Inventory(root_pid=1, pids=[1], kind="predump", tracker="none"))
    d.write_core(1, ProcessEntry(pid=1, threads=[ThreadCore(tid=1, creds=Creds(uid=1))]))
    assert_intact(victim)
    assert d.read_inventory().root_pid == 1 and d.read_core(1).pid == 1
    for name in ("inventory.img", "core-1.img"):
        assert stat.S_ISREG(os.lstat(d.path / name).st_mode)
        assert os.stat(d.path / name).st_ino != victim.stat().st_ino
    assert sorted(os.listdir(d.path)) == ["core-1.img", "inventory.img"]


def test_group_writable_dir_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    os.chmod(images, 0o775)
    with pytest.raises(ImageError, match=r"images .*images is writable by group \(mode 0775\)"):
        ImageDir.create(images)
    d = ImageDir(images)  # the check is made again by each write
    with pytest.raises(ImageError, match="writable by group"):
        d.write_inventory(Inventory(root_pid=1, kind="predump", tracker="none"))
    assert os.listdir(images) == []


def test_directories_are_0700_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = ImageDir.create(tmp_path / "a" / "b" / "c")
        d.write_inventory(Inventory(root_pid=1, kind="predump", tracker="none"))
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", d.path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    assert stat.S_IMODE(d.file("inventory").stat().st_mode) == 0o600


@needs_root
def test_dump_into_a_directory_of_another_user(harness: Harness, bins: Bins,
                                               tmp_path: Path) -> None:
    """As root, -D names a directory user 65534 owns, where it planted
    .inventory.img.tmp -> a root-owned file: one error line, the file keeps its bytes
    and mode, the target runs on untouched."""
    victim = victim_file(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    link = shared / ".inventory.img.tmp"
    link.symlink_to(victim)
    os.lchown(link, NOBODY, NOBODY)
    os.chown(shared, NOBODY, NOBODY)
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)

    for cmd in (("dump", "--leave-running"), ("predump",)):
        res = run_ckpt(*cmd, "-t", str(proc.pid), "-D", shared)
        line = assert_one_error_line(res)
        assert f"{shared} belongs to uid {NOBODY}" in line, line
        assert_intact(victim)
    assert proc.poll() is None
    assert_running_untraced(proc.pid)
    wait_for_lines(out, len(read_lines(out)) + 2)


@needs_root
def test_dump_into_a_group_writable_directory(harness: Harness, bins: Bins,
                                              tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    os.chmod(images, 0o770)
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)
    res = run_ckpt("dump", "-t", str(proc.pid), "-D", images)
    line = assert_one_error_line(res)
    assert "writable by group (mode 0770)" in line, line
    assert proc.poll() is None
    assert_running_untraced(proc.pid)


def test_page_server_replaces_a_planted_link(tmp_path: Path) -> None:
    """The page server writes through the same code: a link planted at a temp name of
    a pass directory is removed, not followed, and the pass is stored."""
    victim = victim_file(tmp_path)
    root = tmp_path / "server"
    (root / "1").mkdir(parents=True, mode=0o700)
    (root / "1" / ".core-7.img.tmp").symlink_to(victim)
    local = tmp_path / "local" / "1"
    local.mkdir(parents=True)
    (local / "core-7.img").write_bytes(b"core bytes")
    (local / "inventory.img").write_bytes(b"inventory bytes")
    server = Server(root)
    send_pass(HOST, server.port, TOKEN, local, "1")
    server.join()
    assert_intact(victim)
    assert (root / "1" / "core-7.img").read_bytes() == b"core bytes"
    assert sorted(os.listdir(root / "1")) == ["core-7.img", "inventory.img"]


def test_a_pass_writes_and_abandons_through_the_directory_it_checked(tmp_path: Path) -> None:
    """-D swapped for a link after the pass checked it (its parent writable by someone
    else): the failed pass removes its own files from the directory it checked, never
    what the link points to; a pass that goes on commits into that directory too."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victims = ["core-1.img", ".core-1.img.tmp", ".core-1.img.new", "inventory.img"]
    for name in victims:
        (elsewhere / name).write_text(PRECIOUS)
    for finish in ("abandon", "commit"):
        images = tmp_path / finish
        d = ImageDir.new_pass(images)
        d.write_core(1, ProcessEntry(pid=1, threads=[ThreadCore(tid=1)]))
        images.rename(tmp_path / f"{finish}.real")
        images.symlink_to(elsewhere)
        if finish == "abandon":
            d.abandon()
            assert os.listdir(tmp_path / "abandon.real") == []
        else:
            d.write_inventory(Inventory(root_pid=1, pids=[1], kind="predump", tracker="none"))
            assert sorted(os.listdir(tmp_path / "commit.real")) == ["core-1.img",
                                                                    "inventory.img"]
        assert sorted(os.listdir(elsewhere)) == sorted(victims), finish
        assert all((elsewhere / n).read_text() == PRECIOUS for n in victims), finish


def test_page_server_refuses_an_unsafe_root(tmp_path: Path) -> None:
    """Pass directories are made inside the server's -D: it must be safe itself."""
    root = tmp_path / "in"
    root.mkdir()
    os.chmod(root, 0o777)
    token = tmp_path / "token"
    token.write_text("t\n")
    res = run_ckpt("page-server", "--address", "127.0.0.1", "--port", "0", "-D", root,
                   "--auth-token-file", token, timeout=30)
    line = assert_one_error_line(res)
    assert "writable by group and others" in line, line
