"""Collected records → protobuf core image (the image boundary of dump)."""

from __future__ import annotations

from dataclasses import dataclass

from ckpt.collect.creds import Creds
from ckpt.collect.fdkinds import fown
from ckpt.collect.files import FILE_TYPES, FileRecord
from ckpt.collect.proc import Rlimit, Stat
from ckpt.collect.pstate import Settings
from ckpt.collect.tasks import InjectedState, ThreadState
from ckpt.collect.timers import PosixTimer
from ckpt.collect.vmas import VmaInfo
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.regs import regs_to_pb
from ckpt.kernel.timers import SIGEV_THREAD_ID


@dataclass(frozen=True)
class ProcessInfo:
    """Process-wide state read from /proc while frozen."""

    stat: Stat
    umask: int
    auxv: bytes
    exe: str
    cwd: str
    cwd_id: tuple[int, int]  # (st_dev, st_ino) of the working directory
    comm: str
    cmdline: bytes
    personality: int
    rlimits: list[Rlimit]
    shared_pending: list[bytes]
    settings: Settings | None = None  # ckpt.collect.pstate


def ids_to_pb(c: Creds) -> pb.Creds:
    """Only the user and group ids and the supplementary groups (all a zombie keeps)."""
    return pb.Creds(uid=c.uid[0], euid=c.uid[1], suid=c.uid[2], fsuid=c.uid[3],
                    gid=c.gid[0], egid=c.gid[1], sgid=c.gid[2], fsgid=c.gid[3],
                    groups=c.groups)


def creds_to_pb(c: Creds) -> pb.Creds:
    msg = ids_to_pb(c)
    msg.MergeFrom(pb.Creds(cap_inh=c.cap_inh, cap_prm=c.cap_prm, cap_eff=c.cap_eff,
                           cap_bnd=c.cap_bnd, cap_amb=c.cap_amb, securebits=c.securebits,
                           no_new_privs=c.no_new_privs, seccomp_mode=c.seccomp_mode))
    return msg


def thread_to_pb(t: ThreadState) -> pb.ThreadCore:
    sp, flags, size = t.altstack
    assert t.creds is not None, "credentials are collected for every thread"
    return pb.ThreadCore(
        tid=t.tid, regs=regs_to_pb(t.regs), xstate=t.xstate, sigmask=t.sigmask,
        rseq=pb.Rseq(abi_pointer=t.rseq.abi_pointer, abi_size=t.rseq.abi_size,
                     signature=t.rseq.signature, flags=t.rseq.flags),
        clear_child_tid=t.clear_child_tid, robust_list_head=t.robust_list[0],
        robust_list_len=t.robust_list[1], altstack=pb.SigAltStack(sp=sp, flags=flags, size=size),
        pending_signals=t.pending, creds=creds_to_pb(t.creds),
        seccomp_filters=[pb.SeccompFilter(program=p, flags=f) for p, f in t.creds.filters],
        settings=settings_to_pb(t.settings), name=t.name,
        sched=pb.Sched(policy=t.sched.policy, priority=t.sched.priority, nice=t.sched.nice,
                       cpus=t.sched.cpus, ioprio=t.sched.ioprio) if t.sched else None)


def settings_to_pb(values: dict[str, int]) -> list[pb.Setting]:
    return [pb.Setting(name=name, value=v) for name, v in sorted(values.items())]


def timer_to_pb(t: PosixTimer) -> pb.PosixTimer:
    p = t.proc
    return pb.PosixTimer(id=p.id, clock=p.clock, notify=p.notify, signo=p.signo, value=p.value,
                         notify_tid=p.notify_pid if p.notify & SIGEV_THREAD_ID else 0,
                         interval_ns=t.interval_ns, value_ns=t.value_ns, overrun=t.overrun)


def vma_to_pb(v: VmaInfo) -> pb.Vma:
    return pb.Vma(start=v.start, end=v.end, prot=v.prot, shared=v.shared,
                  kind=pb.Vma.Kind.Name(int(v.kind)), pgoff=v.pgoff, path=v.path, dev=v.dev,
                  inode=v.inode, vmflags=list(v.vmflags))


def build_core(pid: int, info: ProcessInfo, threads: list[ThreadState], injected: InjectedState,
               vmas: list[VmaInfo], files: list[FileRecord]) -> pb.ProcessEntry:
    s = info.stat
    mm = pb.MmFields(start_code=s.start_code, end_code=s.end_code, start_data=s.start_data,
                     end_data=s.end_data, start_brk=s.start_brk, brk=injected.brk,
                     start_stack=s.start_stack, arg_start=s.arg_start, arg_end=s.arg_end,
                     env_start=s.env_start, env_end=s.env_end, auxv=info.auxv, exe=info.exe)
    entry = pb.ProcessEntry(
        pid=pid, ppid=s.ppid, pgid=s.pgrp, sid=s.session, comm=info.comm,
        threads=[thread_to_pb(t) for t in threads], mm=mm, vmas=[vma_to_pb(v) for v in vmas],
        personality=info.personality, umask=info.umask, cwd=info.cwd, cmdline=info.cmdline,
        shared_pending=info.shared_pending, dumpable=injected.dumpable,
        cwd_dev=info.cwd_id[0], cwd_inode=info.cwd_id[1],
        posix_timers=[timer_to_pb(t) for t in injected.timers],
        settings=settings_to_pb(injected.settings))
    for signo, (handler, flags, restorer, mask) in sorted(injected.sigactions.items()):
        entry.sigactions.add(signo=signo, handler=handler, flags=flags, restorer=restorer,
                             mask=mask)
    for r in info.rlimits:
        entry.rlimits.add(resource=r.resource, cur=r.soft, max=r.hard)
    for which, (interval, value) in sorted(injected.itimers.items()):
        entry.itimers.add(which=which, interval_us=interval, value_us=value)
    pstate_to_pb(entry, info.settings, injected.membarrier)
    for f in files:
        msg = entry.files.add(id=f.id, path=f.path, flags=f.flags, pos=f.pos, mode=f.mode,
                              size=f.size, inherit_fd=f.inherit_fd, mtime_ns=f.mtime_ns,
                              dev=f.dev, inode=f.inode)
        if f.payload is not None:  # an fd kind's (ckpt.collect.fdkinds): type and state
            msg.MergeFrom(f.payload)
        else:
            msg.type = FILE_TYPES[f.kind]
        fown.to_pb(f.fown, msg)
        for fd, cloexec in f.fds:
            entry.fds.add(fd=fd, file_id=f.id, cloexec=cloexec)
    return entry


def pstate_to_pb(entry: pb.ProcessEntry, s: Settings | None, membarrier: int) -> None:
    """ProcessEntry fields 30-39 (ckpt.collect.pstate)."""
    if s is not None:
        entry.oom_score_adj = s.oom_score_adj
        if s.loginuid is not None:
            entry.loginuid = s.loginuid
        for start, end in s.guards:
            entry.guard_regions.add(start=start, end=end)
    if membarrier >= 0:
        entry.membarrier_registrations = membarrier
