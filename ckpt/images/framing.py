"""Framed message files: a header, CRC-checked protobuf entries and a counting trailer.

header  : b"CKPT" | u32 kind-magic | u32 format-version      (little endian)
entries : u32 length | u32 crc32(payload) | payload           (repeated)
trailer : u32 0xFFFFFFFF | u32 number-of-entries
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ckpt.errors import ImageError

FORMAT_VERSION = 2  # 2: pagemap runs as packed arrays (PagemapRuns)
FILE_MAGIC = b"CKPT"
TRAILER_MARK = 0xFFFFFFFF

_HEADER = struct.Struct("<4sII")
_ENTRY = struct.Struct("<II")
_TRAILER = struct.Struct("<II")

M = TypeVar("M", bound=Message)

# kind-magic -> kind name, filled in by the kinds table (ckpt.images.imagedir).
_KIND_NAMES: dict[int, str] = {}


def register_kind(magic: int, kind: str) -> None:
    """Name a kind-magic so that errors can say which kind of image a file is."""
    other = _KIND_NAMES.get(magic)
    if other is not None and other != kind:
        raise ValueError(f"magic {magic:#x} already used by {other!r}")
    _KIND_NAMES[magic] = kind


def _kind_name(magic: int) -> str:
    return _KIND_NAMES.get(magic, f"unknown ({magic:#010x})")


def encode_entries(magic: int, msgs: Sequence[Message]) -> bytes:
    """Serialize msgs into one framed file image."""
    parts = [_HEADER.pack(FILE_MAGIC, magic, FORMAT_VERSION)]
    for msg in msgs:
        payload = msg.SerializeToString()
        if len(payload) >= TRAILER_MARK:
            raise ValueError(f"{type(msg).__name__} too large to frame ({len(payload)} bytes)")
        parts.append(_ENTRY.pack(len(payload), zlib.crc32(payload)))
        parts.append(payload)
    parts.append(_TRAILER.pack(TRAILER_MARK, len(msgs)))
    return b"".join(parts)


def decode_payloads(data: bytes, magic: int, name: str) -> list[bytes]:
    """Check a framed file (header, every CRC, trailer) and return the raw payloads."""
    if len(data) < _HEADER.size:
        if FILE_MAGIC.startswith(data[: len(FILE_MAGIC)]):
            raise ImageError(f"{name}: truncated (no header)")
        raise ImageError(f"{name}: not a ckpt image")
    file_magic, kind, version = _HEADER.unpack_from(data, 0)
    if file_magic != FILE_MAGIC:
        raise ImageError(f"{name}: not a ckpt image")
    if kind != magic:
        raise ImageError(f"{name}: is a {_kind_name(kind)} image, expected {_kind_name(magic)}")
    if version != FORMAT_VERSION:
        raise ImageError(
            f"{name}: unsupported image format version {version} (this ckpt reads "
            f"version {FORMAT_VERSION})"
        )
    view = memoryview(data)
    payloads: list[bytes] = []
    off = _HEADER.size
    end = len(data)
    while True:
        if off + _ENTRY.size > end:
            raise ImageError(f"{name}: truncated (no trailer after {len(payloads)} entries)")
        length, crc = _ENTRY.unpack_from(data, off)
        off += _ENTRY.size
        if length == TRAILER_MARK:
            break
        if off + length > end:
            raise ImageError(f"{name}: truncated (entry {len(payloads)} cut short)")
        payload = bytes(view[off : off + length])
        if zlib.crc32(payload) != crc:
            raise ImageError(f"{name}: corrupted (crc mismatch in entry {len(payloads)})")
        payloads.append(payload)
        off += length
    count = crc  # in the trailer, the second word is the entry count
    if count != len(payloads):
        raise ImageError(f"{name}: corrupted (trailer says {count} entries, found {len(payloads)})")
    if off != end:
        raise ImageError(f"{name}: corrupted ({end - off} bytes of trailing garbage)")
    return payloads


def parse_entry(cls: type[M], payload: bytes, name: str, index: int) -> M:
    """Parse one payload as cls; a failure is an ImageError naming the file."""
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise ImageError(
            f"{name}: corrupted (entry {index} is not a valid {cls.__name__}: {exc})"
        ) from None
    return msg


def decode_entries(data: bytes, magic: int, cls: type[M], name: str) -> list[M]:
    """Decode a framed file whose entries are all of type cls."""
    payloads = decode_payloads(data, magic, name)
    return [parse_entry(cls, p, name, i) for i, p in enumerate(payloads)]
