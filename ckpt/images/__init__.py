"""The image layer: reads and writes image files, never touches a live process."""

from ckpt.images.framing import (
    FORMAT_VERSION,
    decode_entries,
    decode_payloads,
    encode_entries,
    parse_entry,
)
from ckpt.images.imagedir import KINDS, ImageDir, ImageKind, image_chain
from ckpt.images.pages import CHUNK_SIZE, DEFAULT_LEVEL, PagesWriter
from ckpt.images.pages_reader import PagesReader

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "FORMAT_VERSION",
    "KINDS",
    "ImageDir",
    "ImageKind",
    "PagesReader",
    "PagesWriter",
    "decode_entries",
    "decode_payloads",
    "encode_entries",
    "image_chain",
    "parse_entry",
]
