"""The image layer: framing, page files, the images directory and its parent chain."""

from __future__ import annotations

import io
import os
import random
import stat
import struct
import zlib
from pathlib import Path

import pytest

from ckpt.errors import ImageError
from ckpt.images import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    KINDS,
    ImageDir,
    PagesReader,
    PagesWriter,
    decode_entries,
    encode_entries,
    image_chain,
)
from ckpt.images import pages_reader as pages_reader_mod
from ckpt.images.pagemap import Pagemap, decode
from ckpt.images.pb.core_pb2 import ProcessEntry
from ckpt.images.pb.image_pb2 import IN_PARENT, PRESENT, Inventory, PagemapHead, PagemapRuns

CORE_MAGIC = KINDS["core"].magic
INV_MAGIC = KINDS["inventory"].magic


def mixed_data(size: int, seed: int = 7) -> bytes:
    """Zero, random, low-entropy and repeated 4 KiB pages."""
    rnd = random.Random(seed)
    pool = rnd.randbytes(1 << 20)
    low = pool.translate(bytes(b % 7 for b in range(256)))
    parts = []
    for _ in range(size // 4096):
        r = rnd.random()
        off = rnd.randrange(0, len(pool) - 4096)
        if r < 0.25:
            parts.append(bytes(4096))
        elif r < 0.5:
            parts.append(pool[off : off + 4096])
        elif r < 0.75:
            parts.append(low[off : off + 4096])
        else:
            parts.append(b"page %d " % off * 512)
    data = b"".join(parts)
    return (data + pool)[:size]


def make_core(pid: int) -> ProcessEntry:
    core = ProcessEntry(pid=pid, ppid=1, comm="sleep", cwd="/tmp", cmdline=b"sleep\x0010\x00")
    t = core.threads.add(tid=pid, xstate=b"\x01" * 832, sigmask=1 << 9)
    t.regs.rip = 0x401000
    t.regs.rsp = 0x7FFE0000
    t.creds.uid = 1000
    core.vmas.add(start=0x400000, end=0x401000, prot=5, path="/usr/bin/sleep")
    core.rlimits.add(resource=7, cur=1024, max=2**64 - 1)
    return core


def make_dir(path: Path, parent: str = "", pids: tuple[int, ...] = (42,)) -> ImageDir:
    d = ImageDir.create(path)
    d.write_inventory(Inventory(format_version=1, root_pid=pids[0], pids=pids, parent=parent,
                                kind="predump", tracker="none"))
    return d


# -- framing ---------------------------------------------------------------------------


def test_framing_round_trip_and_empty() -> None:
    msgs = [make_core(10), make_core(11), ProcessEntry()]
    data = encode_entries(CORE_MAGIC, msgs)
    assert decode_entries(data, CORE_MAGIC, ProcessEntry, "x.img") == msgs
    assert decode_entries(encode_entries(CORE_MAGIC, []), CORE_MAGIC, ProcessEntry, "x") == []


def test_framing_corrupted_byte() -> None:
    data = bytearray(encode_entries(CORE_MAGIC, [make_core(10)]))
    data[40] ^= 0x20
    with pytest.raises(ImageError, match=r"core-10\.img: corrupted \(crc mismatch"):
        decode_entries(bytes(data), CORE_MAGIC, ProcessEntry, "core-10.img")


@pytest.mark.parametrize("cut", [0, 3, 11, 15, 30, -8, -1])
def test_framing_truncated(cut: int) -> None:
    data = encode_entries(CORE_MAGIC, [make_core(10)])
    with pytest.raises(ImageError, match=r"^f\.img: truncated"):
        decode_entries(data[:cut], CORE_MAGIC, ProcessEntry, "f.img")


def test_framing_wrong_magic() -> None:
    data = encode_entries(INV_MAGIC, [Inventory()])
    with pytest.raises(ImageError, match=r"f\.img: is a inventory image, expected core"):
        decode_entries(data, CORE_MAGIC, ProcessEntry, "f.img")
    with pytest.raises(ImageError, match=r"f\.img: not a ckpt image"):
        decode_entries(b"\x7fELF" + data[4:], INV_MAGIC, Inventory, "f.img")


def test_framing_wrong_version() -> None:
    data = bytearray(encode_entries(INV_MAGIC, [Inventory()]))
    struct.pack_into("<I", data, 8, FORMAT_VERSION + 1)
    with pytest.raises(ImageError, match=f"unsupported image format version {FORMAT_VERSION + 1}"):
        decode_entries(bytes(data), INV_MAGIC, Inventory, "f.img")


def test_framing_count_mismatch_and_trailing_garbage() -> None:
    data = bytearray(encode_entries(INV_MAGIC, [Inventory(), Inventory()]))
    struct.pack_into("<I", data, len(data) - 4, 3)
    with pytest.raises(ImageError, match="trailer says 3 entries, found 2"):
        decode_entries(bytes(data), INV_MAGIC, Inventory, "f.img")
    good = encode_entries(INV_MAGIC, [Inventory()])
    with pytest.raises(ImageError, match="trailing garbage"):
        decode_entries(good + b"\0", INV_MAGIC, Inventory, "f.img")


def test_framing_protobuf_parse_failure() -> None:
    payload = b"\x0a\xff"  # field 1, length-delimited, length runs past the end
    data = b"CKPT" + struct.pack("<II", INV_MAGIC, FORMAT_VERSION)
    data += struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    data += struct.pack("<II", 0xFFFFFFFF, 1)
    with pytest.raises(ImageError, match=r"f\.img: corrupted .*not a valid Inventory"):
        decode_entries(data, INV_MAGIC, Inventory, "f.img")


# -- page files ------------------------------------------------------------------------


def write_pages(data: bytes, sizes: list[int], level: int = 1) -> tuple[bytes, PagesWriter]:
    out = io.BytesIO()
    w = PagesWriter(out, name="pages-1.img", level=level)
    mv = memoryview(data)
    off = 0
    for n in sizes:
        w.write(mv[off : off + n])
        off += n
    w.write(mv[off:])
    w.close()
    return out.getvalue(), w


def read_pages(blob: bytes) -> bytes:
    return b"".join(PagesReader(io.BytesIO(blob), "pages-1.img").iter_chunks())


@pytest.mark.parametrize("level", [1, -1])
def test_pages_round_trip_odd_pieces(level: int) -> None:
    data = mixed_data(10 << 20)
    sizes = [1, 4095, 3 << 20, 5 << 20, 12345, 0, 7]  # straddles chunk boundaries
    blob, w = write_pages(data, sizes, level)
    assert w.raw_bytes == len(data)
    assert w.stored_bytes == len(blob) < len(data)
    chunks = list(PagesReader(io.BytesIO(blob), "p").iter_chunks())
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, len(data) - 2 * CHUNK_SIZE]
    assert b"".join(chunks) == data


