"""Can a restore bring this process back? One table of what it cannot, with the reason.

A dump kills its target; a restore that then fails loses the process. So whatever a
restore cannot rebuild exactly is refused here, before the target is frozen (and again
while it is frozen, in case it changed), by dump, predump and migrate alike:

    subject   refused when                                     why
    process   it has children outside the pass (a child born   try again
              during the checks)
              it shares its address space, fd table or fs      restore makes one per
              state with another member (ckpt.collect.treecheck) process
              it is in another pid or user namespace than ckpt  restore makes it in ckpt's:
                                                               other pids, other ids
              it is chrooted                                   restore does not chroot
              its working directory was deleted, and its       restore makes it again in
              parent too (or replaced); under migrate          that parent (ckpt.collect.
                                                               deletedcwd)
              its working directory is under /proc/PID         names a process, not a place
              a thread has its own working directory           restore sets one per process
              it has more than 8192 supplementary groups       restore's setgroups limit
              a POSIX timer on a CPU clock of another process  restore cannot make it
              or of an unnamed thread (CLOCK_THREAD_CPUTIME_ID  measure the same task
              in a multi-threaded process)
              POSIX timer ids above 4096 where the kernel       restore would create and
              cannot create a given id (before Linux 6.15)      delete every id below
              one shared anonymous memory mapped at two        restore would make two
              addresses (mremap of size 0)
              mlockall(MCL_FUTURE) is in effect (seen only      restore locks its current
              while frozen: ckpt.collect.mlockall)             mappings, not future ones
    any path  names another file from ckpt's mount namespace   restore opens ckpt's
    mapping   an AIO ring, MAP_HUGETLB memory                  restore cannot map it again
              a memfd or deleted file ckpt.collect.mappedfiles  (its contents are saved
              refuses (above --ghost-limit, other links, its   like an open one's)
              directory gone; under migrate)
              System V shared memory shared with another       (ckpt.collect.sysvshm)
              process, partly unmapped, or too large
              a file that is not a path (anon_inode:...)       (io_uring, perf, DRM)
              a device under /dev (but /dev/zero, /dev/shm)    its state lives in the driver
              a VmFlag restore cannot set (hugetlb, device,    ckpt/collect/vmflags.py
              userfaultfd, shadow stack, unknown ones)
              a memory protection key (pkey_mprotect)          restore maps with key 0
              anonymous shared memory another process outside  restore would make a copy
              the dump maps too; or members map in parts       (ckpt.collect.shmem)
    fd        of a kind of ckpt.collect.fdkinds               that kind's refuse says
              (pipe, socket, eventfd, memfd, deleted file      (its state is not restored)
              ...)
              a terminal (but fds 0-2 with --shell-job),       kernel objects, not files
              socket, anon inode no kind claims,
              anything unknown
              a deleted file that is not a regular file        the file is gone
              (a deleted directory)
              a namespace (net:[...]), anything not a path     nothing to open
              a file under /proc/PID                           names a process
              a character device but /dev/{null,zero,full,     its state lives in the driver
              random,urandom}
              a lock ckpt.collect.fdkinds.locks refuses        that module's refusal says
              (mandatory, a lease being broken, a lock on an   (locks on files reopened by
              fd not reopened by path, ...)                    path are taken again)
              an object another process holds too (but a       restore would make a copy
              pipe or a unix socket: its kind judges), found   for this process alone, cut
              by ckpt.collect.holders: a socket, an eventfd,   off from the other one (a
              epoll set, ..., a memfd, a deleted file          listener: its port taken)
              a file or directory whose open file another      the lock stays with the
              process shares, holding an flock, OFD lock or    other process: restore
              lease                                            could not take it again
              ... holding none, unless write-only O_APPEND     its position and flags would
                                                               no longer be shared (an
                                                               O_APPEND writer's position
                                                               is the end either way)
              an owner (F_SETOWN) outside the process          a restore brings back only
              (another process or its thread, another group;   the process (ckpt.collect.
              its own unless it leads its session and no       fdkinds.fown)
              --shell-job)

:func:`refusals` is pure: it takes a :class:`Target` (ckpt.collect.target: records of
ckpt.collect.vmas, ckpt.collect.fds and ckpt.collect.proc) and returns one line per
refused thing, process first, then mappings by address, then fds by number.
:func:`read_target` (ckpt.collect.target) gathers the records; :func:`require_restorable`
raises NotDumpable with the first line. The process and mapping rows are here, the fd
rows in ckpt.collect.restorable_fds, the Rule they all are in ckpt.collect.rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt.collect import cgroups, mappedfiles, sched, shmem, sysvshm
from ckpt.collect.fdkinds import fown
from ckpt.collect.fdkinds.base import FdFlags
from ckpt.collect.restorable_fds import FD_RULES, HELD, fd_refusal, fd_refusals
from ckpt.collect.rules import NOT_YET, PROC_PID, Rule, deleted, first, shown
from ckpt.collect.target import (
    FILE_KINDS,
    Target,
    compares_open_file,
    file_identity,
    read_target,
)
from ckpt.collect.timers import MAX_LINEAR_TIMER_ID, timer_refusal
from ckpt.collect.vmas import KERNEL_PROVIDED, VmaInfo, VmaKind
from ckpt.collect.vmflags import refused_flags
from ckpt.errors import NotDumpable
from ckpt.images.fields import MAX_GROUPS

#: Filesystems under /dev whose files are files, not devices.
NOT_DEVICES = ("/dev/shm/", "/dev/hugepages/", "/dev/mqueue/")


# --------------------------------------------------------------------------- process

PROCESS_RULES: tuple[Rule[Target], ...] = (
    Rule(lambda t: bool(t.children),
         "process {pid} has child processes ({children}) outside this pass (forked while "
         "the tree was checked: try again)"),
    Rule(lambda t: bool(t.other_ns),
         "process {pid} runs in a {other_ns}: " + NOT_YET),
    Rule(lambda t: t.root not in ("", t.own_root),  # "": exiting, nothing to compare
         "process {pid} has root directory {root} (chroot): " + NOT_YET),
    Rule(lambda t: deleted(t.cwd) and not t.cwd_parent_reachable,
         "process {pid} has a deleted working directory ({cwd_shown}) whose parent no path "
         "reaches any more (removed or replaced too): a restore could not make it again "
         "there: " + NOT_YET),
    Rule(lambda t: deleted(t.cwd) and t.fd_flags.migrating,
         "process {pid} has a deleted working directory ({cwd_shown}): migrate does not "
         "carry it yet (dump does)"),
    Rule(lambda t: bool(PROC_PID.match(t.cwd)),
         "process {pid} has its working directory {cwd} under /proc/PID (it names a "
         "process, not a place): " + NOT_YET),
    Rule(lambda t: any(cwd != t.cwd for _, cwd in t.thread_cwds),
         "process {pid} has threads with their own working directory ({own_cwds}; "
         "unshare(CLONE_FS)): " + NOT_YET),
    Rule(lambda t: t.groups > MAX_GROUPS,
         "process {pid} has {groups} supplementary groups (a restore sets at most "
         f"{MAX_GROUPS}): " + NOT_YET),
    Rule(lambda t: bool(_timer_refusals(t)),
         "process {pid} has POSIX timer {timer_refused}: " + NOT_YET),
    Rule(lambda t: not t.timer_ids_exact and any(x.id > MAX_LINEAR_TIMER_ID for x in t.timers),
         "process {pid} has POSIX timer ids up to {timer_max}, and this kernel cannot create "
         "a timer under a given id (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.15): a restore "
         f"would create and delete every id below (at most {MAX_LINEAR_TIMER_ID}): "
         + NOT_YET),
    Rule(lambda t: bool(aliased(t.vmas)),
         "process {pid} maps one shared anonymous memory at two addresses ({aliased}): "
         + NOT_YET),
    Rule(lambda t: t.cwd in t.foreign,
         "process {pid} has its working directory {cwd} in mount namespace {mnt_ns}, where "
         "it is another directory than in ckpt's ({own_mnt_ns}): " + NOT_YET),
)


def process_fields(t: Target) -> dict[str, object]:
    return {"pid": t.pid, "children": ", ".join(map(str, t.children)), "cwd": t.cwd,
            "cwd_shown": shown(t.cwd), "root": t.root, "mnt_ns": t.mnt_ns,
            "own_mnt_ns": t.own_mnt_ns, "groups": t.groups,
            "timer_refused": "; ".join(_timer_refusals(t)),
            "timer_max": max((x.id for x in t.timers), default=0),
            "other_ns": " and a ".join(f"{kind} namespace other than ckpt's ({its}; ckpt's "
                                       f"is {own})" for kind, its, own in t.other_ns),
            "aliased": " and ".join(f"{v.start:#x}" for v in aliased(t.vmas)[:2]),
            "own_cwds": ", ".join(f"thread {tid} in {cwd}" for tid, cwd in t.thread_cwds
                                  if cwd != t.cwd)}


def _timer_refusals(t: Target) -> list[str]:
    tids = tuple(tid for tid, _ in t.thread_cwds) or (t.pid,)
    return [f"{x.id} (clock {x.clock}): {why}" for x in t.timers
            if (why := timer_refusal(x, tids)) is not None]


def aliased(vmas: tuple[VmaInfo, ...]) -> list[VmaInfo]:
    """VMAs of shared anonymous memory whose pages another VMA of the same object maps
    too (mremap with old size 0 makes such an alias; an mprotect split does not: its
    parts cover other offsets). Restore maps each VMA as its own object."""
    seen: dict[int, list[VmaInfo]] = {}
    out: list[VmaInfo] = []
    for v in vmas:
        if v.kind != VmaKind.ANON_SHARED or not v.inode:
            continue
        for w in seen.setdefault(v.inode, []):
            if v.pgoff < w.pgoff + w.length and w.pgoff < v.pgoff + v.length:  # bytes
                out += [w, v]
        seen[v.inode].append(v)
    return out


# --------------------------------------------------------------------------- mappings

@dataclass(frozen=True)
class Mapping:
    """A VMA as the rules see it, and whether its path is in Target.foreign."""

    vma: VmaInfo
    foreign: bool
    tracker: bool = False  # Target.tracker
    seen: mappedfiles.Seen | None = None  # of a mapped memfd or deleted file (Target.mapped)
    flags: FdFlags = field(default_factory=FdFlags)
    shm: shmem.Seen | None = None  # of anonymous shared memory (Target.shmem)

    @property
    def mapped_refusal(self) -> str | None:
        return mappedfiles.refusal(self.vma, self.seen, self.flags)

    @property
    def path(self) -> str:
        return self.vma.path

    @property
    def kind(self) -> VmaKind:
        return self.vma.kind


VMA_RULES: tuple[Rule[Mapping], ...] = (
    Rule(lambda v: v.path.startswith("/[aio]"),
         "an AIO ring (io_setup) at {start:#x}: " + NOT_YET),
    Rule(lambda v: v.path.startswith("/anon_hugepage"),
         "huge pages (MAP_HUGETLB) at {start:#x}: " + NOT_YET),
    Rule(lambda v: v.mapped_refusal is not None,
         "{mapped_what} at {start:#x}: {mapped_refusal}",
         "a memfd or deleted file ckpt.collect.mappedfiles refuses (above --ghost-limit, "
         "other links, its directory gone, mapped or open in another process, under "
         "migrate)"),
    Rule(lambda v: shmem.refusal(v.shm) is not None,
         "shared anonymous memory at {start:#x} {shm_refusal}",
         "shared anonymous memory another process outside the dump maps too, or that "
         "members of the dump map in parts (ckpt.collect.shmem)"),
    Rule(lambda v: v.kind in FILE_KINDS and not v.path.startswith("/"),
         "{path} at {start:#x}, not a file a restore can map again: " + NOT_YET),
    Rule(lambda v: v.kind in FILE_KINDS and v.path.startswith("/dev/")
         and v.path != "/dev/zero" and not v.path.startswith(NOT_DEVICES),
         "device {path} at {start:#x}: its state lives in the driver; " + NOT_YET),
    Rule(lambda v: v.kind in FILE_KINDS and v.foreign,
         "file {path} at {start:#x}, which is another file (or none) in ckpt's mount "
         "namespace: " + NOT_YET),
    Rule(lambda v: bool(_refused_flags(v)),
         "{path_or_anon} at {start:#x} with VmFlags {flags}, which a restore cannot set "
         "again: " + NOT_YET),
    Rule(lambda v: v.vma.pkey != 0,
         "{path_or_anon} at {start:#x} with memory protection key {pkey} "
         "(pkey_mprotect): " + NOT_YET),
)


def _refused_flags(m: Mapping) -> list[str]:
    return refused_flags(m.vma.vmflags, m.kind in KERNEL_PROVIDED, m.tracker)


def vma_fields(m: Mapping) -> dict[str, object]:
    return {"start": m.vma.start, "path": m.path, "name": shown(m.path),
            "mapped_what": f"a memfd ({shown(m.path)})" if m.path.startswith("/memfd:")
            else f"deleted file {shown(m.path)}", "mapped_refusal": m.mapped_refusal,
            "shm_refusal": shmem.refusal(m.shm),
            "path_or_anon": m.path or "anonymous memory",
            "flags": ", ".join(_refused_flags(m)), "pkey": m.vma.pkey}


# --------------------------------------------------------------------------- all


def refusals(t: Target) -> list[str]:
    """One line per thing a restore could not bring back (empty: restorable)."""
    out = [rule.says.format(**process_fields(t)) for rule in PROCESS_RULES if rule.applies(t)]
    out += sysvshm.refusals(t.pid, t.vmas, {s.shmid: s for s in t.shm_segments},
                            t.same_ipc_ns, migrating=t.fd_flags.warm_migration,
                            members=dict(t.shm_members))
    out += sched.refusals(t.pid, t.policies)
    out += cgroups.thread_refusals(t.pid, t.thread_cgroups)
    found, shm = dict(t.mapped), dict(t.shmem)
    for v in sorted(t.vmas, key=lambda v: v.start):
        why = first(VMA_RULES, Mapping(v, v.path in t.foreign, t.tracker, found.get(v.start),
                                       t.fd_flags, shm=shm.get(v.start)), vma_fields)
        if why:
            out.append(f"process {t.pid} maps {why}")
    out += fd_refusals(t)
    return out


def require_restorable(target: Target) -> list[VmaInfo]:
    """Raise NotDumpable naming the first thing a restore could not bring back; return
    the target's VMAs otherwise."""
    found = refusals(target)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise NotDumpable(found[0] + more)
    return list(target.vmas)


