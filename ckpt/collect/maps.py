"""/proc/PID/maps and /proc/PID/smaps: the address space as the kernel lists it.

Like every reader in ckpt.collect.proc, each takes ``pid`` and a keyword ``root``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt.collect.proc import PROT_EXEC, PROT_READ, PROT_WRITE, read_text


@dataclass(frozen=True)
class MapEntry:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "r-xp"
    prot: int  # PROT_READ | PROT_WRITE | PROT_EXEC
    shared: bool  # 's' in perms: MAP_SHARED
    offset: int
    dev: int  # os.makedev(major, minor)
    inode: int
    path: str  # "" for anonymous, "[heap]", "/lib/x.so", "/tmp/f (deleted)", ...

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def deleted(self) -> bool:
        return self.inode != 0 and self.path.endswith(" (deleted)")


def parse_maps_line(line: str) -> MapEntry:
    """Parse one /proc/PID/maps line (the path may contain spaces)."""
    parts = line.rstrip("\n").split(maxsplit=5)
    addr, perms, offset, dev, inode = parts[:5]
    start, _, end = addr.partition("-")
    major, _, minor = dev.partition(":")
    prot = (
        (PROT_READ if perms[0] == "r" else 0)
        | (PROT_WRITE if perms[1] == "w" else 0)
        | (PROT_EXEC if perms[2] == "x" else 0)
    )
    return MapEntry(
        start=int(start, 16),
        end=int(end, 16),
        perms=perms,
        prot=prot,
        shared=perms[3] == "s",
        offset=int(offset, 16),
        dev=os.makedev(int(major, 16), int(minor, 16)),
        inode=int(inode),
        path=parts[5] if len(parts) > 5 else "",
    )


def read_maps(pid: int, *, root: str = "/proc") -> list[MapEntry]:
    """Parse /proc/PID/maps (empty for a zombie)."""
    return [parse_maps_line(line) for line in read_text(pid, root, "maps").splitlines() if line]


_HEX_START = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class SmapsEntry:
    """Per-VMA accounting from /proc/PID/smaps; sizes in bytes."""

    start: int
    end: int
    rss: int
    anonymous: int
    swap: int
    vmflags: tuple[str, ...]


def read_smaps_vmflags(pid: int, *, root: str = "/proc", pkeys: dict[int, int] | None = None,
                       ) -> dict[int, tuple[str, ...]]:
    """VMA start -> VmFlags mnemonics ("rd", "wr", "mr", "dd", ...) from /proc/PID/smaps;
    with ``pkeys``, VMA start -> its memory protection key where not 0 is put there
    ("ProtectionKey:", shown on CPUs with PKU only).

    Only header lines (they start with a lowercase hex digit; field names start with an
    uppercase letter), "VmFlags:" and "ProtectionKey:" lines are looked at.
    """
    flags: dict[int, tuple[str, ...]] = {}
    start = -1
    for line in read_text(pid, root, "smaps").splitlines():
        if line[:1] in _HEX_START:
            start = int(line[: line.index("-")], 16)
        elif line.startswith("VmFlags:") and start >= 0:
            flags[start] = tuple(line[8:].split())
        elif (pkeys is not None and line.startswith("ProtectionKey:") and start >= 0
              and (key := int(line[14:]))):
            pkeys[start] = key
    return flags


_SMAPS_KEYS = {"Rss:": "rss", "Anonymous:": "anonymous", "Swap:": "swap"}


def read_smaps(pid: int, *, root: str = "/proc") -> list[SmapsEntry]:
    """Parse Rss/Anonymous/Swap and VmFlags of every VMA in /proc/PID/smaps."""
    vmas: list[tuple[int, int, dict[str, int], tuple[str, ...]]] = []
    for line in read_text(pid, root, "smaps").splitlines():
        if line[:1] in _HEX_START:
            lo, _, rest = line.partition("-")
            vmas.append((int(lo, 16), int(rest.split(maxsplit=1)[0], 16), {}, ()))
        elif not vmas:
            continue
        elif line.startswith("VmFlags:"):
            vmas[-1] = (*vmas[-1][:3], tuple(line[8:].split()))
        else:
            key, _, value = line.partition(" ")
            if key in _SMAPS_KEYS:
                vmas[-1][2][_SMAPS_KEYS[key]] = int(value.split()[0]) * 1024  # "   12 kB"
    return [SmapsEntry(lo, hi, kv.get("rss", 0), kv.get("anonymous", 0), kv.get("swap", 0), fl)
            for lo, hi, kv, fl in vmas]
