"""Resolve a chain of images: which image holds the bytes of which page.

The newest pagemap decides which pages exist. Its PRESENT runs are its own; its
IN_PARENT runs are looked up in the parent's pagemap, whose PRESENT runs own them, and
whose IN_PARENT runs go one level further up:

    ck/3 (dump)     : |P3 P3|in in in|      |in|       (a gap is a hole: zeros)
    ck/2 (predump)  : |.. ..|P2|in in|      |P2|
    ck/1 (predump)  : |P1 P1 P1 P1 P1|P1 P1 P1 |
    owners          : |3  3 |2 |1  1 |      |2 |

A page the child says is in the parent but that the parent does not have, or a chain
that ends while pages are still wanted, is a broken chain: an ImageError, never zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt.errors import ImageError
from ckpt.images.imagedir import ImageDir, image_chain
from ckpt.images.pb.image_pb2 import PagemapEntry
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.ranges import Range, intersect, normalize, subtract, total

PRESENT = PagemapEntry.PRESENT
IN_PARENT = PagemapEntry.IN_PARENT


@dataclass(frozen=True)
class Layer:
    """One image of the chain and the pages whose bytes it supplies."""

    images: ImageDir
    stream: list[Range]  # its PRESENT runs in page-file order (= address order)
    owned: list[Range]  # the part of ``stream`` the restored process takes from it


def runs_with(entries: list[PagemapEntry], flag: int) -> list[Range]:
    return [(e.vaddr, e.vaddr + e.nr_pages * PAGE_SIZE) for e in entries if e.flags & flag]


def covered(entries: list[PagemapEntry]) -> list[Range]:
    """Pages that exist in this image's view (its own or its parents')."""
    return normalize(runs_with(entries, PRESENT | IN_PARENT))


def resolve(newest: ImageDir, pid: int) -> list[Layer]:
    """Layers of the chain from ``newest``, each with the pages it owns."""
    chain = image_chain(newest)
    _, entries = newest.read_pagemap(pid)
    own = runs_with(entries, PRESENT)
    layers = [Layer(newest, own, own)]
    need = normalize(runs_with(entries, IN_PARENT))
    child = newest
    for parent in chain[1:]:
        if not need:
            break
        _, pentries = parent.read_pagemap(pid)
        stream = runs_with(pentries, PRESENT)
        lacking = subtract(need, covered(pentries))
        if lacking:
            raise ImageError(f"broken parent chain: {child.path} says {total(lacking) // PAGE_SIZE}"
                             f" pages (first at {lacking[0][0]:#x}) are in {parent.path}, "
                             "which does not have them")
        layers.append(Layer(parent, stream, intersect(need, normalize(stream))))
        need = intersect(need, normalize(runs_with(pentries, IN_PARENT)))
        child = parent
    if need:
        raise ImageError(f"broken parent chain: {child.path} refers to a parent image for "
                         f"{total(need) // PAGE_SIZE} pages but has none")
    return layers


def parent_coverage(parent: ImageDir, pid: int) -> list[Range]:
    """What a new pass may mark IN_PARENT: every page that exists in the parent's view.

    The whole chain is resolved first, so a broken chain fails the dump, not the restore.
    """
    resolve(parent, pid)
    _, entries = parent.read_pagemap(pid)
    return covered(entries)