class _Any:
    """Stands for any value of a rule's field when the table is printed."""

    def __format__(self, spec: str) -> str:
        return "…"


class _Blanks(dict[str, object]):
    def __missing__(self, key: str) -> object:
        return _Any()


def table_lines() -> list[str]:
    """The table as `ckpt check` prints it: what is restored by an fd kind, then each
    rule's refusal with its fields left blank."""
    from ckpt.collect.fdkinds import KINDS

    out = [f"restored: fds of kind {', '.join(k.name for k in KINDS)} (ckpt/collect/fdkinds), "
           "regular files, directories, /dev/null and stateless devices by path; mapped memfds "
           "and deleted files (ckpt/collect/mappedfiles.py); a deleted working directory "
           "(ckpt/collect/deletedcwd.py)"]
    for subject, rules in (("process", PROCESS_RULES), ("mapping", VMA_RULES),
                           ("fd", FD_RULES)):
        for rule in rules:
            said = rule.table or rule.says.format_map(_Blanks())
            out.append(f"refused ({subject}): {said}")
    out.append(f"refused (fd): {HELD.format_map(_Blanks())}")
    out.append(f"refused (fd): {fown.REFUSED}")
    return out


__all__ = ["Target", "compares_open_file", "fd_refusal", "file_identity", "read_target",
           "refusals", "require_restorable", "table_lines"]
