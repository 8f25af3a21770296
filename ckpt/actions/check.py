"""`ckpt check`: what the kernel probe (ckpt.kernel.probe) means for this tool."""

from __future__ import annotations

from ckpt.kernel.probe import FEATURE_NAMES, Capabilities


def meaning(cap: Capabilities) -> list[str]:
    """What the probe results mean for predump, dump and restore."""
    out: list[str] = []
    uffd_ok = cap.ok("uffd-wp-async") and cap.ok("pagemap-scan")
    sd_ok = cap.ok("soft-dirty")
    if uffd_ok:
        out.append("predump: uffd-wp tracking" + ("" if sd_ok else " (soft-dirty unavailable)"))
    elif sd_ok:
        out.append("predump: soft-dirty tracking (uffd-wp async unavailable)")
    else:
        out.append("predump: compare backend: no kernel tracking, every page is compared "
                   "with the parent's")
    out.append(
        "dump: tasks frozen with PTRACE_SEIZE + INTERRUPT"
        if cap.ok("ptrace-seize")
        else "dump: impossible: tasks cannot be seized"
    )
    out.append(
        "dump: memory copied with process_vm_readv"
        if cap.ok("process_vm_readv")
        else "dump: memory read through /proc/PID/mem (process_vm_readv unavailable)"
    )
    if cap.ok("xstate") and cap.xcr0 is not None:
        out.append(
            f"dump: FPU state as NT_X86_XSTATE ({cap.xstate_size} bytes); "
            f"restore needs a CPU with xcr0 covering {cap.xcr0:#x}"
        )
    if cap.ok("clone3-set-tid") and cap.ns_last_pid_writable:
        out.append("restore: exact pids (ns_last_pid for the process, clone3 set_tid for "
                   "threads)")
    elif cap.ns_last_pid_writable:
        out.append("restore: exact pids via ns_last_pid (racy: another fork may take the pid)")
    else:
        out.append("restore: pids cannot be chosen: use --new-pid")
    out.append(
        "restore: anonymous memory filled with UFFDIO_COPY (no page zeroed first)"
        if cap.ok("uffd-copy")
        else "restore: every page written with process_vm_writev (userfaultfd unavailable)"
    )
    out += creds_meaning(cap)
    if cap.ok("vdso-layout"):
        out.append(f"restore: vdso/vvar moved with mremap ({cap.get('vdso-layout').detail})")
    return out


def missing(cap: Capabilities, wanted: tuple[str, ...]) -> str:
    """Why ``check --feature`` fails: the wanted features that are unknown or do not work
    here, or "" if all work."""
    unknown = [n for n in wanted if n not in FEATURE_NAMES]
    if unknown:
        return f"unknown feature {', '.join(unknown)} (known: {', '.join(FEATURE_NAMES)})"
    absent = [cap.get(n) for n in dict.fromkeys(wanted) if not cap.ok(n)]
    return "; ".join(f"{f.name} is not available: {f.detail}" for f in absent)


def creds_meaning(cap: Capabilities) -> list[str]:
    """What a user can do with credentials and seccomp filters here."""
    return [
        "restore: credentials restored exactly, last (uids, gids, groups, the five "
        "capability sets, securebits, no_new_privs, dumpable)"
        if cap.ok("creds-restore")
        else "restore: refused: credentials cannot be restored here (needs root)",
        "dump: seccomp filters read per thread and suspended while ckpt works; restore "
        "reinstalls them exactly"
        if cap.ok("seccomp-restore")
        else "dump: refused: seccomp filters cannot be read or suspended here",
    ]


def format_capabilities(cap: Capabilities) -> str:
    """One line per feature: ``ok  ptrace-seize      detail`` / ``NO  soft-dirty  ...``."""
    width = max(len(f.name) for f in cap.features)
    return "\n".join(
        f"{'ok' if f.ok else 'NO'}  {f.name:<{width}}  {f.detail}" for f in cap.features
    )