def test_pages_empty_and_fd(tmp_path: Path) -> None:
    assert read_pages(write_pages(b"", [])[0]) == b""
    path = tmp_path / "p.img"
    data = mixed_data(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    w = PagesWriter(fd)
    w.write(bytearray(data))
    w.close()
    os.close(fd)
    assert read_pages(path.read_bytes()) == data


def test_pages_flipped_byte_in_frame() -> None:
    blob = bytearray(write_pages(mixed_data(6 << 20), [])[0])
    # the second chunk's frame: skip header (8), chunk 0 header+frame, chunk 1 header
    (stored0,) = struct.unpack_from("<I", blob, 12)
    mid = 8 + 8 + stored0 + 8 + 1000
    blob[mid] ^= 0x01
    with pytest.raises(ImageError, match=r"pages-1\.img: corrupted"):
        read_pages(bytes(blob))


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -17, -5])
def test_pages_truncated(keep: int) -> None:
    blob = write_pages(mixed_data(5 << 20), [])[0]
    with pytest.raises(ImageError, match=r"pages-1\.img: truncated"):
        read_pages(blob[:keep])


def test_pages_bad_trailer_and_magic() -> None:
    blob = bytearray(write_pages(mixed_data(1 << 20), [])[0])
    struct.pack_into("<Q", blob, len(blob) - 8, 1234)
    with pytest.raises(ImageError, match="trailer says 1234 bytes"):
        read_pages(bytes(blob))
    with pytest.raises(ImageError, match="not a ckpt page file"):
        read_pages(b"CKPT" + bytes(blob[4:]))


# -- images directory ------------------------------------------------------------------


