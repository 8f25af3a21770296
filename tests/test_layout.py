"""ckpt.restore.layout: which parts of a warm stub's address space survive a new pass."""

from __future__ import annotations

from ckpt.images.pb import core_pb2 as pb
from ckpt.restore.layout import plan_layout, vdso_moved

K = pb.Vma.Kind
P = 0x1000
RW, R = 3, 1


def vma(start: int, pages: int, kind: pb.Vma.Kind = K.ANON_PRIVATE, prot: int = RW, path: str = "",
        pgoff: int = 0, inode: int = 0, flags: tuple[str, ...] = ()) -> pb.Vma:
    return pb.Vma(start=start, end=start + pages * P, prot=prot, kind=kind, path=path,
                  pgoff=pgoff, inode=inode, vmflags=list(flags))


def fresh(change: object) -> list[tuple[int, int]]:
    return [(p.start, p.end) for p in change.fresh]  # type: ignore[attr-defined]


def test_same_layout_keeps_everything() -> None:
    vmas = [vma(0x10000, 4), vma(0x20000, 2, K.FILE_PRIVATE, R, "/lib/x", 0x3000, 7)]
    change = plan_layout(vmas, vmas)
    assert not change.unmap and not change.fresh and not change.protect
    assert change.kept == [(0x10000, 0x14000), (0x20000, 0x22000)]


def test_new_vma_is_fresh_and_gone_vma_unmapped() -> None:
    change = plan_layout([vma(0x10000, 4)], [vma(0x30000, 2)])
    assert change.unmap == [(0x10000, 0x14000)]
    assert fresh(change) == [(0x30000, 0x32000)]
    assert change.kept == []


def test_grown_vma_keeps_its_old_part() -> None:
    change = plan_layout([vma(0x10000, 4)], [vma(0x10000, 8)])
    assert change.kept == [(0x10000, 0x14000)]
    assert fresh(change) == [(0x14000, 0x18000)]
    assert not change.unmap


def test_split_by_mprotect_is_an_mprotect() -> None:
    old = [vma(0x10000, 4)]
    new = [vma(0x10000, 1), vma(0x11000, 2, prot=R), vma(0x13000, 1)]
    change = plan_layout(old, new)
    assert change.protect == [(0x11000, 0x13000, R)]
    assert not change.fresh and not change.unmap
    assert change.kept == [(0x10000, 0x14000)]


def test_other_backing_in_place_is_fresh() -> None:
    """Same range, a file where anonymous memory was (or another file, or another
    offset): mapped anew, its old pages must not survive."""
    anon = vma(0x10000, 4)
    f1 = vma(0x10000, 4, K.FILE_PRIVATE, RW, "/data", 0, 9)
    f2 = vma(0x10000, 4, K.FILE_PRIVATE, RW, "/data", P, 9)
    for old, new in ((anon, f1), (f1, anon), (f1, f2)):
        change = plan_layout([old], [new])
        assert fresh(change) == [(0x10000, 0x14000)]
        assert change.kept == []


def test_file_moved_with_its_offset_is_kept() -> None:
    """A file VMA split at a page boundary keeps the same file base address."""
    old = [vma(0x10000, 4, K.FILE_PRIVATE, R, "/lib/x", 0, 7)]
    new = [vma(0x10000, 2, K.FILE_PRIVATE, R, "/lib/x", 0, 7),
           vma(0x12000, 2, K.FILE_PRIVATE, RW, "/lib/x", 2 * P, 7)]
    change = plan_layout(old, new)
    assert not change.fresh
    assert change.protect == [(0x12000, 0x14000, RW)]


def test_grown_stack_is_fresh_below_and_kept_above() -> None:
    old = [vma(0x7000_0000, 4, K.STACK, flags=("gd",))]
    new = [vma(0x7000_0000 - 2 * P, 6, K.STACK, flags=("gd",))]
    change = plan_layout(old, new)
    assert fresh(change) == [(0x7000_0000 - 2 * P, 0x7000_0000)]
    assert change.kept == [(0x7000_0000, 0x7000_4000)]


def test_relro_keeps_its_warm_write_permission() -> None:
    """A VM_ACCOUNT read-only private VMA (RELRO) stays writable in the stub until the
    process is completed: no mprotect back and forth while passes are applied."""
    old = [vma(0x10000, 2, K.FILE_PRIVATE, R, "/lib/x", 0, 7, ("rd", "ac"))]
    new = [vma(0x10000, 2, K.FILE_PRIVATE, R, "/lib/x", 0, 7, ("rd", "ac"))]
    assert plan_layout(old, new).protect == []
    plain = [vma(0x10000, 2, K.FILE_PRIVATE, R, "/lib/x", 0, 7, ("rd",))]
    assert plan_layout(plain, new).protect == [(0x10000, 0x12000, RW)]


def test_kernel_mappings_take_no_part() -> None:
    vdso = vma(0x7FFF0000, 2, K.VDSO, prot=5)
    change = plan_layout([vdso, vma(0x10000, 1)], [vdso, vma(0x10000, 1)])
    assert change.kept == [(0x10000, 0x11000)] and not change.unmap
    assert not vdso_moved([vdso], [vdso])
    assert vdso_moved([vdso], [vma(0x7FFE0000, 2, K.VDSO, prot=5)])


def test_mapping_flags_are_part_of_the_backing() -> None:
    """A PROT_NONE MAP_NORESERVE reservation turned into part of a grown VMA (mremap into
    the room), or a range whose madvise flags changed, is mapped fresh: an mprotect would
    keep the old flags, and the VMA would not merge with its neighbour as it did."""
    old = [vma(0x10000, 2, flags=("ac",)), vma(0x12000, 2, prot=0, flags=("nr",))]
    new = [vma(0x10000, 4, flags=("ac",))]
    change = plan_layout(old, new)
    assert change.kept == [(0x10000, 0x12000)]
    assert fresh(change) == [(0x12000, 0x14000)]
    assert not change.protect
    change = plan_layout([vma(0x10000, 4)], [vma(0x10000, 4, flags=("hg",))])
    assert fresh(change) == [(0x10000, 0x14000)] and not change.kept
    change = plan_layout([vma(0x10000, 4, flags=("ac", "sd"))], [vma(0x10000, 4, flags=("ac",))])
    assert change.kept == [(0x10000, 0x14000)]  # flags the kernel sets on its own do not count
