"""Probe the running kernel once into a capabilities record (like CRIU's kerndat).

Every feature is tried for real, never inferred from a version number. Each probe cleans
up after itself (children killed and reaped, fds closed, mappings unmapped) even when it
fails, and a probe that raises reports ``ok=False`` with the reason instead of crashing.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ckpt.errors import KernelError
from ckpt.kernel import pagemap as pm
from ckpt.kernel import uffd
from ckpt.kernel.probe_creds import probe_creds_restore, probe_seccomp_restore
from ckpt.kernel.ptrace import (
    NT_X86_XSTATE,
    PTRACE_EVENT_STOP,
    PTRACE_INTERRUPT,
    PTRACE_SEIZE,
    Tracee,
    ptrace,
)
from ckpt.kernel.sys import NR, PAGE_SIZE, kill_and_reap, syscall, vm_transfer

PAGE = PAGE_SIZE

XSTATE_XCR0_OFFSET = 464  # sw_reserved bytes of the fxsave area: Linux stores XCR0 there

XFEATURE_NAMES = {
    0: "x87", 1: "sse", 2: "avx", 3: "bndregs", 4: "bndcsr", 5: "opmask", 6: "zmm_hi256",
    7: "hi16_zmm", 9: "pkru", 11: "cet_u", 12: "cet_s", 17: "amx_tilecfg", 18: "amx_tiledata",
}

FEATURE_NAMES = (
    "ptrace-seize", "xstate", "process_vm_readv", "soft-dirty", "uffd-wp-async",
    "pagemap-scan", "uffd-copy", "clone3-set-tid", "ns-last-pid", "vdso-layout",
    "creds-restore", "seccomp-restore",
)


@dataclass(frozen=True)
class Feature:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Capabilities:
    """Probe results, one :class:`Feature` per name of FEATURE_NAMES, plus raw values."""

    features: tuple[Feature, ...]
    xstate_size: int | None = None
    xcr0: int | None = None
    uffd_features: int = 0
    ns_last_pid_writable: bool = False

    def get(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def ok(self, name: str) -> bool:
        return self.get(name).ok


@dataclass
class _Extra:
    xstate_size: int | None = None
    xcr0: int | None = None
    uffd_features: int = 0
    ns_last_pid_writable: bool = False


# ---- private helpers (the real ptrace module lives elsewhere; probes stay self-contained) ----


PR_SET_PDEATHSIG = 1
_PROT_RW = 0x3
_MAP_PRIVATE_ANON = 0x02 | 0x20



@contextlib.contextmanager
def _anon_map(npages: int) -> Iterator[int]:
    """A fresh private anonymous RW mapping in this process, unmapped on exit."""
    length = npages * PAGE
    addr = syscall(NR.mmap, 0, length, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0, what="mmap")
    try:
        yield addr
    finally:
        syscall(NR.munmap, addr, length, what="munmap")


def _vma_flags(addr: int) -> list[str]:
    """VmFlags of the /proc/self/smaps entry containing addr."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise KernelError(errno.ENOENT, f"no VMA at {addr:#x} in /proc/self/smaps")


def _forked_sleeper() -> int:
    """Fork a child that only sleeps until killed; the caller must kill_and_reap it.
    It dies with us, too: a ckpt killed mid-probe leaves no sleeper behind."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            syscall(NR.prctl, PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            while os.getppid() == parent:
                signal.pause()
        finally:
            os._exit(0)
    return pid


def _wait_stopped(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            if not os.WIFSTOPPED(status):
                raise KernelError(errno.ECHILD, f"child {pid} ended: status {status:#x}")
            return status
        if time.monotonic() > deadline:
            raise KernelError(errno.ETIMEDOUT, f"child {pid} did not stop")
        time.sleep(0.001)


# ---- individual probes; each returns Feature(s) or raises ----


def _xcr0_names(xcr0: int) -> str:
    return " ".join(XFEATURE_NAMES.get(b, f"bit{b}") for b in range(64) if xcr0 >> b & 1)


def _probe_ptrace(extra: _Extra) -> list[Feature]:
    """SEIZE + INTERRUPT a sleeping child, read its xstate regset, DETACH."""
    pid = _forked_sleeper()
    try:
        ptrace(PTRACE_SEIZE, pid)
        ptrace(PTRACE_INTERRUPT, pid)
        status = _wait_stopped(pid, timeout=5.0)
        event = status >> 16
        if event != PTRACE_EVENT_STOP:
            return [
                Feature("ptrace-seize", False, f"INTERRUPT stop has status {status:#x}"),
                Feature("xstate", False, "no event stop to read registers in"),
            ]
        seize = Feature("ptrace-seize", True, "SEIZE+INTERRUPT gives PTRACE_EVENT_STOP")
        try:
            xstate = _read_xstate(pid, extra)
        except Exception as exc:
            xstate = Feature("xstate", False, f"probe failed: {exc}")
        Tracee(pid).detach()
        return [seize, xstate]
    finally:
        kill_and_reap(pid)


def _read_xstate(pid: int, extra: _Extra) -> Feature:
    raw = Tracee(pid).get_regset(NT_X86_XSTATE)
    size = len(raw)
    if size < XSTATE_XCR0_OFFSET + 8:
        return Feature("xstate", False, f"NT_X86_XSTATE regset only {size} bytes")
    xcr0 = int.from_bytes(raw[XSTATE_XCR0_OFFSET : XSTATE_XCR0_OFFSET + 8], "little")
    extra.xstate_size, extra.xcr0 = size, xcr0
    return Feature("xstate", True, f"{size} bytes, xcr0 {xcr0:#x} ({_xcr0_names(xcr0)})")


def _probe_vm_readv(extra: _Extra) -> Feature:
    """Read from a child a buffer that was changed in the parent after fork."""
    before = os.urandom(256)
    buf = ctypes.create_string_buffer(before, len(before))
    pid = _forked_sleeper()
    try:
        ctypes.memset(buf, 0, len(before))  # ours changes; the child's copy keeps `before`
        out = ctypes.create_string_buffer(len(before))
        n = vm_transfer(False, pid, [(ctypes.addressof(out), ctypes.addressof(buf), len(before))])
        if n != len(before) or out.raw != before:
            return Feature("process_vm_readv", False, f"read {n} bytes with wrong content")
        return Feature("process_vm_readv", True, f"read {n} bytes from a child")
    finally:
        kill_and_reap(pid)


def _probe_soft_dirty(extra: _Extra) -> Feature:
    """The kernel selftest's way: fresh VMA has `sd`; a write after clear_refs sets bit 55."""
    with _anon_map(1) as addr:
        ctypes.memset(addr, 1, 1)
        flags = _vma_flags(addr)
        vma_sd = "sd" in flags
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
        except OSError as exc:
            return Feature("soft-dirty", False, f"clear_refs 4 refused: {exc.strerror}")
        ctypes.memset(addr, 2, 1)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            entry = pm.read_pagemap_entries(fd, addr, addr + PAGE)[0]
        finally:
            os.close(fd)
        bit = bool(entry & pm.PM_SOFT_DIRTY)
    if vma_sd and bit:
        return Feature("soft-dirty", True, "new VMA has sd; write after clear_refs sets bit 55")
    if not vma_sd and not bit:
        why = "clear_refs accepted but bit 55 never set (CONFIG_MEM_SOFT_DIRTY off)"
    else:
        why = "inconsistent: " + ("fresh VMA lacks sd" if bit else "VMA has sd, bit 55 unset")
    return Feature("soft-dirty", False, why)


def _probe_uffd_wp(extra: _Extra) -> Feature:
    npages = 4
    fd = uffd.create_uffd_self(uffd.UFFD_CREATE_FLAGS)
    try:
        granted = uffd.uffd_api(fd, uffd.WP_ASYNC_FEATURES)
        extra.uffd_features = granted
        if granted & uffd.WP_ASYNC_FEATURES != uffd.WP_ASYNC_FEATURES:
            # Never write to a protected page without WP_ASYNC: the write would block.
            return Feature("uffd-wp-async", False, f"features granted {granted:#x}")
        with _anon_map(npages) as addr:
            ctypes.memset(addr, 1, npages * PAGE)
            uffd.uffd_register_wp(fd, addr, npages * PAGE)
            uffd.uffd_writeprotect(fd, addr, npages * PAGE)
            ctypes.memset(addr + 2 * PAGE, 2, 1)
            pfd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                got = pm.pagemap_scan(
                    pfd, addr, addr + npages * PAGE,
                    category_mask=pm.PAGE_IS_WRITTEN, return_mask=pm.PAGE_IS_WRITTEN,
                )
            finally:
                os.close(pfd)
            want = [(addr + 2 * PAGE, addr + 3 * PAGE, pm.PAGE_IS_WRITTEN)]
            if got != want:
                shown = [((s - addr) // PAGE, (e - addr) // PAGE) for s, e, _ in got]
                return Feature("uffd-wp-async", False, f"WRITTEN pages {shown}, want [(2, 3)]")
    finally:
        os.close(fd)
    return Feature("uffd-wp-async", True, "WP_ASYNC|WP_UNPOPULATED; one write -> one WRITTEN page")


def _probe_uffd_copy(extra: _Extra) -> Feature:
    """What restore fills anonymous memory with (ckpt.restore.uffd_fill), same flags."""
    fd = uffd.create_uffd_self(os.O_CLOEXEC | os.O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY)
    try:
        uffd.uffd_api(fd, uffd.UFFD_FEATURE_SIGBUS)
        with _anon_map(1) as src, _anon_map(2) as dst:
            ctypes.memset(src, 7, PAGE)
            uffd.uffd_register(fd, dst, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
            uffd.uffd_copy(fd, dst, src, PAGE)  # the second page stays missing: not read
            got = ctypes.string_at(dst, PAGE)
            uffd.uffd_unregister(fd, dst, 2 * PAGE)
    finally:
        os.close(fd)
    if got != b"\x07" * PAGE:
        return Feature("uffd-copy", False, "UFFDIO_COPY put other bytes in the page")
    return Feature("uffd-copy", True, "MISSING registration, SIGBUS, UFFDIO_COPY of a page")


def _probe_pagemap_scan(extra: _Extra) -> Feature:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _anon_map(2) as addr:
            ctypes.memset(addr, 1, 1)
            try:
                regions = pm.pagemap_scan(fd, addr, addr + 2 * PAGE)
            except KernelError as exc:
                if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                    return Feature("pagemap-scan", False, "no PAGEMAP_SCAN ioctl (Linux < 6.7)")
                raise
            try:
                pm.pagemap_scan(fd, addr, addr + PAGE, category_mask=1 << 40)
                unknown = "unknown category accepted"
            except KernelError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                unknown = "unknown category -> EINVAL"
        present = [(s - addr) // PAGE for s, _, c in regions if c & pm.PAGE_IS_PRESENT]
        if present != [0]:
            return Feature("pagemap-scan", False, f"touched page 0, PRESENT regions at {present}")
    finally:
        os.close(fd)
    return Feature("pagemap-scan", True, f"ioctl {pm.PAGEMAP_SCAN:#x} works; {unknown}")


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
                     "stack_size", "tls", "set_tid", "set_tid_size")
    ]


assert ctypes.sizeof(_CloneArgs) == 80  # CLONE_ARGS_SIZE_VER1


def _probe_ns_last_pid(extra: _Extra) -> Feature:
    """Write ns_last_pid's current value back: the file is mode 0666, so opening it proves
    nothing; the write needs CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) over the pid
    namespace. Rewriting the value only changes which free pid the next fork tries."""
    path = "/proc/sys/kernel/ns_last_pid"
    try:
        with open(path, "rb") as f:
            value = f.read().strip()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
    except OSError as exc:
        extra.ns_last_pid_writable = False
        return Feature("ns-last-pid", False, f"writing {path}: {exc.strerror or exc}")
    extra.ns_last_pid_writable = True
    return Feature("ns-last-pid", True, f"{path} written: restore can choose the pid")


def _probe_clone3(extra: _Extra) -> Feature:
    """clone3 asking for our own (taken) pid: EEXIST means set_tid works; no process made."""
    tids = (ctypes.c_int32 * 1)(os.getpid())
    args = _CloneArgs(exit_signal=17, set_tid=ctypes.addressof(tids), set_tid_size=1)
    try:
        res = syscall(NR.clone3, ctypes.addressof(args), ctypes.sizeof(args), what="clone3")
    except KernelError as exc:
        err = exc.errno
        if err == errno.EEXIST:
            detail = "set_tid honoured (EEXIST on a taken pid)"
            return Feature("clone3-set-tid", True, detail)
        reason = {
            errno.ENOSYS: "no clone3",
            errno.E2BIG: "clone_args without set_tid",
            errno.EINVAL: "set_tid rejected",
            errno.EPERM: "set_tid needs CAP_SYS_ADMIN over the pid namespace",
        }.get(err, str(exc))
        return Feature("clone3-set-tid", False, reason)
    if res == 0:  # cannot happen (our pid is taken) -- but never run on in a stray child
        os._exit(0)
    kill_and_reap(res)
    return Feature("clone3-set-tid", False, f"clone3 created pid {res} instead of EEXIST")


def _probe_vdso(extra: _Extra) -> Feature:
    special: dict[str, tuple[int, int]] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] in ("[vvar]", "[vvar_vclock]", "[vdso]"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                special[parts[5].strip("[]")] = (lo, hi)
    if "vdso" not in special:
        return Feature("vdso-layout", False, "no [vdso] mapping")
    names = sorted(special, key=lambda n: special[n][0])
    sizes = ", ".join(f"{n} {(special[n][1] - special[n][0]) // PAGE}p" for n in names)
    gaps = [special[b][0] - special[a][1] for a, b in itertools.pairwise(names)]
    layout = "contiguous" if all(g == 0 for g in gaps) else "gaps " + ",".join(map(str, gaps))
    return Feature("vdso-layout", True, f"{sizes}, {layout}")


# ---- the record ----

_Probe = Callable[[_Extra], "Feature | list[Feature]"]

_PROBES: tuple[tuple[tuple[str, ...], _Probe], ...] = (
    (("ptrace-seize", "xstate"), _probe_ptrace),
    (("process_vm_readv",), _probe_vm_readv),
    (("soft-dirty",), _probe_soft_dirty),
    (("uffd-wp-async",), _probe_uffd_wp),
    (("pagemap-scan",), _probe_pagemap_scan),
    (("uffd-copy",), _probe_uffd_copy),
    (("clone3-set-tid",), _probe_clone3),
    (("ns-last-pid",), _probe_ns_last_pid),
    (("vdso-layout",), _probe_vdso),
    (("creds-restore",), lambda _: Feature("creds-restore", *probe_creds_restore())),
    (("seccomp-restore",), lambda _: Feature("seccomp-restore", *probe_seccomp_restore())),
)


@functools.cache
def probe_once() -> Capabilities:
    """probe(), once per ckpt process: what the kernel offers does not change meanwhile
    (migrate and page-server would otherwise fork probe children every pass)."""
    return probe()


def probe() -> Capabilities:
    """Probe every feature (about 10-50 ms); never raises for a failing probe."""
    extra = _Extra()
    found: dict[str, Feature] = {}
    for names, fn in _PROBES:
        try:
            res = fn(extra)
            for feat in res if isinstance(res, list) else [res]:
                found[feat.name] = feat
        except Exception as exc:
            for name in names:
                found[name] = Feature(name, False, f"probe failed: {exc}")
    for name in FEATURE_NAMES:
        found.setdefault(name, Feature(name, False, "not probed"))
    return Capabilities(tuple(found[n] for n in FEATURE_NAMES), **dataclasses.asdict(extra))
