"""Page data files (pages-<pid>.img): raw page bytes in checksummed zstd chunks.

    header  : b"CKPG" | u32 version                              (little endian)
    chunks  : u32 raw_len | u32 stored_len | one zstd frame      (repeated)
    trailer : u32 0 | u32 0 | u64 total_raw_bytes

Each frame holds up to CHUNK_SIZE raw bytes and carries its content size and checksum.

Chunks are independent frames, so both directions spread them over a small thread pool
(zstandard releases the GIL): the writer compresses the chunks of one write() call in
parallel and writes the frames in order before write() returns; the reader decompresses a
few chunks ahead of its consumer and yields them in file order, or (apply) has each
thread decompress a chunk into its own buffer and consume it there, in any order.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

HEADER = struct.Struct("<4sI")
CHUNK_HEAD = struct.Struct("<II")
TRAILER = struct.Struct("<Q")
# Upper bound of a frame for CHUNK_SIZE raw bytes (above ZSTD_compressBound).
MAX_STORED = CHUNK_SIZE + (CHUNK_SIZE >> 7) + 4096


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
        self._put(HEADER.pack(PAGES_MAGIC, PAGES_VERSION))

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
                self._put(CHUNK_HEAD.pack(len(chunk), len(frame)))
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
        self._put(CHUNK_HEAD.pack(0, 0) + TRAILER.pack(self._raw))
        try:
            self._f.flush()
            if self._own:
                self._f.close()
        except OSError as exc:
            raise ImageError(f"cannot write {self._name}: {exc.strerror or exc}") from None
