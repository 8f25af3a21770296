"""The checks of one field's value that ckpt.images.fields.FIELDS is made of:
each takes a value and says why it is out of range, or None.

    ranged(lo, hi)   one_of(...)   mask(allowed)   aligned(hi)     integers
    text(n)          path(...)     clean_path      hex_token       strings
    blob(n, ...)     siginfo                                      bytes
    finite                                                        doubles
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from ckpt.images.siginfo import SIGINFO_SIZE, signo
from ckpt.kernel.sys import PAGE_SIZE

USER_END = 1 << 56  # x86-64 user address space with 5-level paging (4-level: 1 << 47)
PATH_MAX = 4096
NAME_MAX = 255
NSIG = 64

Check = Callable[[Any], "str | None"]  # None: the value is fine; else why it is not


def ranged(lo: int, hi: int) -> Check:
    return lambda v: None if lo <= v <= hi else f"not in {lo}..{hi}"


def one_of(*allowed: object) -> Check:
    return lambda v: None if v in allowed else f"not one of {', '.join(map(repr, allowed))}"


def aligned(hi: int = USER_END) -> Check:
    return lambda v: (None if v % PAGE_SIZE == 0 and v <= hi
                      else f"not a page-aligned address below {hi:#x}")


def text(max_len: int = PATH_MAX) -> Check:
    def check(v: str) -> str | None:
        if "\0" in v:
            return "holds a NUL byte"
        if len(v.encode(errors="surrogateescape")) > max_len:
            return f"longer than {max_len} bytes"
        return None
    return check


def path(*, absolute: bool) -> Check:
    """A file name the kernel can take: no NUL, at most PATH_MAX, components at most
    NAME_MAX; ``absolute``: starts with "/" (empty is allowed: not recorded)."""
    def check(v: str) -> str | None:
        if why := text()(v):
            return why
        if v and absolute and not v.startswith("/"):
            return "not an absolute path"
        if any(len(part.encode(errors="surrogateescape")) > NAME_MAX for part in v.split("/")):
            return f"has a path component longer than {NAME_MAX} bytes"
        return None
    return check


def clean_path(v: str) -> str | None:
    """An absolute path in normal form (no "..", ".", "//"): what a restore makes a file
    in or joins to a root of its own must not climb out of it."""
    if why := path(absolute=True)(v):
        return why
    if not v.startswith("/") or os.path.normpath(v) != v or v.startswith("//"):
        return "not an absolute path in normal form (no '..', '.' or '//')"
    return None


def mask(allowed: int, what: str) -> Check:
    return lambda v: None if not v & ~allowed else f"not a mask of {what}"


def blob(max_len: int, multiple: int = 1, exact: int | None = None) -> Check:
    def check(v: bytes) -> str | None:
        if exact is not None and len(v) != exact:
            return f"{len(v)} bytes, not {exact}"
        if len(v) > max_len or len(v) % multiple:
            return f"{len(v)} bytes (at most {max_len}, a multiple of {multiple})"
        return None
    return check


def finite(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "not a finite number >= 0"


def siginfo(v: bytes) -> str | None:
    if len(v) != SIGINFO_SIZE:
        return f"{len(v)} bytes, not a {SIGINFO_SIZE}-byte siginfo"
    n = signo(v)
    return None if 1 <= n <= NSIG else f"siginfo of signal {n}"


def hex_token(v: str) -> str | None:
    ok = len(v) <= 64 and all(c in "0123456789abcdef" for c in v)
    return None if ok else "not a hex token"
