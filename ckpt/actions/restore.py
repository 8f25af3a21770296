"""`ckpt restore`: rebuild a process from an images directory, as a straight checklist.

    read images        inventory, core, pagemap (each field validated: images/validate.py),
                       then, before anything is created: the dumped ids free, the files
                       reopened unchanged since the dump, every --inherit-fd, timer ids
                       this kernel can make
    stub               fork a traced child with the dumped pid (ns_last_pid) or a new one,
                       every signal action SIG_DFL
    cgroups            the stub joins the dumped cgroups, before its memory is charged
    gadget             XSTATE layout checked; syscall page at a free address; stub rseq
                       off, its fds closed
    address space      unmap stub, move vdso, make mapped memfds and deleted files, map
                       VMAs, seal those memfds, make and attach System V segments, fill
                       pages (UFFDIO_COPY into anonymous memory), mprotect
    memory state       guard regions, mlock, mseal, PR_SET_MM_MAP
    settings           oom_score_adj, loginuid, membarrier (before the fds and rlimits)
    files              fds with shared open file descriptions, offsets, status flags,
                       then file locks and leases
    process state      cwd (a deleted one made again), umask, personality, session,
                       name, sigactions (not yet SIGTRAP's), rlimits; access check
    threads            clone3 with set_tid, then per-thread kernel pointers
    timers             POSIX timers under their ids; overruns replayed
    settings, owners   prctl settings, the owners of fds (F_SETOWN may name a thread)
    credentials        ids, groups, capabilities, seccomp; then the settings creds reset
    last syscalls      no trap any more: pending signals queued, SIGTRAP's action, gadget
                       unmapped
    registers          XSTATE + GP regs as dumped, masks, each thread in a signal stop
    scheduling         policy, nice, CPU affinity, I/O priority (after the release)
    release            the process runs on; the kernel restarts interrupted calls, a
                       thread whose call a signal would interrupt is let go by the end
                       of the restore's own thread (ckpt.restore.release)

Any failure kills the stub (and PTRACE_O_EXITKILL covers ckpt itself dying).

A tree (Inventory.pids holds more than the root) is restored with its own pids
(--new-pid refused): every id checked free, the root stub's gadget installed, then the
tree's shape built over stubs (ckpt.tree's plan, ckpt.restore.tree: each member forked by
its parent's stub, sessions, groups, helpers, zombies), then the checklist above for every
live member in pre-order, up to the release; then every member released at once, leaves
first. Any failure kills every stub and helper.

The steps themselves live in ckpt.restore.process; ckpt.restore.warm runs the same ones
over a stub kept up to date pass by pass (migration).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from ckpt.collect import sysvshm
from ckpt.collect.cgroups import join_cgroups
from ckpt.collect.fdkinds.base import TreeScope
from ckpt.collect.mappedfiles import Made, make_objects
from ckpt.errors import RestoreError
from ckpt.images import ImageDir, chain
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.pb import image_pb2
from ckpt.kernel.creds import require_root
from ckpt.restore import mm
from ckpt.restore.files import check_files, check_inherit
from ckpt.restore.pages import WritableIndex
from ckpt.restore.process import (
    Parked,
    check_ids_free,
    check_xstate,
    fill_layers,
    finish_process,
    prepare_stub,
    read_images,
    settle_process,
)
from ckpt.restore.release import run_released
from ckpt.restore.settings import check_root_settings
from ckpt.restore.stub import Stub
from ckpt.restore.timers import check_timer_ids
from ckpt.restore.tree import TreeStubs, check_tree_ids_free, release_all, subreaper
from ckpt.restore.uffd_fill import CopyFill
from ckpt.tree import Tree, helper_pids, plan_restore

T = TypeVar("T")


@dataclass(frozen=True)
class RestoreOptions:
    images_dir: str
    new_pid: bool = False
    stopped: bool = False  # leave it stopped (SIGSTOP): migration resumes it on commit
    skip_file_check: bool = False  # reopen files that changed since the dump anyway
    # --inherit-fd: external object ("pipe:[123]") -> the fd of ckpt that stands for it
    inherit: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreResult:
    pid: int
    tids: list[int]
    total_ms: float
    pids: list[int] = field(default_factory=list)  # every member of a tree, root first


@dataclass
class Resources:
    """What a restore made in ckpt for its processes: closed at the end, System V
    segments removed again if it fails."""

    segments: list[int] = field(default_factory=list)
    shmids: set[int] = field(default_factory=set)  # System V segments made or found
    objects: list[Made] = field(default_factory=list)  # mapped memfds and deleted files
    scope: TreeScope | None = None  # a tree's shared objects

    @contextlib.contextmanager
    def undone_on_failure(self, kill: Callable[[], None],
                          stubs: Callable[[], Iterable[Stub]]) -> Iterator[None]:
        """A block that builds processes: on failure ``kill`` them and remove the System V
        segments made; in any case close what was made and the ``stubs``."""
        try:
            yield
        except BaseException:
            kill()
            sysvshm.forget(self.segments)
            raise
        finally:
            self.close()
            for stub in stubs():
                stub.close()

    def close(self) -> None:
        if self.scope is not None:
            self.scope.close()
        for made in self.objects:
            made.close()


def restore(opts: RestoreOptions) -> RestoreResult:
    """Restore in a thread of its own, which lets the restored process go as it ends
    (ckpt.restore.release)."""
    return run_released(lambda: _restore(opts))


def _restore(opts: RestoreOptions) -> RestoreResult:
    t0 = time.perf_counter()
    require_root("restore")
    images, inv, entry = read_images(opts.images_dir)
    check_root_settings(entry)
    if len(inv.pids) > 1:
        return restore_tree(opts, images, inv, t0)
    layers = chain.resolve(images, entry.pid)  # the whole chain is valid before we fork
    if not opts.new_pid:
        check_ids_free(entry)
    if not opts.skip_file_check:
        check_files(entry)
    check_inherit(entry, opts.inherit)
    check_timer_ids(entry)
    stub = Stub.spawn(None if opts.new_pid else entry.pid, max(t.tid for t in entry.threads))
    made = Resources()
    with made.undone_on_failure(stub.kill, lambda: [stub]):
        tids = build_process(stub, entry, layers, opts, made, gadget=True,
                             new_session=not inv.shell_job, finish=finish_process)
    return RestoreResult(pid=stub.pid, tids=tids,
                         total_ms=(time.perf_counter() - t0) * 1000, pids=[stub.pid])


def build_process(stub: Stub, entry: pb.ProcessEntry, layers: list[chain.Layer],
                  opts: RestoreOptions, made: Resources, gadget: bool, new_session: bool,
                  finish: Callable[..., T]) -> T:
    """From a stub to a restored process: cgroups, address space, pages, then ``finish``
    (finish_process: released; settle_process: parked, for a tree)."""
    vmas = list(entry.vmas)
    join_cgroups(stub.pid, entry.cgroups)  # before its memory is charged anywhere
    copier = CopyFill()
    try:
        with stub.colocated():  # injected syscalls: see Stub.colocated
            check_xstate(stub, entry)
            prepare_stub(stub, vmas, gadget=gadget)
            objects = make_objects(entry, made.scope)  # a tree: its registry
            made.objects.append(objects)
            late = mm.map_vmas(stub, vmas, objects)  # and seals them
            made.segments += sysvshm.restore_segments(entry, made.shmids)
            sysvshm.attach_segments(stub, entry)
            copier = CopyFill.open(stub, vmas)
        # closed right after the fill: a VMA still registered would SIGBUS the process
        # (the finally below only covers a failure before this point)
        with copier:
            fill_layers(stub, entry.pid, layers, WritableIndex(vmas, late), copier=copier)
    finally:
        copier.close()
    with stub.colocated():
        mm.protect_late(stub, late)
        return finish(stub, entry, new_session=new_session, same_tids=not opts.new_pid,
                      stopped=opts.stopped, inherit=opts.inherit, objects=objects.objects)


def restore_tree(opts: RestoreOptions, images: ImageDir, inv: image_pb2.Inventory,
                 t0: float) -> RestoreResult:
    if opts.new_pid:
        raise RestoreError("--new-pid cannot restore a process tree: a tree is restored "
                           f"with its own pids ({len(inv.pids)} processes)")
    entries = [images.read_core(pid) for pid in inv.pids]
    tree = Tree.from_entries(entries)
    plan = plan_restore(tree, inv.shell_job)
    live = [e for e in entries if not e.zombie]
    layers = {e.pid: chain.resolve(images, e.pid) for e in live}
    check_tree_ids_free(tree, plan)
    for e in live:
        if not opts.skip_file_check:
            check_files(e)
        check_timer_ids(e)
    check_tree_inherit(live, opts.inherit)
    reserve = max([t for m in tree.members for t in m.tids] + helper_pids(plan))
    made = Resources(scope=TreeScope(files=[f for e in live for f in e.files],
                                     members=tuple(e.pid for e in live)))
    parked: list[Parked] = []
    settle = functools.partial(settle_process, tree=made.scope)
    with subreaper():  # orphans of a failure come back to ckpt (ckpt.restore.tree)
        root = Stub.spawn(tree.root.pid, reserve)
        stubs = TreeStubs(root, {e.pid: e for e in entries})
        with made.undone_on_failure(stubs.kill, stubs.everyone):
            root.install_gadget(mm.free_gadget_address(root.pid,
                                                       [v for e in live for v in e.vmas]))
            stubs.run(plan)  # children are forked before anything is unmapped
            for e in live:
                parked.append(build_process(stubs.stubs[e.pid], e, layers[e.pid], opts, made,
                                            gadget=False, new_session=False, finish=settle))
            release_all(parked)
    return RestoreResult(pid=root.pid, tids=parked[0].tids,
                         total_ms=(time.perf_counter() - t0) * 1000, pids=list(inv.pids))


def check_tree_inherit(entries: list[pb.ProcessEntry], inherit: dict[str, int]) -> None:
    """check_inherit over a tree: each member's external objects, every --inherit-fd used
    by some member."""
    for e in entries:
        check_inherit(e, {k: v for k, v in inherit.items()
                          if any(f.external == k for f in e.files)})
    unused = sorted(set(inherit) - {f.external for e in entries for f in e.files})
    if unused:
        raise RestoreError(f"--inherit-fd fd[{inherit[unused[0]]}]:{unused[0]}: the images "
                           "hold no such external object")


def wait_restored(pid: int) -> int:
    """Wait for the restored child; its exit status, or 128+signal like a shell."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 0
        except KeyboardInterrupt:
            os.kill(pid, signal.SIGINT)
            continue
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
