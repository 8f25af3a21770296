"""What each field of an image may hold: FIELDS, message type -> field name -> check of
one value (each element of a repeated field), and the limits those checks use.
ckpt/images/validate.py walks every decoded message with it (and its RULES across fields);
tests/test_image_fuzz.py fails on any field with neither a row here, a rule nor a place in
its FREE list, and tests/test_validate.py on a message listed twice (a later row would
silently win).
"""

from __future__ import annotations

from google.protobuf.message import Message

from ckpt.images.checks import (
    NSIG,
    USER_END,
    Check,
    aligned,
    blob,
    clean_path,
    hex_token,
    mask,
    one_of,
    path,
    ranged,
    siginfo,
    text,
)
from ckpt.images.framing import FORMAT_VERSION
from ckpt.images.pb import core_pb2 as core
from ckpt.images.pb import image_pb2 as img
from ckpt.kernel import prctl
from ckpt.kernel.sched import POLICIES, SCHED_RESET_ON_FORK
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.kernel.timers import NOTIFIES, valid_clock

PID_MAX = 1 << 22  # PID_MAX_LIMIT on 64-bit
NR_OPEN_MAX = 1073741816  # the largest fs.nr_open the kernel accepts
VSYSCALL = (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000)
RLIM_NLIMITS = 16
FD_SET_MAX = 1 << 20
SUN_PATH = 108  # sizeof(sockaddr_un.sun_path)
UNIX_QUEUE_MAX = 1 << 30  # bytes of one queued message or run (SO_SNDBUF is an int)
#: SOL_SOCKET options a unix socket's image carries (ckpt.collect.fdkinds.unix.OPTIONS)
UNIX_OPTIONS = (16, 34, 76, 83, 7, 8, 18, 12, 36, 9, 13, 20, 21, 29, 35, 40, 10, 42)
#: Supplementary groups a restore can pass to setgroups (through the stub's scratch area)
MAX_GROUPS = 8192
ALL_CAPS = (1 << 41) - 1  # CAP_CHOWN .. CAP_CHECKPOINT_RESTORE (40), as on Linux 5.9+
SECUREBITS = 0xFFF  # the six SECBIT_* flags and their locks (Linux 6.14+)
BPF_INSN, BPF_MAXINSNS = 8, 4096  # struct sock_filter; instructions per cBPF program
TRACKERS = ("uffd-wp", "soft-dirty", "compare")  # = ckpt.track.BACKENDS (tested)
S64_MAX = (1 << 63) - 1
PIPE_MAX = 1 << 31  # the largest F_SETPIPE_SZ
MEMBARRIER_MASK = 0x154  # the REGISTER commands MEMBARRIER_CMD_GET_REGISTRATIONS reports
INT_MAX = (1 << 31) - 1
U32_ID = 0xFFFFFFFE  # a uid or gid (2^32-1 is "none": chown leaves the owner)
MEMFD_NAME_MAX = 249  # memfd_create(2): NAME_MAX less "memfd:"
ALL_SEALS = 0x3F  # F_SEAL_SEAL .. F_SEAL_EXEC
#: what an inotify watch's mask may hold: IN_ALL_EVENTS, IN_ONLYDIR, IN_DONT_FOLLOW,
#: IN_EXCL_UNLINK, IN_ONESHOT (not IN_MASK_ADD, IN_MASK_CREATE: requests, never shown)
INOTIFY_MASK = 0xFFF | 0x01000000 | 0x02000000 | 0x04000000 | 0x80000000
SECCOMP_FILTER_FLAG_LOG = 2  # the only flag PTRACE_SECCOMP_GET_METADATA reports
SCHED_FIFO, SCHED_RR = 1, 2
DELETED = " (deleted)"  # how /proc names a deleted file (a GHOST's OpenFile.path)


def thread_name(v: bytes) -> str | None:
    ok = len(v) < prctl.TASK_COMM_LEN and b"\0" not in v
    return None if ok else "not a thread name (at most 15 bytes, no NUL)"


PID = ranged(1, PID_MAX)
PID_OR_0 = ranged(0, PID_MAX)
ADDR = aligned()
ANY_ADDR = ranged(0, USER_END)  # an address, not necessarily page aligned
SEGMENT = ranged(0, 0xFFFF)


def IP_ADDR(v: bytes) -> str | None:
    return None if len(v) in (4, 16) else f"{len(v)} bytes, not 4 or 16"


