"""Dirty-page tracking backends behind one interface (see base.py)."""

from __future__ import annotations

from ckpt.errors import CkptError
from ckpt.images.pb import image_pb2
from ckpt.track.base import DirtySet, PassContext, Tracker
from ckpt.track.compare import CompareTracker
from ckpt.track.soft_dirty import SoftDirtyTracker
from ckpt.track.uffd_wp import UffdWpTracker

BACKENDS: dict[str, type[Tracker]] = {
    t.name: t for t in (UffdWpTracker, SoftDirtyTracker, CompareTracker)
}
PROBE_FEATURE = {"uffd-wp": ("uffd-wp-async", "pagemap-scan"), "soft-dirty": ("soft-dirty",),
                 "compare": ()}
CHOICES = ("auto", *BACKENDS)


def choose_backend(requested: str, prev: image_pb2.TrackerState | None) -> str:
    """The backend to use: as requested if the kernel really has it (probed), or for
    ``auto`` the parent's backend if any, else the best available."""
    from ckpt.kernel.probe import probe_once

    caps = probe_once()

    def available(name: str) -> bool:
        return all(caps.ok(f) for f in PROBE_FEATURE[name])

    if requested != "auto":
        if not available(requested):
            missing = [f for f in PROBE_FEATURE[requested] if not caps.ok(f)]
            details = "; ".join(f"{f}: {caps.get(f).detail}" for f in missing)
            raise CkptError(f"tracking backend {requested} is not available on this kernel "
                            f"({details})")
        return requested
    if prev is not None and prev.backend in BACKENDS and available(prev.backend):
        return prev.backend
    return next(name for name in BACKENDS if available(name))


def open_tracker(name: str, pid: int, prev: image_pb2.TrackerState | None) -> Tracker:
    return BACKENDS[name](pid, prev)


__all__ = ["BACKENDS", "CHOICES", "DirtySet", "PassContext", "Tracker", "choose_backend",
           "open_tracker"]
