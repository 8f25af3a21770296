"""UFFDIO_COPY page fill into a real stub (ckpt.restore.uffd_fill), and a whole restore
with it turned off (process_vm_writev for every page) against the same reference."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_bigmem_reference,
    assert_running_untraced,
    bigmem_dumped,
    is_alive,
    needs_root,
    wait_for_lines,
)

from ckpt.actions.restore import RestoreOptions, restore
from ckpt.collect.maps import read_smaps_vmflags
from ckpt.errors import KernelError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import NR, PAGE_SIZE, vm_transfer
from ckpt.restore import mm
from ckpt.restore import uffd_fill as uffd_fill_mod
from ckpt.restore.stub import Stub
from ckpt.restore.uffd_fill import CopyFill

P = PAGE_SIZE
N = 32
PROT_RW = 3
MAP_PRIVATE_ANON = 0x22

pytestmark = needs_root


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub.spawn(None)
    try:
        s.install_gadget(mm.free_gadget_address(s.pid, []))
        yield s
    finally:
        s.kill()


def vmflags_at(pid: int, start: int) -> tuple[str, ...]:
    return read_smaps_vmflags(pid)[start]


def read_stub(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def test_copy_fill_into_stub(stub: Stub) -> None:
    """Registered pages are filled by UFFDIO_COPY; any other write to a missing page fails
    at once (no wait for a fault handler); a page is never filled twice; closing drops
    the registration and the untouched pages read as zeros."""
    area = stub.sc(NR.mmap, 0, N * P, PROT_RW, MAP_PRIVATE_ANON, -1, 0, what="mmap")
    vma = pb.Vma(start=area, end=area + N * P, prot=PROT_RW, kind=pb.Vma.ANON_PRIVATE)
    src = mmap.mmap(-1, N * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = os.urandom(N * P)
    src.write(data)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
    with CopyFill.open(stub, [vma]) as copier:
        assert copier.spans == [(area, area + N * P)]
        assert copier.owns(area) and copier.owns(area + N * P - 1)
        assert not copier.owns(area + N * P) and not copier.owns(area - 1)
        assert "um" in vmflags_at(stub.pid, area)
        copier.copy(area, addr, 8 * P)
        copier.copy(area + 16 * P, addr + 16 * P, 8 * P)
        with pytest.raises(KernelError) as exc:
            vm_transfer(True, stub.pid, [(addr, area + 10 * P, P)])
        assert exc.value.errno == errno.EFAULT
        with pytest.raises(KernelError) as exc:
            copier.copy(area + 4 * P, addr, P)
        assert exc.value.errno == errno.EEXIST
        assert read_stub(stub.pid, area, 8 * P) == data[: 8 * P]
    assert copier.fd == -1 and not copier.owns(area)
    assert "um" not in vmflags_at(stub.pid, area)
    fds = [os.readlink(f"/proc/{stub.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{stub.pid}/fd")]
    assert not [link for link in fds if "userfaultfd" in link]  # the stub kept no uffd
    got = read_stub(stub.pid, area, N * P)
    assert got[: 8 * P] == data[: 8 * P]
    assert got[8 * P : 16 * P] == bytes(8 * P)
    assert got[16 * P : 24 * P] == data[16 * P : 24 * P]
    assert got[24 * P :] == bytes(8 * P)
    vm_transfer(True, stub.pid, [(addr, area + 10 * P, P)])  # plain writes work again
    assert read_stub(stub.pid, area + 10 * P, P) == data[:P]


def test_copy_fill_skips_file_and_shared(stub: Stub, tmp_path: Path) -> None:
    """Only anonymous private VMAs are registered; without any, no uffd is made."""
    anon = stub.sc(NR.mmap, 0, 4 * P, PROT_RW, 0x21, -1, 0, what="mmap shared")
    shared = pb.Vma(start=anon, end=anon + 4 * P, prot=PROT_RW, shared=True,
                    kind=pb.Vma.ANON_SHARED)
    text = pb.Vma(start=anon + 8 * P, end=anon + 9 * P, prot=5, kind=pb.Vma.FILE_PRIVATE)
    with CopyFill.open(stub, [shared, text]) as copier:
        assert copier.fd == -1 and copier.spans == []


def test_restore_without_copy_fill(harness: Harness, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where userfaultfd is unavailable every page goes through process_vm_writev; the
    64 MiB target's digests after that restore equal a fresh reference run's."""
    out = tmp_path / "out.txt"
    pid, images, at_dump = bigmem_dumped(harness, out)

    opened: list[CopyFill] = []

    def unavailable(stub: Stub, vmas: object) -> CopyFill:
        opened.append(CopyFill())
        return opened[-1]

    monkeypatch.setattr(uffd_fill_mod.CopyFill, "open", classmethod(
        lambda cls, stub, vmas: unavailable(stub, vmas)))
    res = restore(RestoreOptions(images_dir=str(images)))
    harness.track(res.pid)
    assert res.pid == pid and len(opened) == 1
    wait_for_lines(out, at_dump + 3, timeout=30)
    assert_running_untraced(pid)
    harness.kill(pid)
    assert not is_alive(pid)
    assert_bigmem_reference(out)