FIELDS: dict[type[Message], dict[str, Check]] = {
    img.Inventory: {
        "format_version": ranged(0, FORMAT_VERSION), "root_pid": PID, "pids": PID,
        "parent": path(absolute=False), "kind": one_of("dump", "predump"),
        "tracker": one_of("none", *TRACKERS), "kernel_release": text(64),
        "xstate_size": ranged(0, 1 << 20), "image_id": hex_token, "parent_id": hex_token,
    },
    img.DumpStats: {"pages_precopied": ranged(0, USER_END // PAGE_SIZE)},
    img.WholeVmaCopy: {"start": ADDR, "end": ADDR, "reason": text(512)},
    img.PagemapHead: {"pid": PID, "pages_file_raw_bytes": aligned()},
    img.TrackerState: {"backend": one_of(*TRACKERS), "pid": PID,
                       "target_fd": ranged(-1, NR_OPEN_MAX), "pass_token": hex_token},
    img.PageDigests: {"digests": blob(USER_END, multiple=8)},
    core.Creds: {**{name: ranged(0, 0xFFFFFFFE) for name in (
        "uid", "euid", "suid", "fsuid", "gid", "egid", "sgid", "fsgid", "groups")},
        **{name: ranged(0, ALL_CAPS) for name in (
            "cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb")},
        "securebits": ranged(0, SECUREBITS), "seccomp_mode": one_of(0, 1, 2)},
    core.Itimer: {"which": one_of(0, 1, 2), "interval_us": ranged(0, 1 << 62),
                  "value_us": ranged(1, 1 << 62)},
    core.PosixTimer: {"id": ranged(0, INT_MAX), "notify": one_of(*NOTIFIES),
                      "clock": lambda v: None if valid_clock(v) else "not a timer's clock",
                      "notify_tid": PID_OR_0, "interval_ns": ranged(0, 1 << 62),
                      "value_ns": ranged(0, 1 << 62), "overrun": ranged(0, INT_MAX)},
    core.Setting: {"name": one_of(*prctl.BY_NAME)},
    core.Sched: {"policy": one_of(*POLICIES, *(p | SCHED_RESET_ON_FORK for p in POLICIES)),
                 "priority": ranged(0, 99), "nice": ranged(-20, 19), "cpus": ranged(0, 8191),
                 "ioprio": ranged(0, 0xFFFF)},
    core.SeccompFilter: {"program": blob(BPF_MAXINSNS * BPF_INSN, multiple=BPF_INSN),
                         "flags": one_of(0, SECCOMP_FILTER_FLAG_LOG)},
    core.ProcessEntry: {
        "dumpable": ranged(0, 2), "pid": PID, "ppid": PID_OR_0, "pgid": PID_OR_0,
        "sid": PID_OR_0, "comm": text(64), "cwd_dev": ranged(0, 0xFFFFFFFF),
        "umask": ranged(0, 0o777), "cwd": path(absolute=True), "cmdline": blob(1 << 24),
        "shared_pending": siginfo, "oom_score_adj": ranged(-1000, 1000),
        "membarrier_registrations": mask(MEMBARRIER_MASK, "membarrier registrations"),
        "exit_signal": ranged(0, NSIG - 1), "start_time": ranged(0, S64_MAX),
    },
    core.GuardRegion: {"start": ADDR, "end": ADDR},
    core.ThreadCore: {"tid": PID, "xstate": blob(1 << 20), "clear_child_tid": ANY_ADDR,
                      "robust_list_head": ANY_ADDR, "robust_list_len": ranged(0, 1 << 12),
                      "pending_signals": siginfo, "name": thread_name},
    core.GpRegs: {"cs": SEGMENT, "ss": SEGMENT, "ds": SEGMENT, "es": SEGMENT, "fs": SEGMENT,
                  "gs": SEGMENT, "fs_base": ANY_ADDR, "gs_base": ANY_ADDR},
    core.Rseq: {"abi_pointer": ANY_ADDR, "abi_size": ranged(0, PAGE_SIZE)},
    core.SigAltStack: {"sp": ANY_ADDR, "size": ranged(0, USER_END)},
    core.SigAction: {"signo": ranged(1, NSIG)},
    core.Rlimit: {"resource": ranged(0, RLIM_NLIMITS - 1)},
    core.MmFields: {**{name: ANY_ADDR for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
        "start_stack", "arg_start", "arg_end", "env_start", "env_end")},
        "auxv": blob(PAGE_SIZE, multiple=16), "exe": path(absolute=True)},
    core.Vma: {"prot": ranged(0, 7), "pgoff": aligned(S64_MAX), "path": path(absolute=False),
               "vmflags": text(4), "shm_owner": PID_OR_0, "shm_start": ANY_ADDR},
    core.OpenFile: {"id": ranged(1, FD_SET_MAX), "path": path(absolute=False),
                    "pos": ranged(0, S64_MAX), "size": ranged(0, S64_MAX),
                    "inherit_fd": ranged(-1, 2), "external": text(64),
                    "owner_type": one_of(0, 1, 2), "owner": ranged(0, PID_MAX),
                    "signal": ranged(0, NSIG), "shared_pid": PID_OR_0,
                    "shared_fd": ranged(0, NR_OPEN_MAX - 1)},
    core.FileLock: {"start": ranged(0, S64_MAX), "length": ranged(0, S64_MAX),
                    "signal": ranged(0, NSIG)},
    core.FdEntry: {"fd": ranged(0, NR_OPEN_MAX - 1), "file_id": ranged(1, FD_SET_MAX)},
    core.EventFd: {"count": ranged(0, (1 << 64) - 2)},
    core.Cgroup: {"hierarchy": ranged(0, (1 << 31) - 1),  # the kernel's ids are ints
                  "controllers": text(256), "path": clean_path},
    # size: ckpt.collect.sysvshm.MAX_SEGMENT (not imported: images never reach collect)
    core.SysvShm: {"shmid": ranged(0, (1 << 31) - 1), "mode": ranged(0, 0o777),
                   "size": ranged(1, 1 << 30), "data": blob(2 << 30)},
    core.PipeFile: {"size": ranged(0, PIPE_MAX), "data": blob(PIPE_MAX),
                    "packets": blob(PAGE_SIZE)},
    # fd kinds of ckpt/collect/fdkinds: epoll, timerfd, inotify
    core.EpollWatch: {"tfd": ranged(0, NR_OPEN_MAX - 1)},
    core.TimerFd: {"clockid": one_of(0, 1, 7, 8, 9), "settime_flags": ranged(0, 3),
                   "value_ns": ranged(0, S64_MAX), "interval_ns": ranged(0, S64_MAX),
                   "ticks": ranged(0, S64_MAX), "clock_ns": ranged(0, S64_MAX)},
    core.InotifyWatch: {"wd": ranged(1, 1 << 16), "path": path(absolute=True),
                        "mask": mask(INOTIFY_MASK, "inotify watch flags")},
    core.DeletedDir: {"mode": ranged(0, 0o177777), "uid": ranged(0, 0xFFFFFFFE),
                      "gid": ranged(0, 0xFFFFFFFE)},
    core.MemFd: {"name": text(MEMFD_NAME_MAX), "seals": mask(ALL_SEALS, "F_SEAL_* seals"),
                 "uid": ranged(0, U32_ID), "gid": ranged(0, U32_ID)},
    core.FileChunk: {"offset": ranged(0, S64_MAX)},
    # unix sockets (ckpt/collect/fdkinds/unix.py): names are sun_path's 108 bytes
    core.UnixSocket: {"type": one_of(1, 2, 5), "state": one_of(1, 7, 10),
                      "name": blob(SUN_PATH), "peer_name": blob(SUN_PATH),
                      "backlog": ranged(0, (1 << 31) - 1), "shutdown": ranged(0, 3),
                      "file_mode": ranged(0, 0o7777), "file_uid": ranged(0, 0xFFFFFFFE),
                      "file_gid": ranged(0, 0xFFFFFFFE)},
    core.UnixMessage: {"data": blob(UNIX_QUEUE_MAX), "sender": blob(SUN_PATH),
                       "uid": ranged(0, U32_ID), "gid": ranged(0, U32_ID)},
    core.UnixOption: {"level": one_of(1), "name": one_of(*UNIX_OPTIONS),
                      "value": blob(16)},
    # inet sockets (ckpt/collect/fdkinds/inet.py); option names are checked by the restore
    core.InetSocket: {"family": one_of(2, 10), "type": one_of(1, 2), "protocol": one_of(6, 17),
                      "state": ranged(1, 12), "backlog": ranged(0, INT_MAX),
                      "uid": ranged(0, 0xFFFFFFFE), "shutdown": ranged(0, 3)},
    core.InetAddress: {"addr": IP_ADDR, "port": ranged(0, 0xFFFF), "scope_id": ranged(0, INT_MAX)},
    core.InetOption: {"name": text(32), "value": ranged(-INT_MAX - 1, INT_MAX),
                      "raw": blob(2048)},
    core.InetMembership: {"family": one_of(2, 10), "group": IP_ADDR,
                          "ifindex": ranged(1, INT_MAX), "sources": IP_ADDR},
}
