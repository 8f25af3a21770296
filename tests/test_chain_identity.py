"""A parent chain is the chain it was dumped against: every pass has an identity, a child
records its parent's, and restore refuses a parent directory that now holds another pass
(rewritten with --overwrite, replaced by a symlink). A complete pass is not replaced
without --overwrite, and a failed pass leaves no directory it created behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    CKPT_TIMEOUT,
    PYTHON,
    Bins,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    check_counter_file,
    is_alive,
    needs_root,
    run_ckpt,
    wait_for_lines,
)
from test_cli_errors import TRACER
from test_incremental import Scenarios, ckpt_ok, final_dump, predump, restore, scenarios

from ckpt.errors import ImageError, RestoreError
from ckpt.images import ImageDir
from ckpt.images.chain import check_chain, parent_mismatch
from ckpt.images.pb.core_pb2 import ProcessEntry
from ckpt.images.pb.image_pb2 import Inventory
from ckpt.restore.warm import WarmRestore

OLD, NEW = "a" * 32, "b" * 32


def test_parent_mismatch_rule() -> None:
    assert parent_mismatch("c/3", OLD, "c/2", OLD) == ""
    why = parent_mismatch("c/3", OLD, "c/2", NEW)
    assert why.startswith("broken parent chain: c/2 is not the pass c/3 was dumped against")
    assert "aaaaaaaaaaaa" in why and "bbbbbbbbbbbb" in why
    assert "without identity" in parent_mismatch("c/3", OLD, "c/2", "")
    assert "records no identity of its parent c/2" in parent_mismatch("c/3", "", "c/2", NEW)


def write_pass(path: Path, image_id: str, parent: str = "", parent_id: str = "") -> ImageDir:
    d = ImageDir.create(path)
    d.write_inventory(Inventory(root_pid=7, pids=[7], kind="predump", tracker="none",
                                image_id=image_id, parent=parent, parent_id=parent_id))
    return d


def test_chain_with_a_replaced_parent_is_refused(tmp_path: Path) -> None:
    write_pass(tmp_path / "1", "1" * 32)
    write_pass(tmp_path / "2", NEW, "../1", "1" * 32)  # rewritten after 3 was dumped
    top = write_pass(tmp_path / "3", "3" * 32, "../2", OLD)
    with pytest.raises(ImageError, match=rf"{tmp_path}/2 is not the pass {tmp_path}/3 was"):
        check_chain(top, 7)


def test_a_complete_pass_is_replaced_only_when_asked(tmp_path: Path) -> None:
    write_pass(tmp_path / "1", OLD)
    with pytest.raises(ImageError, match=r"1 already holds a complete checkpoint.*--overwrite"):
        ImageDir.new_pass(tmp_path / "1")
    assert ImageDir.open(tmp_path / "1").read_inventory().image_id == OLD
    d = ImageDir.new_pass(tmp_path / "1", overwrite=True)
    assert d.read_inventory().image_id == OLD  # complete until the new pass commits
    d.abandon()
    (tmp_path / "2").mkdir()
    ImageDir.new_pass(tmp_path / "2")  # an incomplete pass may be written again


def test_overwrite_keeps_the_old_pass_until_the_new_one_commits(tmp_path: Path) -> None:
    """--overwrite stages the new pass beside the old one: a failed pass leaves the old
    one whole; a committed one replaces it, leaving none of its files behind."""
    old = write_pass(tmp_path / "1", OLD)
    old.write_core(7, ProcessEntry(pid=7))
    before = {n: (old.path / n).read_bytes() for n in os.listdir(old.path)}
    d = ImageDir.new_pass(old.path, overwrite=True)
    d.write_core(7, ProcessEntry(pid=7, umask=0o22))
    d.write_core(9, ProcessEntry(pid=9))
    assert d.read_inventory().image_id == OLD
    assert (old.path / "core-7.img").read_bytes() == before["core-7.img"]
    d.abandon()  # e.g. the target was refused in the freeze
    assert {n: (old.path / n).read_bytes() for n in os.listdir(old.path)} == before
    d = ImageDir.new_pass(old.path, overwrite=True)
    d.write_core(9, ProcessEntry(pid=9))
    d.write_inventory(Inventory(root_pid=9, pids=[9], kind="predump", tracker="none",
                                image_id=NEW))
    d.abandon()  # a failure after the commit: the new pass stays
    assert sorted(os.listdir(old.path)) == ["core-9.img", "inventory.img"]
    assert ImageDir.open(old.path).read_inventory().image_id == NEW


def test_leftovers_of_a_crashed_pass_are_not_committed(tmp_path: Path) -> None:
    write_pass(tmp_path / "1", OLD)
    (tmp_path / "1" / ".core-5.img.new").write_bytes(b"from a pass that crashed")
    d = ImageDir.new_pass(tmp_path / "1", overwrite=True)
    d.write_inventory(Inventory(root_pid=7, pids=[7], kind="predump", tracker="none",
                                image_id=NEW))
    assert os.listdir(tmp_path / "1") == ["inventory.img"]


def test_failed_pass_removes_what_it_created(tmp_path: Path) -> None:
    d = ImageDir.new_pass(tmp_path / "a" / "b")
    d.write_core(7, ProcessEntry(pid=7))
    d.abandon()
    assert os.listdir(tmp_path) == []
    kept = ImageDir.new_pass(tmp_path / "mine")  # now there before the next pass
    ImageDir.new_pass(kept.path).abandon()
    assert os.listdir(tmp_path) == ["mine"]


def two_predumps(harness: Harness, bins: Bins, tmp_path: Path) -> tuple[Scenarios, Path]:
    """A scenarios target with ck/1 and ck/2 (against ck/1) predumped, one phase apart."""
    t = scenarios(harness, bins, tmp_path)
    ck = tmp_path / "ck"
    predump(t.pid, ck / "1")
    t.advance()
    predump(t.pid, ck / "2", "--prev-images-dir", "../1")
    t.advance()
    return t, ck


@needs_root
def test_predump_into_a_parent_again(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """c/3 was dumped against c/2. predump -D c/2 again is refused; with --overwrite it
    replaces c/2, and restore of c/3 is then refused naming both directories (it used
    to return 0 with the process's memory corrupted)."""
    t, ck = two_predumps(harness, bins, tmp_path)
    ckpt_ok("dump", "-t", str(t.pid), "-D", ck / "3", "--prev-images-dir", "../2",
            "--leave-running")
    t.advance()
    again = ("predump", "-t", str(t.pid), "-D", ck / "2", "--prev-images-dir", "../1")
    line = assert_one_error_line(run_ckpt(*again))
    assert f"{ck / '2'} already holds a complete checkpoint" in line, line
    assert "--overwrite" in line, line
    assert_running_untraced(t.pid)
    predump(t.pid, ck / "2", "--prev-images-dir", "../1", "--overwrite")
    harness.kill(t.pid)
    line = assert_one_error_line(run_ckpt("restore", "-D", ck / "3", "--restore-detached"))
    assert f"{ck / '2'} is not the pass {ck / '3'} was dumped against" in line, line


@needs_root
def test_warm_restore_follows_only_the_parent(harness: Harness, bins: Bins, tmp_path: Path,
                                              ) -> None:
    """A migration's destination builds the process pass by pass: a stub that applied
    1 and a rewritten 2 must not take 3 (dumped against the old 2) as its next step."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)
    ck = tmp_path / "ck"
    ckpt_ok("predump", "-t", str(proc.pid), "-D", ck / "1")
    ckpt_ok("predump", "-t", str(proc.pid), "-D", ck / "2", "--prev-images-dir", "../1")
    ckpt_ok("dump", "-t", str(proc.pid), "-D", ck / "3", "--prev-images-dir", "../2",
            "--leave-running")
    ckpt_ok("predump", "-t", str(proc.pid), "-D", ck / "2", "--prev-images-dir", "../1",
            "--overwrite")
    harness.kill(proc.pid)
    warm = subprocess.run([PYTHON, Path(__file__).with_name("warm_restore.py"), ck / "1",
                           ck / "2", ck / "3"], capture_output=True, text=True,
                          timeout=CKPT_TIMEOUT)
    if warm.stdout.strip().isdigit():
        harness.track(int(warm.stdout))
    assert warm.returncode != 0 and "is not the pass" in warm.stderr, warm.stderr


@needs_root
def test_warm_restore_completes_only_the_pass_it_applied(harness: Harness, bins: Bins,
                                                         tmp_path: Path) -> None:
    """The final dump's directory rewritten (--overwrite) after it was applied: complete()
    refuses it (the same path is not the same pass) and kills the stub, instead of
    building a process from one pass's memory and another's registers."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)
    final = tmp_path / "final"
    ckpt_ok("dump", "-t", str(proc.pid), "-D", final, "--leave-running")
    harness.kill(proc.pid)
    warm = WarmRestore()
    warm.apply(final)
    assert warm.stub is not None
    stub = warm.stub.pid
    harness.track(stub)
    write_pass(final, NEW)  # another pass in the same directory
    with pytest.raises(RestoreError, match="was not applied to the warm restore"):
        warm.complete(final)
    assert warm.stub is None and not is_alive(stub)


def test_a_killed_warm_restore_forgets_what_it_applied() -> None:
    warm = WarmRestore()
    warm.applied, warm.applied_id = "/ck/2", OLD
    warm.kill()
    assert (warm.applied, warm.applied_id) == ("", "")


@needs_root
def test_parent_replaced_by_a_symlink(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """c/2 replaced by a symlink to c/1: restore of c/3 is refused naming both; put
    back, the chain restores and the process verifies its memory."""
    t, ck = two_predumps(harness, bins, tmp_path)
    final_dump(t, ck / "3", "../2")
    (ck / "2").rename(ck / "2.real")
    (ck / "2").symlink_to("1")
    line = assert_one_error_line(run_ckpt("restore", "-D", ck / "3", "--restore-detached"))
    assert f"{ck / '2'} is not the pass {ck / '3'} was dumped against" in line, line
    (ck / "2").unlink()
    (ck / "2.real").rename(ck / "2")
    restore(harness, ck / "3", t.pid)
    t.assert_verifies()


@needs_root
def test_failed_dump_leaves_no_directory(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """A dump that fails after it created -D (here: the target is already traced)
    removes the directories it made; one that existed before stays."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)
    tracer = harness.launch([sys.executable, "-c", TRACER, str(proc.pid)], tmp_path / "t.txt")
    wait_for_lines(tmp_path / "t.txt", 1)
    new = tmp_path / "new" / "images"
    assert_one_error_line(run_ckpt("dump", "-t", str(proc.pid), "-D", new))
    assert not (tmp_path / "new").exists()
    existing = harness.images()
    assert_one_error_line(run_ckpt("dump", "-t", str(proc.pid), "-D", existing))
    assert existing.is_dir() and os.listdir(existing) == []
    harness.kill(tracer.pid)


@needs_root
def test_failed_overwrite_keeps_the_old_checkpoint(harness: Harness, bins: Bins,
                                                   tmp_path: Path) -> None:
    """dump --overwrite into a complete pass, and the target is refused (already traced):
    the old pass is untouched and still restores (it used to lose its inventory)."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 2)
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    before = {n: (images / n).read_bytes() for n in os.listdir(images)}
    tracer = harness.launch([sys.executable, "-c", TRACER, str(proc.pid)], tmp_path / "t.txt")
    wait_for_lines(tmp_path / "t.txt", 1)
    line = assert_one_error_line(run_ckpt("dump", "-t", str(proc.pid), "-D", images,
                                          "--overwrite"))
    assert "already traced" in line, line
    assert {n: (images / n).read_bytes() for n in os.listdir(images)} == before
    harness.kill(tracer.pid)
    harness.kill(proc.pid)
    pid = harness.restore_detached(images, "--skip-file-check")  # the source wrote on
    n = len(check_counter_file(out))
    wait_for_lines(out, n + 3)
    assert set(check_counter_file(out)) == {proc.pid, pid}
