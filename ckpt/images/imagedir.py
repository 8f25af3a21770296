"""An images directory: the kinds table and typed, atomic reads and writes of each file."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from google.protobuf.message import Message

from ckpt.errors import ImageError
from ckpt.images.framing import (
    decode_entries,
    decode_payloads,
    encode_entries,
    parse_entry,
    register_kind,
)
from ckpt.images.pagemap import Pagemap, decode, encode
from ckpt.images.pages import DEFAULT_LEVEL, PAGES_MAGIC, PagesWriter
from ckpt.images.pages_reader import PagesReader, check_structure
from ckpt.images.pb.core_pb2 import ProcessEntry, Vma
from ckpt.images.pb.image_pb2 import (
    Inventory,
    PageDigests,
    PagemapHead,
    PagemapRuns,
    TrackerState,
)
from ckpt.images.safedir import WritableDir, make_dirs
from ckpt.images.staging import Staging
from ckpt.images.validate import validate
from ckpt.kernel.sys import PAGE_SIZE


def _magic(tag: bytes) -> int:
    value: int = struct.unpack("<I", tag)[0]
    return value


@dataclass(frozen=True)
class ImageKind:
    """One row of the kinds table (cf. CRIU's image-desc.c)."""

    name: str
    template: str  # file name, "{pid}" substituted
    magic: int  # u32 kind-magic (page files: their b"CKPG" file magic)
    messages: tuple[type[Message], ...]  # entry types, in file order ("*" repeats the last)

    def file_name(self, pid: int | None = None) -> str:
        if "{pid}" in self.template:
            if pid is None:
                raise ValueError(f"image kind {self.name} needs a pid")
            return self.template.format(pid=pid)
        return self.template


INVENTORY = ImageKind("inventory", "inventory.img", _magic(b"INVT"), (Inventory,))
CORE = ImageKind("core", "core-{pid}.img", _magic(b"CORE"), (ProcessEntry,))
PAGEMAP = ImageKind("pagemap", "pagemap-{pid}.img", _magic(b"PGMP"), (PagemapHead, PagemapRuns))
PAGES = ImageKind("pages", "pages-{pid}.img", _magic(PAGES_MAGIC), ())
TRACKER = ImageKind("tracker", "tracker-{pid}.img", _magic(b"TRCK"), (TrackerState,))
DIGEST_SIZE = 8  # = ckpt.pagecopy.compare.DIGEST (tested)
DIGESTS = ImageKind("digests", "digests-{pid}.img", _magic(b"DGST"), (PageDigests,))
VMAS = ImageKind("vmas", "vmas-{pid}.img", _magic(b"VMAS"), (Vma,))

MAX_MESSAGE = (1 << 31) - 1  # bytes of one protobuf message

KINDS: dict[str, ImageKind] = {
    k.name: k for k in (INVENTORY, CORE, PAGEMAP, PAGES, TRACKER, DIGESTS, VMAS)
}
for _kind in KINDS.values():
    register_kind(_kind.magic, _kind.name)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


PAGEMAP_CACHE = 64
_PAGEMAPS: dict[tuple[str, int, int, int, int], tuple[PagemapHead, Pagemap]] = {}

class ImageDir:
    """A directory of image files. Never touches a live process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Use ImageDir.create or ImageDir.open instead."""
        self.path = Path(path)
        self.created: list[Path] = []  # directories create() made, outermost first
        self.staging: Staging | None = None  # a new pass until it commits (new_pass)

    def __repr__(self) -> str:
        return f"ImageDir({str(self.path)!r})"

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> ImageDir:
        """Make the directory (and missing parents), each mode 0700; an existing one must
        be the caller's and not writable by group or others. Existing images get replaced
        (a new pass: see new_pass)."""
        p = Path(path)
        try:
            created = make_dirs(p)
            WritableDir.open(p).close()
        except (FileExistsError, NotADirectoryError):
            raise ImageError(f"cannot create images directory {p}: not a directory") from None
        except OSError as exc:
            raise ImageError(f"cannot create images directory {p}: {_why(exc)}") from None
        d = cls(p)
        d.created = created
        return d

    @classmethod
    def new_pass(cls, path: str | os.PathLike[str], overwrite: bool = False) -> ImageDir:
        """create(), for a pass about to be written: a directory that already holds a
        complete pass is refused unless ``overwrite`` (passes dumped against the old one
        then refuse to restore: their parent id no longer matches). Every file is written
        through the directory fd checked here, staged beside the old pass, which stays
        complete until write_inventory() commits the new one (ckpt.images.staging)."""
        d = cls.create(path)
        if not overwrite and d.exists("inventory"):
            raise ImageError(f"{d.path} already holds a complete checkpoint: refusing to "
                             "replace it (--overwrite replaces it; passes dumped against it "
                             "will then refuse to restore)")
        try:
            d.staging = Staging.open(d.path)
        except OSError as exc:
            raise ImageError(f"cannot create images directory {d.path}: {_why(exc)}") from None
        return d

    def abandon(self) -> None:
        """A pass failed before it committed: remove the files it staged (through the
        directory fd it checked, never by path), and every directory it created that is
        left empty (rmdir: never through a link, never a non-empty one). The old pass,
        or a committed new one, stays."""
        if self.staging is None:
            return
        self.staging.remove_staged()
        self.staging.close()
        self.staging = None
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                os.rmdir(d)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ImageDir:
        """Open an existing images directory; it must hold an inventory.img."""
        p = Path(path)
        if not p.is_dir():
            raise ImageError(f"images directory {p} does not exist")
        if not (p / INVENTORY.template).exists():
            raise ImageError(f"{p} holds no ckpt images (inventory.img missing)")
        return cls(p)

    def file(self, kind: str, pid: int | None = None) -> Path:
        """Path of the image file of the given kind (and pid)."""
        return self.path / KINDS[kind].file_name(pid)

    def exists(self, kind: str, pid: int | None = None) -> bool:
        return self.file(kind, pid).exists()

    # -- raw file access ---------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, target: Path) -> Iterator[BinaryIO]:
        """A file object on a fresh temp file in this directory (ckpt.images.safedir),
        renamed onto ``target`` (or, in a new pass, its staged name) when the block
        succeeds; gone on any failure."""
        try:
            out: contextlib.AbstractContextManager[object] = contextlib.nullcontext() \
                if self.staging is not None else WritableDir.open(self.path)
        except OSError as exc:
            raise ImageError(f"cannot write {target}: {_why(exc)}") from None
        with out:
            try:
                tmp = self.staging.create(target.name) if self.staging is not None \
                    else cast(WritableDir, out).create(target.name)
            except OSError as exc:
                raise ImageError(f"cannot write {target}: {_why(exc)}") from None
            with tmp:
                f = open(tmp.fd, "wb", closefd=False)  # noqa: SIM115 - closed below
                try:
                    yield f
                except BaseException:
                    with contextlib.suppress(OSError):
                        f.close()
                    raise
                try:
                    f.close()
                    tmp.commit()
                except OSError as exc:
                    raise ImageError(f"cannot write {target}: {_why(exc)}") from None

    def _write_file(self, target: Path, data: bytes) -> None:
        with self._writing(target) as f:
            try:
                f.write(data)
            except OSError as exc:
                raise ImageError(f"cannot write {target}: {_why(exc)}") from None

    def _read_file(self, target: Path) -> bytes:
        try:
            return target.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"image file {target} missing") from None
        except OSError as exc:
            raise ImageError(f"cannot read {target}: {_why(exc)}") from None

    def _write_msgs(self, kind: ImageKind, pid: int | None, msgs: Sequence[Message]) -> None:
        self._write_file(self.path / kind.file_name(pid), encode_entries(kind.magic, msgs))

    def _read_one(self, kind: ImageKind, pid: int | None) -> Message:
        target = self.path / kind.file_name(pid)
        msgs = decode_entries(self._read_file(target), kind.magic, kind.messages[0], str(target))
        if len(msgs) != 1:
            raise ImageError(f"{target}: corrupted (expected 1 entry, found {len(msgs)})")
        validate(str(target), msgs[0])
        return msgs[0]

    # -- typed images ------------------------------------------------------------------

    def write_inventory(self, msg: Inventory) -> None:
        """Written last: in a new pass, this commits it (ckpt.images.staging)."""
        self._write_msgs(INVENTORY, None, [msg])
        if self.staging is not None:
            try:
                self.staging.commit()
            except OSError as exc:
                raise ImageError(f"cannot complete {self.path}: {_why(exc)}") from None
            self.staging = None

    def read_inventory(self) -> Inventory:
        msg = self._read_one(INVENTORY, None)
        assert isinstance(msg, Inventory)
        return msg

    def write_core(self, pid: int, msg: ProcessEntry) -> None:
        size = msg.ByteSize()
        if size > MAX_MESSAGE:  # protobuf's own limit: pipes, memfds, deleted files, SysV
            raise ImageError(f"process {pid}'s state besides its memory takes {size} bytes "
                             f"(buffered data, memfds, deleted files, System V segments), "
                             f"more than a core image holds ({MAX_MESSAGE} bytes)")
        self._write_msgs(CORE, pid, [msg])

    def read_core(self, pid: int) -> ProcessEntry:
        msg = self._read_one(CORE, pid)
        assert isinstance(msg, ProcessEntry)
        if msg.pid != pid:
            raise ImageError(f"{self.file('core', pid)}: holds process {msg.pid}, not {pid}")
        return msg

    def write_vmas(self, pid: int, vmas: Sequence[Vma]) -> None:
        """vmas-<pid>.img: a predump's VMA list (a dump has it in its core image)."""
        self._write_msgs(VMAS, pid, vmas)

    def read_vmas(self, pid: int) -> list[Vma]:
        """The VMAs this pass saw: the core image's, or a predump's vmas image."""
        if self.exists("core", pid):
            return list(self.read_core(pid).vmas)
        target = self.file("vmas", pid)
        vmas = decode_entries(self._read_file(target), VMAS.magic, Vma, str(target))
        validate(str(target), *vmas)
        return vmas

    def write_tracker(self, pid: int, msg: TrackerState) -> None:
        self._write_msgs(TRACKER, pid, [msg])

    def read_tracker(self, pid: int) -> TrackerState | None:
        """The tracking state left by this pass, or None if it left none."""
        if not self.exists("tracker", pid):
            return None
        msg = self._read_one(TRACKER, pid)
        assert isinstance(msg, TrackerState)
        return msg

    def write_digests(self, pid: int, digests: bytes) -> None:
        self._write_msgs(DIGESTS, pid, [PageDigests(digests=digests)])

    def read_digests(self, pid: int) -> bytes | None:
        if not self.exists("digests", pid):
            return None
        msg = self._read_one(DIGESTS, pid)
        assert isinstance(msg, PageDigests)
        # one digest per page of this image's view (ckpt.actions.passes.view_digests)
        pages = sum(end - start for start, end in self.read_pagemap(pid)[1].covered) // PAGE_SIZE
        if len(msg.digests) != pages * DIGEST_SIZE:
            raise ImageError(f"{self.file('digests', pid)}: corrupted ({len(msg.digests)} "
                             f"bytes of digests for {pages} pages)")
        return msg.digests

    def write_pagemap(self, pid: int, head: PagemapHead, pagemap: Pagemap) -> None:
        """pagemap-<pid>.img: entry 0 is the PagemapHead, the rest PagemapRuns."""
        self._write_msgs(PAGEMAP, pid, [head, *encode(pagemap)])

    def read_pagemap(self, pid: int) -> tuple[PagemapHead, Pagemap]:
        """Decoded once per file version and process: a migration's rounds and a restore
        read the same parents again and again (callers must not modify the result)."""
        target = self.file("pagemap", pid)
        try:
            st = os.stat(target)
        except OSError:
            return self._read_pagemap(target, pid)
        key = (os.path.realpath(target), st.st_ino, st.st_size, st.st_mtime_ns, pid)
        hit = _PAGEMAPS.get(key)
        if hit is None:
            hit = self._read_pagemap(target, pid)
            if len(_PAGEMAPS) >= PAGEMAP_CACHE:
                _PAGEMAPS.pop(next(iter(_PAGEMAPS)))
            _PAGEMAPS[key] = hit
        return hit

    def _read_pagemap(self, target: Path, pid: int) -> tuple[PagemapHead, Pagemap]:
        name = str(target)
        payloads = decode_payloads(self._read_file(target), PAGEMAP.magic, name)
        if not payloads:
            raise ImageError(f"{name}: corrupted (no PagemapHead)")
        head = parse_entry(PagemapHead, payloads[0], name, 0)
        if head.pid != pid:
            raise ImageError(f"{name}: holds process {head.pid}, not {pid}")
        runs = [parse_entry(PagemapRuns, p, name, i) for i, p in enumerate(payloads[1:], 1)]
        validate(name, head, *runs)
        return head, decode(runs, name)

    @contextlib.contextmanager
    def pages_writer(
        self, pid: int, *, level: int = DEFAULT_LEVEL, threads: int = 0
    ) -> Iterator[PagesWriter]:
        """Yield a PagesWriter on a temp file, renamed into place when the block succeeds."""
        target = self.file("pages", pid)
        with self._writing(target) as f:
            writer = PagesWriter(f, name=str(target), level=level, threads=threads)
            yield writer
            writer.close()

    @contextlib.contextmanager
    def pages_reader(self, pid: int) -> Iterator[PagesReader]:
        """Yield a PagesReader on pages-<pid>.img."""
        target = self.file("pages", pid)
        try:
            f = open(target, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ImageError(f"image file {target} missing") from None
        except OSError as exc:
            raise ImageError(f"cannot read {target}: {_why(exc)}") from None
        with f:
            reader = PagesReader(f, str(target))
            try:
                yield reader
            finally:
                reader.close()

    # -- parent chain --------------------------------------------------------------------

    def check_pages(self, pid: int) -> int:
        """Walk pages-<pid>.img's chunk headers without decompressing: header, sizes and
        trailer must add up (checksums are verified when the pages are read). Returns the
        raw byte count."""
        target = self.file("pages", pid)
        try:
            with open(target, "rb") as f:
                return check_structure(f, str(target))
        except FileNotFoundError:
            raise ImageError(f"{target} is missing") from None
        except OSError as exc:
            raise ImageError(f"cannot read {target}: {_why(exc)}") from None

    def parent(self) -> ImageDir | None:
        """The parent images directory named by inventory.parent, or None."""
        rel = self.read_inventory().parent
        if not rel:
            return None
        p = self.path / rel
        try:
            found = (p / INVENTORY.template).is_file()
        except OSError as exc:  # e.g. a name too long once joined to this directory
            raise ImageError(f"parent images {rel!r:.80} (of {self.path}): {_why(exc)}") from None
        if not found:
            raise ImageError(f"parent images {p} (of {self.path}) missing")
        return ImageDir(p)


def image_chain(d: ImageDir) -> list[ImageDir]:
    """d and its ancestors, newest first; a loop in the chain is an ImageError."""
    chain = [d]
    seen = {os.path.realpath(d.path)}
    cur: ImageDir | None = d.parent()
    while cur is not None:
        real = os.path.realpath(cur.path)
        if real in seen:
            raise ImageError(f"parent chain of {d.path} loops back to {cur.path}")
        seen.add(real)
        chain.append(cur)
        cur = cur.parent()
    return chain


