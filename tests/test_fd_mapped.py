"""Mapped memfds and deleted files come back mapped, one inode with their open files again
(ckpt/collect/mappedfiles.py; target examples/targets/fd_mapped.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    run_ckpt,
)

from ckpt.collect.fdkinds.base import FdFlags
from ckpt.collect.fdkinds.memfd import Found
from ckpt.collect.mappedfiles import Made, Seen, is_mapped_object, refusal
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import problems


def vma(path: str, kind: VmaKind = VmaKind.FILE_SHARED) -> VmaInfo:
    return VmaInfo(start=0x10000, end=0x12000, prot=3, shared=kind == VmaKind.FILE_SHARED,
                   kind=kind, pgoff=0, path=path, dev=1, inode=7, vmflags=("rd", "sh"))


@pytest.mark.parametrize(("path", "kind", "mapped"), [
    ("/memfd:a (deleted)", VmaKind.FILE_SHARED, True),
    ("/tmp/x (deleted)", VmaKind.FILE_PRIVATE, True),
    ("/tmp/x", VmaKind.FILE_PRIVATE, False),
    ("/dev/zero (deleted)", VmaKind.ANON_SHARED, False),  # shared anonymous memory
    ("/SYSV00000000 (deleted)", VmaKind.SYSV_SHM, False),
    ("/[aio] (deleted)", VmaKind.FILE_SHARED, False),  # the kernel's own: refused elsewhere
    ("/anon_hugepage (deleted)", VmaKind.FILE_PRIVATE, False),
])
def test_which_vmas_map_a_memfd_or_deleted_file(path: str, kind: VmaKind,
                                                mapped: bool) -> None:
    assert is_mapped_object(kind, path) == mapped


def test_mapped_refusals() -> None:
    small, flags = Seen(Found(10, 0, False, True)), FdFlags()
    assert refusal(vma("/memfd:a (deleted)"), small, flags) is None
    assert refusal(vma("/tmp/x"), None, flags) is None  # not the module's business
    assert "migrate does not carry" in str(refusal(vma("/tmp/x (deleted)"), small,
                                                   FdFlags(externals=False, migrating=True)))
    assert refusal(vma("/tmp/x (deleted)"), small, FdFlags(externals=False)) is None
    assert "could not be looked at" in str(refusal(vma("/tmp/x (deleted)"), None, flags))
    assert "--ghost-limit 2000 or more" in str(
        refusal(vma("/memfd:a (deleted)"), Seen(Found(2000, 0, False, True)),
                FdFlags(ghost_limit=1000)))
    assert "1 other link(s)" in str(refusal(vma("/tmp/x (deleted)"),
                                            Seen(Found(1, 1, False, True)), flags))
    held = refusal(vma("/tmp/x (deleted)"), Seen(Found(1, 0, False, True), (5,)), flags)
    assert "process 5 outside the dump also maps it or holds it open" in str(held)


def test_only_mappings_a_seal_made_read_only_come_after_the_seals() -> None:
    made = Made(by_vma={(1, 7): 99})

    def v(flags: tuple[str, ...], shared: bool = True, inode: int = 7) -> pb.Vma:
        return pb.Vma(shared=shared, dev=1, inode=inode, vmflags=list(flags))

    assert made.after_seal(v(("rd", "sh", "mr", "ms")))  # mapped after F_SEAL_WRITE
    assert not made.after_seal(v(("rd", "sh", "mr", "mw", "ms")))  # before a seal
    assert not made.after_seal(v(("rd", "mr", "ms")))  # an O_RDONLY file's
    assert not made.after_seal(v(("rd", "sh", "mr"), shared=False))
    assert not made.after_seal(v(("rd", "sh", "mr", "ms"), inode=8))  # not a mapped object


def test_mapped_objects_and_deleted_cwd_are_checked_at_the_image_boundary() -> None:
    entry = pb.ProcessEntry(pid=42, comm="x", cwd="/tmp")
    entry.threads.add(tid=42).creds.uid = 1000
    entry.files.add(id=1, type=pb.OpenFile.MEMFD, path="/memfd:a (deleted)")
    entry.files.add(id=2, type=pb.OpenFile.REGULAR, path="/tmp/f")
    entry.mapped_objects.add(dev=1, inode=7, file_id=1)
    entry.mapped_objects.add(dev=1, inode=8).file.MergeFrom(
        pb.OpenFile(id=3, type=pb.OpenFile.GHOST, path="/tmp/g (deleted)"))
    assert list(problems(entry)) == []
    entry.mapped_objects.add(dev=1, inode=9, file_id=2)
    entry.mapped_objects.add(dev=1, inode=7).file.MergeFrom(
        pb.OpenFile(id=4, type=pb.OpenFile.MEMFD))
    entry.mapped_objects.add(dev=1, inode=10).file.MergeFrom(
        pb.OpenFile(id=5, type=pb.OpenFile.PIPE))
    entry.deleted_cwd.mode = 0o40700
    assert [p[0] for p in problems(entry)] == [
        "mapped_objects.inode[3]", "mapped_objects[2].file_id", "mapped_objects[4].file.type",
        "cwd"]
    entry.cwd = "/tmp/gone (deleted)"
    assert [p[0] for p in problems(entry)][-1] != "cwd"


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
    shown = run_ckpt("show", images)
    assert_ckpt_ok(shown)
    # how each mapped memfd travels: with its open file, or its own contents
    objects = {line.split(" /memfd:")[1] for line in shown.stdout.splitlines()
               if line.startswith("  vma ") and "/memfd:ckpt" in line}
    assert objects == {"ckpt both (deleted) [the file of fd 3]",
                       "ckpt only (deleted) [contents saved (4096 bytes)]",
                       "ckpt future (deleted) [contents saved (4096 bytes)]",
                       "ckpt sealed (deleted) [the file of fd 4]"}, shown.stdout
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
    assert after["kept_fd_to_map"] and after["kept_map_to_fd"] and after["kept_deleted"]
    assert after["shared_file"] == after["shared_map"] == "through the mapping" + n
    assert {k: after[k] for k in ("shared_head", "shared_nlink", "shared_mode",
                                  "private_map", "private_file", "deleted", "regions")} == \
        {k: before[k] for k in ("shared_head", "shared_nlink", "shared_mode", "private_map",
                                "private_file", "deleted", "regions")}


@needs_root
def test_mapped_deleted_files_survive(harness: Harness, tmp_path: Path) -> None:
    """A deleted file mapped MAP_SHARED (no fd left) comes back unlinked with its contents,
    mode and a shared mapping that writes through to it; one mapped MAP_PRIVATE keeps its
    copied-on-write page while the file under it, and its clean pages, hold the file's;
    one mapped with its fd still open is one inode with it again."""
    target = mapped_target(harness, "deleted")
    before = ask(target)
    assert before["private_map"] == ["copied on write", "file page 1....", "file page 2...."]
    assert before["private_file"][0] == "file page 0...."
    assert before["deleted"] == [True, True] and before["shared_nlink"] == 0
    assert before["kept_fd_to_map"] and before["kept_map_to_fd"] and before["kept_deleted"]
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
    res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", images, "--incremental",
                   "--prev-images-dir", pre, reap=target.proc)
    assert_ckpt_ok(res)
    target.proc.wait(timeout=10)
    # the two shared mappings are their files: saved whole, and the pass says so
    assert "2 whole VMA(s): memfd or deleted file mapped MAP_SHARED" in res.stderr, res.stderr
    assert_deleted_restores(harness, target, before, images)


@needs_root
def test_mapped_files_of_an_unprivileged_process(harness: Harness, tmp_path: Path) -> None:
    """Memfds, deleted files and a deleted working directory are made afresh, not opened
    by path: a process that became uid 65534 gets them back (ckpt.restore.access has
    nothing to doubt), root's 0600 deleted file and 0700 directory included, since it
    had them."""
    # uid 65534 looks for the control files in harness.tmp: let it through pytest's dirs
    dirs = [harness.tmp, *harness.tmp.parents][:4]
    modes = [d.stat().st_mode for d in dirs]
    try:
        for d, mode in zip(dirs, modes, strict=True):
            d.chmod(mode | 0o711)
        target = mapped_target(harness, "dropped")
        assert ask(target) == {"uid": 65534, "memfd": "#1", "file": "root's file",
                                "cwd": True}
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        harness.restore_detached(images)
        assert ask(target) == {"uid": 65534, "memfd": "#2", "file": "root's file",
                                "cwd": True}
    finally:
        for d, mode in zip(dirs, modes, strict=True):
            d.chmod(mode)


@needs_root
@pytest.mark.parametrize("taken", [False, True])
def test_deleted_working_directory_survives(harness: Harness, tmp_path: Path,
                                            taken: bool) -> None:
    """A removed working directory comes back removed, with its mode, owner, times, its
    parent as "..", and its name when that is free (``taken``: another directory took
    the name since; the restored one gets NAME.XXXXXX and the other is left alone). The
    parent's times are put back after the restore made and removed the directory."""
    target = mapped_target(harness, "cwd")
    before = ask(target)
    where = harness.tmp / "w"
    assert before["link"] == f"{where}/gone (deleted)" and before["parent"]
    assert before["stat"][0] == oct(0o40751) and before["stat"][1:3] == [65534, 65534]
    assert before["getcwd"] == before["create"] == "ENOENT" and before["list"] == []
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    if taken:
        (where / "gone").mkdir()
    times = where.stat().st_atime_ns, where.stat().st_mtime_ns
    harness.restore_detached(images)
    after = ask(target)
    assert (where.stat().st_atime_ns, where.stat().st_mtime_ns) == times
    if taken:
        assert after["link"].startswith(f"{where}/gone.") and (where / "gone").is_dir()
        assert after.pop("link").endswith(" (deleted)") and before.pop("link")
    assert after == before


@needs_root
def test_a_mapped_memfd_another_process_holds_is_refused(harness: Harness,
                                                         tmp_path: Path) -> None:
    """A memfd the target only maps, which another process (this test) holds open, is
    refused before the freeze naming that process: a restore would cut the sharing. Once
    it lets go, the dump goes through."""
    target = mapped_target(harness, "memfd")
    ask(target)
    pid = target.proc.pid
    with open(f"/proc/{pid}/maps") as f:
        span = next(line.split()[0] for line in f if line.rstrip().endswith(
            "/memfd:ckpt only (deleted)"))
    held = os.open(f"/proc/{pid}/map_files/{span}", os.O_RDONLY)
    try:
        res = run_ckpt("dump", "-t", str(pid), "-D", harness.images("refused"))
        message = assert_one_error_line(res)
        assert f"maps a memfd (/memfd:ckpt only) at 0x{span.split('-')[0]}" in message, message
        assert f"process {os.getpid()} outside the dump also maps it or holds it open" \
            in message, message
        assert_running_untraced(pid)
    finally:
        os.close(held)
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    assert ask(target)["only"].startswith("only mapped")
