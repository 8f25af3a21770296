"""Reading page files (format and writer: ckpt.images.pages): every frame and the
trailer verified, chunks decompressed on a few threads (zstandard releases the GIL)."""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Protocol

import zstandard

from ckpt.errors import ImageError, KernelError
from ckpt.images.pages import (
    CHUNK_HEAD,
    CHUNK_SIZE,
    DEFAULT_WORKERS,
    HEADER,
    MAX_STORED,
    PAGES_MAGIC,
    PAGES_VERSION,
    TRAILER,
)
from ckpt.kernel.sys import REMOTE_FS, fs_type

Frame = bytes | memoryview  # a stored zstd frame (a view of the mapped file, mostly)
Want = Callable[[int, int], bool]  # (raw offset, raw length) of a chunk -> read it?
# (raw offset of a chunk, its bytes, their address): called on a reader thread; the bytes
# are valid during the call only
Sink = Callable[[int, memoryview, int], None]


class Source(Protocol):
    def read(self, n: int, /) -> bytes | memoryview: ...
    def seek(self, n: int, whence: int, /) -> int: ...


class Mapped:
    """A regular file read through a read-only shared mapping of it: every read is a view
    of the page cache, no copy and no fresh buffer per frame."""

    def __init__(self, f: BinaryIO) -> None:
        self._pos = f.tell()
        self._map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self._view = memoryview(self._map)

    @classmethod
    def of(cls, f: BinaryIO) -> Source:
        """``f`` mapped when it is a non-empty regular file on a local filesystem, else
        ``f`` itself: on a network or FUSE one, an I/O error under a mapping is a SIGBUS
        that would kill ckpt, where a read raises and ends in one error line."""
        try:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size and fs_type(f.fileno()) not in REMOTE_FS:
                return cls(f)
        except (OSError, ValueError, AttributeError, KernelError):  # no fd, or not mappable
            pass
        return f

    def read(self, n: int, /) -> memoryview:
        out = self._view[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def seek(self, n: int, whence: int, /) -> int:
        assert whence == os.SEEK_CUR
        self._pos += n
        return self._pos

    def close(self) -> None:
        """Unmap now rather than at garbage collection (views still held elsewhere, say
        by a traceback, keep it mapped until they go)."""
        view, self._view = self._view, memoryview(b"")
        try:
            view.release()
            self._map.close()
        except BufferError:
            pass


class PagesReader:
    """Reads a page file written by PagesWriter, verifying every frame and the trailer."""

    def __init__(self, f: BinaryIO, name: str, *, workers: int | None = None) -> None:
        """workers: chunks decompressed at once, ahead of the consumer (default
        DEFAULT_WORKERS; 1: inline). A regular file is read through a mapping (Mapped)."""
        self._f = Mapped.of(f)
        self._name = name
        self._workers = max(1, workers or DEFAULT_WORKERS)
        self._local = threading.local()  # one decompressor per thread (not thread-safe)

    def close(self) -> None:
        """Release the page file's mapping (the file itself is the caller's)."""
        if isinstance(self._f, Mapped):
            self._f.close()

    def _read(self, n: int, what: str) -> Frame:
        data = self._f.read(n)
        while len(data) < n:  # raw (unbuffered) files may return short reads
            more = self._f.read(n - len(data))
            if not more:
                raise ImageError(f"{self._name}: truncated ({what} cut short)")
            data = bytes(data) + more
        return data

    def _corrupted(self, why: str) -> ImageError:
        return ImageError(f"{self._name}: corrupted ({why})")

    def _frames(self, want: Want | None = None) -> Iterator[tuple[int, int, Frame | None]]:
        """(index, raw_len, frame) of every chunk; checks header, chunk headers, trailer.
        With ``want``, chunks it declines (by raw offset and length) are seeked over: their
        frame is None."""
        head = self._f.read(HEADER.size)
        if len(head) < HEADER.size and PAGES_MAGIC.startswith(head[:4]):
            raise ImageError(f"{self._name}: truncated (no header)")
        magic, version = HEADER.unpack(head) if len(head) == HEADER.size else (b"", 0)
        if magic != PAGES_MAGIC:
            raise ImageError(f"{self._name}: not a ckpt page file")
        if version != PAGES_VERSION:
            raise ImageError(
                f"{self._name}: unsupported page file version {version} (this ckpt reads "
                f"version {PAGES_VERSION})"
            )
        total = 0
        index = 0
        while True:
            raw_len, stored_len = CHUNK_HEAD.unpack(self._read(CHUNK_HEAD.size, "chunk header"))
            if raw_len == 0 and stored_len == 0:
                break
            if not 0 < raw_len <= CHUNK_SIZE or not 0 < stored_len <= MAX_STORED:
                raise self._corrupted(f"bad header of chunk {index}")
            if want is None or want(total, raw_len):
                yield index, raw_len, self._read(stored_len, f"chunk {index}")
            else:
                self._f.seek(stored_len, os.SEEK_CUR)
                yield index, raw_len, None
            total += raw_len
            index += 1
        (expected,) = TRAILER.unpack(self._read(TRAILER.size, "trailer"))
        if expected != total:
            raise self._corrupted(f"trailer says {expected} bytes, chunks hold {total}")
        if self._f.read(1):
            raise self._corrupted("trailing garbage after the trailer")

    def _decode(self, index: int, raw_len: int, frame: Frame) -> bytes:
        """Decompress and check one frame (on any thread)."""
        out = bytearray(raw_len)
        self._decode_into(index, raw_len, frame, memoryview(out))
        return bytes(out)

    def _decode_into(self, index: int, raw_len: int, frame: Frame, out: memoryview) -> None:
        """Decompress and check one frame into ``out`` (on any thread)."""
        zd = getattr(self._local, "zd", None)
        if zd is None:
            zd = self._local.zd = zstandard.ZstdDecompressor()
        try:
            size = zstandard.frame_content_size(frame)
            if size != raw_len:
                raise self._corrupted(f"chunk {index} holds {size} bytes, not {raw_len}")
            reader = zd.stream_reader(frame, read_across_frames=False)
            got = 0
            while got < raw_len:
                n = reader.readinto(out[got:raw_len])
                if not n:
                    break
                got += n
            if got != raw_len or reader.read(1):  # read on: the frame's checksum is checked
                raise self._corrupted(f"chunk {index} does not hold {raw_len} bytes")
        except zstandard.ZstdError as exc:
            raise self._corrupted(f"chunk {index}: {exc}") from None

    def apply(self, sink: Sink, want: Want | None = None) -> int:
        """Hand every chunk ``want`` accepts (all, without it) to ``sink``, on ``workers``
        threads at once (the caller's among them) and in no particular order. Each thread
        decompresses into its own reused, pre-faulted buffer: a fresh one per chunk costs
        more in page faults than the decompression. Returns the raw bytes of the whole
        stream (declined chunks included). The first failure, in file order, is raised
        once every thread stopped."""
        lock = threading.Lock()
        frames = self._frames(want)
        pos = [0, 0]  # raw offset of the next chunk, chunks handed out
        errors: list[tuple[int, BaseException]] = []

        def take() -> tuple[int, int, int, Frame] | None:
            with lock:
                while not errors:
                    try:
                        item = next(frames, None)
                    except BaseException as exc:
                        errors.append((pos[1], exc))
                        return None
                    if item is None:
                        return None
                    index, raw_len, frame = item
                    at = pos[0]
                    pos[0] += raw_len
                    pos[1] += 1
                    if frame is not None:
                        return index, at, raw_len, frame
                return None

        def work() -> None:
            buf = mmap.mmap(-1, CHUNK_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | mmap.MAP_POPULATE)
            view = memoryview(buf)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # buf lives on (GC)
            while (item := take()) is not None:
                index, at, raw_len, frame = item
                try:
                    self._decode_into(index, raw_len, frame, view)
                    sink(at, view[:raw_len], addr)
                except BaseException as exc:
                    with lock:
                        errors.append((index, exc))
                    return

        if self._workers < 2:
            work()
        else:
            with ThreadPoolExecutor(self._workers - 1, thread_name_prefix="ckpt-unzstd") as pool:
                helpers = [pool.submit(work) for _ in range(self._workers - 1)]
                work()
                for h in helpers:
                    h.result()
        if errors:
            raise min(errors, key=lambda e: e[0])[1]
        return pos[0]

    def iter_chunks(self) -> Iterator[bytes]:
        """Yield the decompressed chunks in file order.

        Errors come in file order too: a bad chunk or trailer is raised after every chunk
        before it was yielded, as if the file were read one chunk at a time.
        """
        for _, data in self.iter_sparse(None):
            assert data is not None
            yield data

    def iter_sparse(self, want: Want | None) -> Iterator[tuple[int, bytes | None]]:
        """(raw_len, data) of every chunk in file order, data None for the chunks ``want``
        declines: those are neither read nor decompressed (nor checked: only the chunk
        headers and the trailer are)."""
        if self._workers < 2:
            for index, raw_len, frame in self._frames(want):
                yield raw_len, None if frame is None else self._decode(index, raw_len, frame)
            return
        pending: deque[tuple[int, Future[bytes] | None]] = deque()
        item: tuple[int, int, Frame | None] | None
        failure: ImageError | None = None
        pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ckpt-unzstd")

        def out(raw_len: int, job: Future[bytes] | None) -> tuple[int, bytes | None]:
            return raw_len, None if job is None else job.result()

        try:
            frames = self._frames(want)
            while True:
                try:
                    item = next(frames, None)
                except ImageError as exc:  # raise it once the chunks before it are out
                    failure = exc
                    item = None
                if item is None:
                    break
                index, raw_len, frame = item
                pending.append((raw_len, None if frame is None else
                                pool.submit(self._decode, index, raw_len, frame)))
                if len(pending) > 2 * self._workers:
                    yield out(*pending.popleft())
            while pending:
                yield out(*pending.popleft())
            if failure is not None:
                raise failure
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def check_structure(f: BinaryIO, name: str) -> int:
    """Walk a page file's chunk headers without decompressing: header, sizes and trailer
    must add up (frame checksums are verified when pages are read). Returns raw bytes."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(HEADER.size)
    if len(head) < HEADER.size or HEADER.unpack(head)[0] != PAGES_MAGIC:
        raise ImageError(f"{name}: not a ckpt page file")
    raw = 0
    while True:
        chunk = f.read(CHUNK_HEAD.size)
        if len(chunk) < CHUNK_HEAD.size:
            raise ImageError(f"{name}: truncated")
        raw_len, stored_len = CHUNK_HEAD.unpack(chunk)
        if raw_len == 0 and stored_len == 0:
            tail = f.read(TRAILER.size)
            if len(tail) < TRAILER.size or TRAILER.unpack(tail)[0] != raw:
                raise ImageError(f"{name}: truncated or corrupted trailer")
            return raw
        if f.seek(stored_len, os.SEEK_CUR) > size:
            raise ImageError(f"{name}: truncated")
        raw += raw_len
