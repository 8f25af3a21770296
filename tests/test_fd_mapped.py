"""Mapped memfds and deleted files come back mapped, one inode with their open files again
(ckpt/collect/mappedfiles.py; target examples/targets/fd_mapped.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Asker, Harness, assert_ckpt_ok, needs_root, run_ckpt


def mapped_target(harness: Harness, mode: str) -> Asker:
    where = harness.tmp / "w"
    where.mkdir(exist_ok=True)
    return Asker(harness, "fd_mapped.py", mode, str(where))


def ask(target: Asker) -> dict[str, Any]:
    answer = target.ask()
    assert isinstance(answer, dict)
    return answer


@needs_root
def test_mapped_memfds_survive(harness: Harness, tmp_path: Path) -> None:
    """A memfd mapped MAP_SHARED with its fd open is one inode again: a write through the
    fd shows in the mapping and the other way round; a memfd only mapped keeps its
    contents and size; one sealed F_SEAL_FUTURE_WRITE while mapped writable is sealed
    again (the mapping writes, write(2) fails), one sealed F_SEAL_WRITE refuses writes
    and writable mappings; each mapping has its permissions and VmFlags."""
    target = mapped_target(harness, "memfd")
    before = ask(target)
    assert before["fd_to_map"] and before["map_to_fd"] and before["same_inode"]
    assert before["future_write"] == before["sealed_write"] == "EPERM"
    assert before["sealed_map_write"] == "EPERM"
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    after = ask(target)
    assert after["fd_to_map"] and after["map_to_fd"] and after["same_inode"]
    assert after["future_reads"] == "future#2" and after["only"] == before["only"]
    same = ("both", "both_2", "only_size", "future_seals", "future_write", "sealed_seals",
            "sealed_write", "sealed_map_write", "sealed_reads", "regions")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}


def assert_deleted_restores(harness: Harness, target: Asker, before: dict[str, Any],
                            images: Path) -> None:
    harness.restore_detached(images)
    after = ask(target)
    n = f"#{target.asked}"
    assert after["shared_file"] == after["shared_map"] == "through the mapping" + n
    assert {k: after[k] for k in ("shared_head", "shared_nlink", "shared_mode",
                                  "private_map", "private_file", "deleted", "regions")} == \
        {k: before[k] for k in ("shared_head", "shared_nlink", "shared_mode", "private_map",
                                "private_file", "deleted", "regions")}


@needs_root
def test_mapped_deleted_files_survive(harness: Harness, tmp_path: Path) -> None:
    """A deleted file mapped MAP_SHARED (no fd left) comes back unlinked with its contents,
    mode and a shared mapping that writes through to it; one mapped MAP_PRIVATE keeps its
    copied-on-write page while the file under it, and its clean pages, hold the file's."""
    target = mapped_target(harness, "deleted")
    before = ask(target)
    assert before["private_map"] == ["copied on write", "file page 1....", "file page 2...."]
    assert before["private_file"][0] == "file page 0...."
    assert before["deleted"] == [True, True] and before["shared_nlink"] == 0
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    assert_deleted_restores(harness, target, before, images)


@needs_root
def test_mapped_files_predump_incremental(harness: Harness, tmp_path: Path) -> None:
    """predump, then dump --incremental on top of it, then restore: the mappings' files
    are those at the final dump (written in between), the private pages too."""
    target = mapped_target(harness, "deleted")
    ask(target)
    pre = harness.images("pre")
    assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", pre))
    before = ask(target)  # writes the shared file again after the predump
    for r in before["regions"]:  # the predump's tracker (uffd-wp), gone with the dump
        r["vmflags"] = [f for f in r["vmflags"] if f != "uw"]
    images = harness.images("final")
    harness.dump_and_reap(target.proc, images, "--incremental", "--prev-images-dir", str(pre))
    assert_deleted_restores(harness, target, before, images)


@needs_root
def test_mapped_files_of_an_unprivileged_process(harness: Harness, tmp_path: Path) -> None:
    """Memfds and deleted files are made afresh, not opened by path: a process that became
    uid 65534 gets them back (ckpt.restore.access has nothing to doubt), root's 0600
    deleted file included, since it had it mapped."""
    # uid 65534 looks for the control files in harness.tmp: let it through pytest's dirs
    dirs = [harness.tmp, *harness.tmp.parents][:4]
    modes = [d.stat().st_mode for d in dirs]
    try:
        for d, mode in zip(dirs, modes, strict=True):
            d.chmod(mode | 0o711)
        target = mapped_target(harness, "dropped")
        assert ask(target) == {"uid": 65534, "memfd": "#1", "file": "root's file"}
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        harness.restore_detached(images)
        assert ask(target) == {"uid": 65534, "memfd": "#2", "file": "root's file"}
    finally:
        for d, mode in zip(dirs, modes, strict=True):
            d.chmod(mode)
