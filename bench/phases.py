"""Timers around ckpt's functions, for the benchmarks' frozen-window breakdowns.

    with Phases().installed() as ph:
        dump(...)                        # any ckpt call
    ph.report("dump", frozen_ms)         # the frozen window, split into nested phases

Functions are wrapped from the benchmark process for the duration of one ckpt call only,
so nothing in ckpt/ changes; a name ckpt no longer has is reported once and skipped.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ckpt.actions.dump as dump_mod
import ckpt.actions.passes as passes_mod
import ckpt.actions.predump as predump_mod
import ckpt.collect.files as files_mod
import ckpt.collect.tasks as tasks_mod
import ckpt.collect.vmas as vmas_mod
import ckpt.kernel.pagemap as pm
import ckpt.kernel.uffd as uffd_mod
import ckpt.pagecopy.copy as copy_mod
import ckpt.pagecopy.incremental as incr_mod
import ckpt.pagecopy.plan as plan_mod
import ckpt.track.uffd_wp as uffd_wp_mod
from ckpt.freeze.seize import Frozen
from ckpt.images import ImageDir
from ckpt.images.pages import PagesWriter
from ckpt.kernel.ptrace import Injector

MISSING: set[str] = set()  # names already reported as gone from ckpt


@dataclass
class Event:
    path: tuple[str, ...]  # labels of the enclosing wrapped calls, this one last
    t0: float
    t1: float
    cpu: float = 0.0  # CPU seconds of the calling thread (user + sys)


@dataclass
class Phases:
    """Timers around ckpt functions, installed only for the duration of one ckpt call."""

    events: list[Event] = field(default_factory=list)
    windows: list[list[float]] = field(default_factory=list)  # [frozen_at, exit start]
    window_cpu: float = 0.0  # CPU ms of ckpt's main thread during the last frozen window
    _patches: list[tuple[Any, str, Any, bool]] = field(default_factory=list)
    _local: threading.local = field(default_factory=threading.local)
    _cpu0: float = 0.0

    def _stack(self) -> list[str]:
        st = getattr(self._local, "stack", None)
        if st is None:
            st = self._local.stack = []
        return st

    def _set(self, owner: Any, attr: str, new: Any) -> Any:
        had = isinstance(owner, type) and attr in vars(owner)
        orig = getattr(owner, attr)
        self._patches.append((owner, attr, vars(owner)[attr] if had else orig,
                              had or not isinstance(owner, type)))
        setattr(owner, attr, new)
        return orig

    def wrap(self, owner: Any, attr: str, label: str, under: tuple[str, ...] | None = None,
             ) -> None:
        """Time every call of owner.attr as ``label``; ``under`` fixes its parents (for
        calls on helper threads, whose own stack is empty). A name ckpt no longer has is
        skipped (ckpt changes under this bench)."""
        orig = getattr(owner, attr, None)
        if orig is None:
            missing = f"{getattr(owner, '__name__', owner)}.{attr}"
            if missing not in MISSING:
                MISSING.add(missing)
                print(f"  (bench: {missing} not found in ckpt; not timed)", flush=True)
            return

        def timed(*a: Any, **kw: Any) -> Any:
            stack = self._stack()
            path = (*under, label) if under is not None else (*stack, label)
            stack.append(label)
            c0 = time.thread_time()
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                t1 = time.perf_counter()
                stack.pop()
                self.events.append(Event(path, t0, t1, time.thread_time() - c0))

        if not isinstance(orig, type):  # a class (Bounce) keeps its own attributes
            functools.update_wrapper(timed, orig)
        self._set(owner, attr, timed)

    def install(self) -> None:
        real_enter, real_exit = Frozen.__enter__, Frozen.__exit__

        def enter(fz: Frozen) -> Frozen:
            t0 = time.perf_counter()
            out = real_enter(fz)
            self._cpu0 = time.thread_time()
            self.events.append(Event(("seize (before frozen_at)",), t0, fz.frozen_at))
            self.windows.append([fz.frozen_at, 0.0])
            return out

        def exit_(fz: Frozen, *exc: Any) -> None:
            t0 = time.perf_counter()
            if self.windows:
                self.windows[-1][1] = t0
                self.window_cpu = (time.thread_time() - self._cpu0) * 1000
            try:
                real_exit(fz, *exc)
            finally:
                self.events.append(Event(("detach (after window)",), t0, time.perf_counter()))

        self._set(Frozen, "__enter__", enter)
        self._set(Frozen, "__exit__", exit_)
        w = self.wrap
        for mod in (dump_mod, predump_mod):
            for name in ("open_parent", "select_tracker", "collect_vmas", "plan_pass",
                         "apply_compare", "write_memory", "pass_stats", "check_target",
                         "preflight", "read_target", "require_restorable", "collect_thread",
                         "collect_injected", "collect_files", "hidden_fds", "collect_process",
                         "build_core"):
                if hasattr(mod, name):
                    w(mod, name, name)
        w(Frozen, "threads", "frozen.threads")
        w(tasks_mod, "syscall_insn", "syscall_insn")
        w(uffd_wp_mod, "syscall_insn", "syscall_insn")
        w(tasks_mod, "vm_read", "vm_read")
        w(Injector, "raw", "injected syscall")
        w(files_mod, "read_fds", "read_fds")
        w(files_mod, "kcmp_same_file", "kcmp_same_file")
        tracker = uffd_wp_mod.UffdWpTracker
        w(tracker, "begin", "tracker.begin")
        w(tracker, "end", "tracker.end")
        w(tracker, "_attach", "_attach (pidfd_getfd)")
        w(tracker, "_create", "_create (inject userfaultfd)")
        w(tracker, "_arm", "_arm")
        w(uffd_wp_mod, "ckpt_uffds", "ckpt_uffds")
        w(pm, "pagemap_scan", "PAGEMAP_SCAN")
        w(uffd_mod, "uffd_api", "UFFDIO_API")
        w(uffd_mod, "uffd_register_wp", "UFFDIO_REGISTER")
        w(uffd_mod, "uffd_writeprotect", "UFFDIO_WRITEPROTECT")
        w(vmas_mod, "read_maps", "read /proc/PID/maps")
        w(vmas_mod, "read_smaps_vmflags", "read /proc/PID/smaps (VmFlags)")
        w(incr_mod, "existing_pages", "existing_pages")
        w(plan_mod, "read_pagemap_entries", "pread /proc/PID/pagemap")
        w(plan_mod, "data_runs", "data_runs (parse entries)")
        w(passes_mod, "copy_runs", "copy_runs")
        w(copy_mod, "Bounce", "Bounce (MAP_POPULATE)")
        w(copy_mod._Reader, "read", "process_vm_readv batch (may overlap zstd)",
          under=("write_memory", "copy_runs"))
        w(PagesWriter, "write", "zstd + write (sink)")
        w(PagesWriter, "close", "zstd + write (close)")
        for name in ("write_pagemap", "write_core", "write_tracker", "write_digests",
                     "write_inventory"):
            w(ImageDir, name, f"images.{name}")

    def uninstall(self) -> None:
        for owner, attr, orig, restore in reversed(self._patches):
            if restore:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)
        self._patches.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Phases]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    # ------------------------------------------------------------------ report
    def window(self) -> tuple[float, float]:
        if not self.windows:
            return 0.0, 0.0
        a, b = self.windows[-1]
        return a, b

    def tree(self, inside: bool) -> dict[tuple[str, ...], list[float]]:
        """path -> [wall ms, calls, first t0, cpu ms] for events inside (or outside) the
        frozen window."""
        a, b = self.window()
        agg: dict[tuple[str, ...], list[float]] = {}
        for ev in self.events:
            inw = ev.t0 >= a and ev.t1 <= b
            if inw != inside or (ev.path[0].startswith(("seize", "detach")) and inside):
                continue
            row = agg.setdefault(ev.path, [0.0, 0, ev.t0, 0.0])
            row[0] += (ev.t1 - ev.t0) * 1000
            row[1] += 1
            row[2] = min(row[2], ev.t0)
            row[3] += ev.cpu * 1000
        return agg

    def top(self, name: str) -> float:
        """ms of the top-level phase ``name`` inside the frozen window."""
        return self.tree(True).get((name,), [0.0])[0]

    def report(self, title: str, ckpt_frozen_ms: float, max_depth: int = 4) -> None:
        a, b = self.window()
        agg = self.tree(True)
        win = (b - a) * 1000
        seize = sum((e.t1 - e.t0) * 1000 for e in self.events if e.path[0].startswith("seize"))
        detach = sum((e.t1 - e.t0) * 1000 for e in self.events
                     if e.path[0].startswith("detach"))
        print(f"  breakdown of {title}: frozen window {win:.2f} ms (ckpt frozen_ms "
              f"{ckpt_frozen_ms:.2f}; ckpt main-thread CPU {self.window_cpu:.2f}); the target "
              f"is also stopped during seize {seize:.2f} ms and detach {detach:.2f} ms",
              flush=True)
        print(f"    {'phase (nested: inside its parent)':<46} {'wall ms':>8} {'cpu ms':>8}")
        children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for p in agg:
            children.setdefault(p[:-1], []).append(p)

        def show(parent: tuple[str, ...], depth: int) -> None:
            kids = sorted(children.get(parent, []), key=lambda p: agg[p][2])
            for p in kids:
                ms, n, _, cpu = agg[p]
                sub = sum(agg[c][0] for c in children.get(p, []))
                extra = f"  self {ms - sub:.2f}" if children.get(p) and depth < max_depth else ""
                calls = f" x{int(n)}" if n > 1 else ""
                print(f"    {'  ' * depth}{p[-1] + calls:<{46 - 2 * depth}} {ms:8.2f} "
                      f"{cpu:8.2f}{extra}")
                if depth < max_depth:
                    show(p, depth + 1)

        show((), 0)
        top = sum(agg[p][0] for p in children.get((), []))
        print(f"    {'(not in a wrapped phase)':<46} {win - top:8.2f}")
        out = self.tree(False)
        tops = sorted((p for p in out if len(p) == 1 and not p[0].startswith(("seize", "det"))),
                      key=lambda p: out[p][2])
        if tops:
            print("    outside the freeze: " + ", ".join(
                f"{p[0]} {out[p][0]:.1f}" for p in tops) + " (ms)")
