"""Page data files (pages-<pid>.img): raw page bytes in checksummed zstd chunks.

    header  : b"CKPG" | u32 version                              (little endian)
    chunks  : u32 raw_len | u32 stored_len | one zstd frame      (repeated)
    trailer : u32 0 | u32 0 | u64 total_raw_bytes

Each frame holds up to CHUNK_SIZE raw bytes and carries its content size and checksum.

Chunks are independent frames, so both directions spread them over a small thread pool
(zstandard releases the GIL): the writer compresses the chunks of one write() call in
parallel and writes the frames in order before write() returns; the reader decompresses a
few chunks ahead of its consumer and yields them in file order.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import zstandard

from ckpt.errors import ImageError

PAGES_MAGIC = b"CKPG"
PAGES_VERSION = 1
CHUNK_SIZE = 4 << 20
# Level 1 measured ~640 MiB/s on high-entropy page data (ratio 1.55), ~2 GiB/s on
# zero/text-heavy data; level -1 is ~2.4x faster on the former at ratio 1.33.
# On bench/dump_restore.py's mix (20% zero, 40% random, 40% log-text pages), per core:
#   level -1: 0.70 GB/s compress, 1.58 GB/s decompress, ratio 1.85
#   level  1: 0.52 GB/s compress, 1.25 GB/s decompress, ratio 1.89
# so -1 is the default: the target stays frozen while pages are compressed.
DEFAULT_LEVEL = -1
# Threads compressing/decompressing chunks (1: inline, no pool).
DEFAULT_WORKERS = max(1, min(4, len(os.sched_getaffinity(0))))

_HEADER = struct.Struct("<4sI")
_CHUNK = struct.Struct("<II")
_TOTAL = struct.Struct("<Q")
# Upper bound of a frame for CHUNK_SIZE raw bytes (above ZSTD_compressBound).
_MAX_STORED = CHUNK_SIZE + (CHUNK_SIZE >> 7) + 4096


class PagesWriter:
    """Appends raw bytes to a page file, compressing them CHUNK_SIZE at a time."""

    def __init__(
        self,
        out: BinaryIO | int,
        *,
        name: str = "pages image",
        level: int = DEFAULT_LEVEL,
        threads: int = 0,
        workers: int | None = None,
    ) -> None:
        """out: a binary file object or an fd (not closed here); name is used in errors.

        threads: zstd's own worker threads per frame; workers: chunks compressed at once
        (default DEFAULT_WORKERS; ignored when threads is set).
        """
        self._own = isinstance(out, int)
        # an fd gets a buffered wrapper (closed in close(); the fd itself stays open)
        self._f: BinaryIO = (
            open(out, "wb", closefd=False) if isinstance(out, int) else out  # noqa: SIM115
        )
        self._name = name
        self._level, self._threads = level, threads
        self._zc = self._new_compressor()
        self._workers = 1 if threads else max(1, workers or DEFAULT_WORKERS)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # one compressor per pool thread (not thread-safe)
        self._buf = bytearray()
        self._raw = 0
        self._stored = 0
        self._closed = False
        self._put(_HEADER.pack(PAGES_MAGIC, PAGES_VERSION))

    @property
    def raw_bytes(self) -> int:
        """Raw (uncompressed) bytes accepted so far."""
        return self._raw

    @property
    def stored_bytes(self) -> int:
        """Bytes written to the file so far, framing included."""
        return self._stored

    def _put(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise ImageError(f"cannot write {self._name}: {exc.strerror or exc}") from None
        self._stored += len(data)

    def _new_compressor(self) -> zstandard.ZstdCompressor:
        return zstandard.ZstdCompressor(level=self._level, threads=self._threads,
                                        write_checksum=True, write_content_size=True)

    def _compress(self, chunk: bytes | bytearray | memoryview) -> bytes:
        """Runs on a pool thread."""
        zc = getattr(self._local, "zc", None)
        if zc is None:
            zc = self._local.zc = self._new_compressor()
        frame: bytes = zc.compress(chunk)
        return frame

    def _emit(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        """Compress ``chunks`` (in parallel when there are several) and write them in order.

        Returns only once every frame is written, so the caller may reuse its buffers.
        """
        if len(chunks) < 2 or self._workers < 2:
            frames: Iterator[bytes] = (self._zc.compress(c) for c in chunks)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ckpt-zstd")
            futures = [self._pool.submit(self._compress, c) for c in chunks]
            frames = (f.result() for f in futures)
        try:
            for chunk, frame in zip(chunks, frames, strict=True):
                self._put(_CHUNK.pack(len(chunk), len(frame)))
                self._put(frame)
        except BaseException:
            if self._pool is not None:  # stop queued work; running chunks finish first
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            raise

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append raw bytes; full chunks are compressed and written before this returns."""
        if self._closed:
            raise ValueError(f"{self._name}: write after close")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
            mv = mv.cast("B")
        self._raw += mv.nbytes
        chunks: list[bytes | bytearray | memoryview] = []
        if self._buf:
            take = min(CHUNK_SIZE - len(self._buf), mv.nbytes)
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) < CHUNK_SIZE:
                return
            chunks.append(self._buf)
            self._buf = bytearray()
        while mv.nbytes >= CHUNK_SIZE:
            chunks.append(mv[:CHUNK_SIZE])
            mv = mv[CHUNK_SIZE:]
        if mv.nbytes:
            self._buf += mv
        self._emit(chunks)

    def close(self) -> None:
        """Write the last partial chunk and the trailer, then flush (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._buf:
                self._emit([self._buf])
                self._buf = bytearray()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self._put(_CHUNK.pack(0, 0) + _TOTAL.pack(self._raw))
        try:
            self._f.flush()
            if self._own:
                self._f.close()
        except OSError as exc:
            raise ImageError(f"cannot write {self._name}: {exc.strerror or exc}") from None


Want = Callable[[int, int], bool]  # (raw offset, raw length) of a chunk -> read it?


class PagesReader:
    """Reads a page file written by PagesWriter, verifying every frame and the trailer."""

    def __init__(self, f: BinaryIO, name: str, *, workers: int | None = None) -> None:
        """workers: chunks decompressed at once, ahead of the consumer (default
        DEFAULT_WORKERS; 1: inline)."""
        self._f = f
        self._name = name
        self._workers = max(1, workers or DEFAULT_WORKERS)
        self._local = threading.local()  # one decompressor per thread (not thread-safe)

    def _read(self, n: int, what: str) -> bytes:
        data = self._f.read(n)
        while len(data) < n:  # raw (unbuffered) files may return short reads
            more = self._f.read(n - len(data))
            if not more:
                raise ImageError(f"{self._name}: truncated ({what} cut short)")
            data += more
        return data

    def _corrupted(self, why: str) -> ImageError:
        return ImageError(f"{self._name}: corrupted ({why})")

    def _frames(self, want: Want | None = None) -> Iterator[tuple[int, int, bytes | None]]:
        """(index, raw_len, frame) of every chunk; checks header, chunk headers, trailer.
        With ``want``, chunks it declines (by raw offset and length) are seeked over: their
        frame is None."""
        head = self._f.read(_HEADER.size)
        if len(head) < _HEADER.size and PAGES_MAGIC.startswith(head[:4]):
            raise ImageError(f"{self._name}: truncated (no header)")
        magic, version = _HEADER.unpack(head) if len(head) == _HEADER.size else (b"", 0)
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
            raw_len, stored_len = _CHUNK.unpack(self._read(_CHUNK.size, "chunk header"))
            if raw_len == 0 and stored_len == 0:
                break
            if not 0 < raw_len <= CHUNK_SIZE or not 0 < stored_len <= _MAX_STORED:
                raise self._corrupted(f"bad header of chunk {index}")
            if want is None or want(total, raw_len):
                yield index, raw_len, self._read(stored_len, f"chunk {index}")
            else:
                self._f.seek(stored_len, os.SEEK_CUR)
                yield index, raw_len, None
            total += raw_len
            index += 1
        (expected,) = _TOTAL.unpack(self._read(_TOTAL.size, "trailer"))
        if expected != total:
            raise self._corrupted(f"trailer says {expected} bytes, chunks hold {total}")
        if self._f.read(1):
            raise self._corrupted("trailing garbage after the trailer")

    def _decode(self, index: int, raw_len: int, frame: bytes) -> bytes:
        """Decompress and check one frame (on any thread)."""
        zd = getattr(self._local, "zd", None)
        if zd is None:
            zd = self._local.zd = zstandard.ZstdDecompressor()
        try:
            size = zstandard.frame_content_size(frame)
            if size != raw_len:
                raise self._corrupted(f"chunk {index} holds {size} bytes, not {raw_len}")
            data: bytes = zd.decompress(frame)
        except zstandard.ZstdError as exc:
            raise self._corrupted(f"chunk {index}: {exc}") from None
        if len(data) != raw_len:
            raise self._corrupted(f"chunk {index} holds {len(data)} bytes, not {raw_len}")
        return data

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
        item: tuple[int, int, bytes | None] | None
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
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or _HEADER.unpack(head)[0] != PAGES_MAGIC:
        raise ImageError(f"{name}: not a ckpt page file")
    raw = 0
    while True:
        chunk = f.read(_CHUNK.size)
        if len(chunk) < _CHUNK.size:
            raise ImageError(f"{name}: truncated")
        raw_len, stored_len = _CHUNK.unpack(chunk)
        if raw_len == 0 and stored_len == 0:
            tail = f.read(_TOTAL.size)
            if len(tail) < _TOTAL.size or _TOTAL.unpack(tail)[0] != raw:
                raise ImageError(f"{name}: truncated or corrupted trailer")
            return raw
        if f.seek(stored_len, os.SEEK_CUR) > size:
            raise ImageError(f"{name}: truncated")
        raw += raw_len