def test_dir_round_trip_all_kinds(tmp_path: Path) -> None:
    d = make_dir(tmp_path / "a" / "b", pids=(42, 43))
    inv = d.read_inventory()
    assert list(inv.pids) == [42, 43] and inv.root_pid == 42
    core = make_core(42)
    d.write_core(42, core)
    assert d.read_core(42) == core
    head = PagemapHead(pid=42, pages_file_raw_bytes=3 * 4096)
    pm = Pagemap(present=[(0x1000, 0x3000), (0x9000, 0xA000)], in_parent=[(0x5000, 0x8000)])
    d.write_pagemap(42, head, pm)
    assert d.read_pagemap(42) == (head, pm)
    d.write_pagemap(43, PagemapHead(pid=43), Pagemap([], []))
    assert d.read_pagemap(43) == (PagemapHead(pid=43), Pagemap([], []))
    data = mixed_data(3 * 4096)
    with d.pages_writer(42) as w:
        w.write(data)
    with d.pages_reader(42) as r:
        assert b"".join(r.iter_chunks()) == data
    again = ImageDir.open(d.path)
    assert again.read_core(42) == core
    assert sorted(os.listdir(d.path)) == [
        "core-42.img",
        "inventory.img",
        "pagemap-42.img",
        "pagemap-43.img",
        "pages-42.img",
    ]


def test_dir_wrong_kind_and_pid(tmp_path: Path) -> None:
    d = make_dir(tmp_path / "d")
    d.write_core(42, make_core(42))
    os.replace(d.file("core", 42), d.file("pagemap", 42))
    with pytest.raises(ImageError, match=r"pagemap-42\.img: is a core image, expected pagemap"):
        d.read_pagemap(42)
    d.write_core(42, make_core(42))
    os.replace(d.file("core", 42), d.file("core", 7))
    with pytest.raises(ImageError, match="holds process 42, not 7"):
        d.read_core(7)


def test_dir_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"images directory .*nope does not exist"):
        ImageDir.open(tmp_path / "nope")
    empty = ImageDir.create(tmp_path / "empty")
    with pytest.raises(ImageError, match=r"holds no ckpt images \(inventory.img missing\)"):
        ImageDir.open(empty.path)
    d = make_dir(tmp_path / "d")
    for call in (lambda: d.read_core(5), lambda: d.read_pagemap(5)):
        with pytest.raises(ImageError, match=r"image file .*-5\.img missing"):
            call()
    with pytest.raises(ImageError, match=r"image file .*pages-5\.img missing"), d.pages_reader(5):
        pass


