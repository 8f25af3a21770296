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

Each pass has a random identity (inventory.image_id) and records its parent's
(inventory.parent_id). A parent directory that now holds another pass -- predump run
into it again with --overwrite, a directory renamed or replaced by a symlink -- would
resolve pages to bytes the child never saw: such a chain is refused (parent_mismatch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt.errors import ImageError
from ckpt.images.imagedir import ImageDir, image_chain
from ckpt.images.pagemap import Pagemap
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.ranges import Range, intersect, subtract, total


@dataclass(frozen=True)
class Layer:
    """One image of the chain and the pages whose bytes it supplies."""

    images: ImageDir
    stream: list[Range]  # its PRESENT runs in page-file order (= address order)
    owned: list[Range]  # the part of ``stream`` the restored process takes from it


def resolve(newest: ImageDir, pid: int) -> list[Layer]:
    """Layers of the chain from ``newest``, each with the pages it owns. The chain is
    checked first (check_chain), so every page wanted is found on the way up."""
    images = check_chain(newest, pid)
    _, pm = newest.read_pagemap(pid)
    layers = [Layer(newest, pm.present, pm.present)]
    need = pm.in_parent
    for parent in images[1:]:
        if not need:
            break
        _, ppm = parent.read_pagemap(pid)
        layers.append(Layer(parent, ppm.present, intersect(need, ppm.present)))
        need = intersect(need, ppm.in_parent)
    return layers


def parent_coverage(parent: ImageDir, pid: int) -> list[Range]:
    """What a new pass may mark IN_PARENT: every page that exists in the parent's view.

    The whole chain is checked first, so a broken chain fails the dump, not the restore.
    """
    check_chain(parent, pid)
    _, pm = parent.read_pagemap(pid)
    return pm.covered


def check_chain(newest: ImageDir, pid: int) -> list[ImageDir]:
    """Every image's IN_PARENT pages exist in its parent's view, and the oldest image has
    none: then every page of ``newest`` resolves. A pair is checked once per process
    while its pagemaps are unchanged, so a migration's rounds do not check the whole
    chain again each time. Returns the chain, newest first."""
    images = image_chain(newest)
    for child, parent in zip(images, [*images[1:], None], strict=True):
        if parent is not None:
            why = parent_mismatch(_shown(child), child.read_inventory().parent_id,
                                  _shown(parent), parent.read_inventory().image_id)
            if why:
                raise ImageError(why)
        _, pm = child.read_pagemap(pid)
        if parent is None or (not pm.in_parent and not parent.exists("pagemap", pid)):
            # the end of the chain for this process (a tree's member new in ``child``)
            if pm.in_parent:
                raise ImageError(f"broken parent chain: {child.path} refers to a parent image "
                                 f"for {total(pm.in_parent) // PAGE_SIZE} pages but has none")
            return images[:images.index(child) + 1]
        _, ppm = parent.read_pagemap(pid)
        key = (id(pm), id(ppm))
        if key in _CHECKED:
            continue
        lacking = subtract(pm.in_parent, ppm.covered)
        if lacking:
            raise ImageError(f"broken parent chain: {child.path} says {total(lacking) // PAGE_SIZE}"
                             f" pages (first at {lacking[0][0]:#x}) are in {parent.path}, "
                             "which does not have them")
        if len(_CHECKED) >= 256:
            _CHECKED.clear()
        _CHECKED[key] = (pm, ppm)  # holding both keeps their ids from being reused
    return images  # pragma: no cover - the loop returns at the chain's end


_CHECKED: dict[tuple[int, int], tuple[Pagemap, Pagemap]] = {}


def parent_mismatch(child: str, recorded: str, parent: str, actual: str) -> str:
    """'' if ``parent`` (its image_id ``actual``) is the pass ``child`` was dumped
    against (the parent_id it ``recorded``), else why the chain is refused."""
    if not recorded:
        return (f"broken parent chain: {child} records no identity of its parent {parent} "
                "(written by an older ckpt): cannot tell whether it is the pass it was "
                "dumped against")
    if recorded != actual:
        return (f"broken parent chain: {parent} is not the pass {child} was dumped against "
                f"(it expects pass {recorded[:12]}, {parent} holds "
                f"{actual[:12] or 'a pass without identity'}): the parent was rewritten, "
                "replaced or moved since")
    return ""


def _shown(d: ImageDir) -> str:
    return os.path.normpath(d.path)

