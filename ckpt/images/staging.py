"""A new pass written beside the old one, which stays complete until the new one commits.

    new_pass(D)      D opened and checked once (ckpt.images.safedir.WritableDir); that fd
                     is used for every write, rename and unlink below, so swapping D (or a
                     parent) for a link afterwards redirects nothing
    write X          lands as ".X.new" (itself via ".X.new.tmp" and a rename)
    commit           the old inventory.img goes (the old pass is incomplete from here),
                     then the old pass's other images, then each ".X.new" is renamed to X,
                     the new inventory.img last                     (renames only: no I/O)
    abandon          the ".X.new" and temp files go: the old pass is untouched

    D before         inventory.img  core-7.img  pages-7.img
    D while writing  inventory.img  core-7.img  pages-7.img  .pages-9.img.new  .core-9.img.new
    D committed      inventory.img  core-9.img  pages-9.img            (core-7, pages-7 gone)

A failed pass (a target refused in the freeze, a full disk) leaves the old pass
restorable; only a crash inside commit leaves D without an inventory (incomplete, never
a mix of two passes). Staged files a crash left are removed when the next pass starts.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path

from ckpt.images.safedir import AtomicFile, WritableDir

STAGED = ".new"
INVENTORY_NAME = "inventory.img"


def staged_name(name: str) -> str:
    return f".{name}{STAGED}"


def final_name(staged: str) -> str | None:
    """The image a staged file becomes, or None for a file that is not staged."""
    if staged.startswith(".") and staged.endswith(STAGED) and len(staged) > len(STAGED) + 1:
        return staged[1:-len(STAGED)]
    return None


def is_image(name: str) -> bool:
    return name.endswith(".img") and not name.startswith(".")


class Staging:
    """The checked directory fd of a pass being written, and its staged files."""

    def __init__(self, out: WritableDir) -> None:
        """Use Staging.open."""
        self.out = out
        self._closer = weakref.finalize(self, out.close)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Staging:
        """Open and check ``path`` (OSError, or safedir.UnsafeDir); leftovers of a pass
        that crashed are removed."""
        st = cls(WritableDir.open(Path(path)))
        st.remove_staged()
        return st

    def create(self, name: str) -> AtomicFile:
        """A file that becomes ``name`` when the pass commits (raises OSError)."""
        return self.out.create(staged_name(name))

    def names(self) -> list[str]:
        return os.listdir(self.out.fd)

    def commit(self) -> None:
        """Replace the old pass by the staged one, inventory last (see the module doc)."""
        names = self.names()
        new = sorted(f for n in names if (f := final_name(n)) is not None)
        self.out.unlink(INVENTORY_NAME)
        for old in names:
            if is_image(old) and old not in new:
                self.out.unlink(old)
        for name in sorted(new, key=lambda n: n == INVENTORY_NAME):
            os.replace(staged_name(name), name, src_dir_fd=self.out.fd,
                       dst_dir_fd=self.out.fd)
        self.close()

    def remove_staged(self) -> None:
        """Every staged and temp file of a pass, through the checked fd: never a path."""
        for name in self.names():
            if final_name(name) is not None or (name.startswith(".") and
                                                name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    self.out.unlink(name)

    def close(self) -> None:
        self._closer()