def test_dir_modes_and_atomic_replace(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = make_dir(tmp_path / "x")
        d.write_core(42, make_core(42))
        with d.pages_writer(42) as w:
            w.write(b"abc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o700
    for name in os.listdir(d.path):
        assert stat.S_IMODE(os.stat(d.path / name).st_mode) == 0o600, name
    ino = os.stat(d.file("core", 42)).st_ino
    again = ImageDir.create(d.path)  # an existing images dir is fine: files get replaced
    again.write_core(42, make_core(42))
    assert os.stat(d.file("core", 42)).st_ino != ino
    assert not [n for n in os.listdir(d.path) if n.endswith(".tmp")]


def test_pages_writer_exception_removes_temp(tmp_path: Path) -> None:
    d = make_dir(tmp_path / "x")
    with d.pages_writer(42) as w:
        w.write(b"old")
    with pytest.raises(RuntimeError, match="boom"), d.pages_writer(42) as w:
        w.write(mixed_data(5 << 20))
        assert (d.path / ".pages-42.img.tmp").exists()
        raise RuntimeError("boom")
    assert sorted(os.listdir(d.path)) == ["inventory.img", "pages-42.img"]
    with d.pages_reader(42) as r:
        assert b"".join(r.iter_chunks()) == b"old"


def test_write_error_is_image_error(tmp_path: Path) -> None:
    d = make_dir(tmp_path / "x")
    os.chmod(d.path, 0o500)
    try:
        if os.access(d.path, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ImageError, match=r"cannot write .*core-1\.img: Permission denied"):
            d.write_core(1, make_core(1))
    finally:
        os.chmod(d.path, 0o700)


def test_enospc_is_image_error(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "wb", buffering=0) as f:
        w = PagesWriter(io.BufferedWriter(f, 1 << 10), name="pages-9.img")
        with pytest.raises(ImageError, match=r"cannot write pages-9\.img: No space left on device"):
            w.write(mixed_data(CHUNK_SIZE))


# -- parent chain ----------------------------------------------------------------------


def test_parent_chain(tmp_path: Path) -> None:
    make_dir(tmp_path / "1")
    make_dir(tmp_path / "2", parent="../1")
    top = make_dir(tmp_path / "3", parent="../2")
    chain = image_chain(top)
    assert [c.path.resolve().name for c in chain] == ["3", "2", "1"]
    assert chain[-1].parent() is None
    assert image_chain(ImageDir.open(tmp_path / "1"))[0].path == tmp_path / "1"


def test_parent_missing(tmp_path: Path) -> None:
    top = make_dir(tmp_path / "3", parent="../gone")
    with pytest.raises(ImageError, match=r"parent images .*gone \(of .*3\) missing"):
        top.parent()
    with pytest.raises(ImageError, match="parent images"):
        image_chain(top)


def test_parent_cycle(tmp_path: Path) -> None:
    make_dir(tmp_path / "a", parent="../b")
    make_dir(tmp_path / "b", parent="../c")
    c = make_dir(tmp_path / "c", parent="../a")
    with pytest.raises(ImageError, match="loops back"):
        image_chain(c)
    selfref = make_dir(tmp_path / "s", parent=".")
    with pytest.raises(ImageError, match="loops back"):
        image_chain(selfref)


def test_unwritable_target_is_image_error(tmp_path: Path) -> None:
    d = make_dir(tmp_path / "x")
    (d.path / ".core-1.img.tmp").mkdir()  # the temp name is taken by a directory
    with pytest.raises(ImageError, match=r"cannot write .*core-1\.img: Is a directory"):
        d.write_core(1, make_core(1))
    (d.path / "pages-1.img").mkdir()  # rename onto a directory fails
    with (
        pytest.raises(ImageError, match=r"cannot write .*pages-1\.img: Is a directory"),
        d.pages_writer(1) as w,
    ):
        w.write(b"x")
    assert not (d.path / ".pages-1.img.tmp").exists()


def test_pagemap_runs_are_checked() -> None:
    """Runs must be ascending, disjoint and page aligned, with known flags and arrays of
    one length; touching runs of one kind come back joined."""
    ok = PagemapRuns(vaddr=[0x1000, 0x2000, 0x3000], nr_pages=[1, 1, 2],
                     flags=[PRESENT, PRESENT, IN_PARENT])
    assert decode([ok], "pm") == Pagemap([(0x1000, 0x3000)], [(0x3000, 0x5000)])
    bad = [
        (PagemapRuns(vaddr=[0x3000, 0x1000], nr_pages=[1, 1], flags=[1, 1]), "out of order"),
        (PagemapRuns(vaddr=[0x1000, 0x1800], nr_pages=[1, 1], flags=[1, 1]), "out of order"),
        (PagemapRuns(vaddr=[0x1000], nr_pages=[1], flags=[3]), "flags 3"),
        (PagemapRuns(vaddr=[0x1000], nr_pages=[1, 2], flags=[1]), "different lengths"),
    ]
    for msg, why in bad:
        with pytest.raises(ImageError, match=why):
            decode([msg], "pm")


def test_sparse_read_skips_unwanted_chunks() -> None:
    """iter_sparse hands back every chunk's length, and the data only of the chunks asked
    for; the skipped ones are not even read (a corrupt one goes unnoticed)."""
    data = mixed_data(3 * CHUNK_SIZE + 4096)
    buf = io.BytesIO()
    w = PagesWriter(buf)
    w.write(data)
    w.close()
    blob = bytearray(buf.getvalue())
    asked: list[tuple[int, int]] = []

    def want(offset: int, length: int) -> bool:
        asked.append((offset, length))
        return offset == CHUNK_SIZE

    got = list(PagesReader(io.BytesIO(bytes(blob)), "p").iter_sparse(want))
    assert [n for n, _ in got] == [CHUNK_SIZE] * 3 + [4096]
    assert asked == [(k * CHUNK_SIZE, n) for k, (n, _) in enumerate(got)]
    assert [d is not None for _, d in got] == [False, True, False, False]
    assert got[1][1] == data[CHUNK_SIZE : 2 * CHUNK_SIZE]
    blob[len(blob) // 8] ^= 0xFF  # inside the first chunk's frame, which is skipped
    again = list(PagesReader(io.BytesIO(bytes(blob)), "p").iter_sparse(want))
    assert again[1][1] == data[CHUNK_SIZE : 2 * CHUNK_SIZE]


def pages_blob(data: bytes) -> bytearray:
    buf = io.BytesIO()
    w = PagesWriter(buf)
    w.write(data)
    w.close()
    return bytearray(buf.getvalue())


@pytest.mark.parametrize("workers", [1, 3])
def test_apply_hands_every_chunk_to_the_sink(workers: int) -> None:
    """apply: every chunk reaches the sink once, with its stream offset, on any thread;
    the total covers declined chunks too."""
    data = mixed_data(5 * CHUNK_SIZE + 3 * 4096)
    blob = pages_blob(data)
    got: dict[int, bytes] = {}

    def sink(offset: int, view: memoryview, addr: int) -> None:
        assert addr and len(view) <= CHUNK_SIZE
        got[offset] = bytes(view)

    total = PagesReader(io.BytesIO(bytes(blob)), "p", workers=workers).apply(sink)
    assert total == len(data)
    assert b"".join(got[k] for k in sorted(got)) == data
    got.clear()
    total = PagesReader(io.BytesIO(bytes(blob)), "p", workers=workers).apply(
        sink, lambda offset, length: offset // CHUNK_SIZE in (1, 5))
    assert total == len(data)
    assert got == {CHUNK_SIZE: data[CHUNK_SIZE : 2 * CHUNK_SIZE],
                   5 * CHUNK_SIZE: data[5 * CHUNK_SIZE :]}


@pytest.mark.parametrize("workers", [1, 3])
def test_apply_raises_the_first_failure(workers: int) -> None:
    """A corrupted frame, a truncated file, a failing sink: the error is raised (for a
    corrupted frame, naming its chunk) and no thread goes on."""
    data = mixed_data(4 * CHUNK_SIZE)
    blob = pages_blob(data)
    frames = []  # (offset, stored length) of each frame
    at = 8
    while True:
        raw_len, stored = struct.unpack_from("<II", blob, at)
        if not raw_len:
            break
        frames.append((at + 8, stored))
        at += 8 + stored
    bad = bytearray(blob)
    bad[frames[2][0] + frames[2][1] // 2] ^= 0xFF
    with pytest.raises(ImageError, match="chunk 2"):
        PagesReader(io.BytesIO(bytes(bad)), "p", workers=workers).apply(lambda *a: None)
    with pytest.raises(ImageError, match="truncated"):
        PagesReader(io.BytesIO(bytes(blob[: frames[3][0] + 10])), "p",
                    workers=workers).apply(lambda *a: None)
    calls: list[int] = []

    def sink(offset: int, view: memoryview, addr: int) -> None:
        calls.append(offset)
        if offset == CHUNK_SIZE:
            raise OSError("no space left")

    with pytest.raises(OSError, match="no space left"):
        PagesReader(io.BytesIO(bytes(blob)), "p", workers=workers).apply(sink)
    assert CHUNK_SIZE in calls


@pytest.mark.parametrize("fs", [0xEF53, 0x6969], ids=["local", "nfs"])
def test_page_file_mapped_only_on_local_filesystems(tmp_path: Path, fs: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A local page file is read through a mapping; on a network or FUSE filesystem (an
    I/O error under a mapping is SIGBUS) with reads. Both give the same chunks."""
    monkeypatch.setattr(pages_reader_mod, "fs_type", lambda fd: fs)
    d = make_dir(tmp_path / "x")
    data = mixed_data(9 << 20)
    with d.pages_writer(42) as w:
        w.write(data)
    with d.pages_reader(42) as r:
        assert isinstance(r._f, pages_reader_mod.Mapped) == (fs == 0xEF53)
        assert b"".join(r.iter_chunks()) == data


def test_core_image_larger_than_protobuf_holds_is_one_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt.images import imagedir

    images = imagedir.ImageDir.create(tmp_path / "d")
    entry = ProcessEntry(pid=7, cmdline=b"x" * 4096)
    monkeypatch.setattr(imagedir, "MAX_MESSAGE", 1000)  # the real limit, 2 GiB, scaled down
    with pytest.raises(ImageError, match="process 7's state besides its memory takes"):
        images.write_core(7, entry)
    monkeypatch.undo()
    images.write_core(7, entry)
