"""One interface for dirty-page tracking; backends in sibling modules.

A pass (predump or incremental dump) runs with the target frozen:

    tracker = open_tracker(name, pid, state)   # state from the parent's tracker.img
    dirty = tracker.begin(ctx)                 # what changed since the last pass, and
                                               # tracking re-armed: protect before copying
                                               # (claimed first, atomically: ledger.py)
    ...copy (frozen, or after thaw for predump)...
    tracker.end(ctx, keep=...)                 # keep armed for a next pass, or leave no
                                               # trace in the target (final dump)
    save tracker.state() as tracker.img

The VMA rule (the kernel's VM_SOFTDIRTY, the seed of this project): a VMA that is new,
moved, replaced in place, grown, or no longer tracked is copied whole, because its
per-page history is gone. Every backend reports such ranges in ``DirtySet.whole``; a
backend that cannot prove a range clean reports it dirty.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from ckpt.collect import proc
from ckpt.collect.vmas import VmaInfo
from ckpt.freeze.seize import Frozen
from ckpt.images.pb import image_pb2
from ckpt.track import ledger

Range = tuple[int, int]  # [start, end), page aligned


@dataclass
class PassContext:
    pid: int
    frozen: Frozen | None  # every thread stopped (syscalls may be injected), or running
    vmas: list[VmaInfo]  # current VMAs of the target


@dataclass
class DirtySet:
    """What a pass must copy, beyond pages the parent chain lacks."""

    dirty: list[Range] = field(default_factory=list)  # written since the last pass
    whole: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, why)
    all_dirty: str = ""  # non-empty: every page counts as dirty, and this says why
    compare: bool = False  # dedupe copied pages against the parent's bytes (compare)
    # Pages never gain data or lose it without showing in ``dirty`` or ``whole`` (uffd-wp:
    # MADV_DONTNEED reads as written, a read fault maps zeros). Soft-dirty cannot say
    # this: a dropped page reads clean.
    tracks_existence: bool = False
    # With tracks_existence: which pages of ``dirty`` and ``whole`` hold data now.
    changed_data: list[Range] = field(default_factory=list)


class Tracker(abc.ABC):
    name: str = ""

    def __init__(self, pid: int, state: image_pb2.TrackerState | None) -> None:
        self.pid = pid
        self.prev = state
        self.start_time = proc.read_stat(pid).starttime
        ledger.prune()  # records of processes that are gone, while nothing is frozen
        self.token = ""  # this pass's, once it claimed the tracking (ledger.py)
        self._displaced = ""  # the token its claim replaced
        self._continuity: str | None = None

    # begin() must see the target frozen (reading and re-arming are two steps).
    begin_needs_freeze = True
    # begin() re-arms: what is written after it shows in the next begin(). Compare arms
    # nothing (it compares bytes instead).
    arms = True
    # begin() reads VmFlags that change without the VMA changing (soft-dirty's "sd").
    needs_fresh_vmflags = False

    def prepare_needs_freeze(self) -> bool:
        """Must prepare() run with the target frozen (e.g. to inject a syscall)?"""
        return False

    def prepare(self, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Set up what begin() needs; runs frozen if prepare_needs_freeze() said so."""

    def begin(self, ctx: PassContext) -> DirtySet:
        """Report what changed since the previous pass and re-arm tracking, before any
        page is copied (protect before copying). A backend that arms claims the tracking
        first (ledger.py), whatever it does next: a pass that fails half-way has consumed
        its parent's state all the same."""
        if self.arms:
            self.continuity()
        return self._begin(ctx)

    @abc.abstractmethod
    def _begin(self, ctx: PassContext) -> DirtySet:
        """The backend's begin(), the tracking already claimed where it arms."""

    def end(self, ctx: PassContext, keep: bool) -> None:  # noqa: B027 - optional hook
        """Frozen: keep tracking for a next pass, or remove every trace of it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release ckpt's own resources; called after the target was thawed."""

    def continuity(self) -> str:
        """'' if the previous pass's state is this backend's, for this very process
        (pid and start time), and no other pass consumed the tracking since; else why it
        cannot be trusted. Deciding it claims the tracking for this pass where the
        backend arms (ledger.claim: check and claim in one atomic step), so of two passes
        from one parent only one can trust it. Decided once."""
        if self._continuity is None:
            previous = self.claim() if self.arms else None
            self._continuity = self._check_continuity(previous)
        return self._continuity

    def _check_continuity(self, previous: str | None) -> str:
        """``previous``: the token this pass displaced from the ledger (None: the
        backend arms nothing and consumes nothing)."""
        st = self.prev
        if st is None:
            return "first pass"
        if st.backend != self.name:
            return f"previous pass tracked with {st.backend}"
        if st.pid != self.pid or st.start_time != self.start_time:
            return "tracking state belongs to another process"
        if previous is not None and (not st.pass_token or st.pass_token != previous):
            return ("tracking state consumed by another pass since this parent (a later, "
                    "failed or parallel predump/dump)")
        return ""

    def claim(self) -> str:
        """Record, before the first read that re-arms, that this pass consumes the
        tracking (the parent's state is not to be trusted again after this); return the
        token of the pass that consumed it before. Claims once."""
        if not self.token:
            token = ledger.new_token()
            self._displaced = ledger.claim(self.pid, self.start_time, token)
            self.token = token
        return self._displaced

    def forget(self) -> None:
        """The process is gone: drop its ledger record."""
        ledger.forget(self.pid, self.start_time)

    def state(self) -> image_pb2.TrackerState:
        return image_pb2.TrackerState(backend=self.name, pid=self.pid,
                                      start_time=self.start_time, pass_token=self.token)
