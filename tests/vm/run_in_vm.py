#!/usr/bin/env python3
"""Run a command inside a throw-away QEMU guest booted with Debian's 6.1 kernel.

    python tests/vm/run_in_vm.py [--setup] [options] -- CMD [ARGS...]

Why: soft-dirty page tracking needs CONFIG_MEM_SOFT_DIRTY, which the development host's
kernel may lack; Debian's linux-image-amd64 (6.1, bookworm) has it.

How: QEMU (TCG; KVM is not required) boots a ``microvm`` machine with the uncompressed
kernel and a small busybox initramfs. The host's root directory is shared read-only over
virtio-9p; the guest puts a tmpfs overlay on top of it (writes succeed and are thrown
away), chroots into it and runs CMD as root in the caller's working directory. So the
guest runs the very same python, venv, pytest and project checkout; only the kernel
differs. There is no network in the guest.

CMD's stdout and stderr come back on our stdout (through the serial console), and CMD's
exit status becomes ours. Our own failures have codes of their own: 125 when the guest
did not report a status (or could not be started), 124 when --timeout expired.

Assets (the kernel package's vmlinux and the few modules the guest needs) are cached in
``.vmcache/`` at the project root (``CKPT_VM_CACHE`` overrides). ``--setup`` builds them;
a run builds them too if missing. Setup needs ``apt-get`` (the kernel package is fetched
with ``apt-get download`` and unpacked with ``dpkg -x``, never installed), and the host
needs ``qemu-system-x86_64`` (package qemu-system-x86) and a static ``busybox`` (package
busybox-static).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import lzma
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path(os.environ.get("CKPT_VM_CACHE") or ROOT / ".vmcache")
KERNEL_META_PACKAGE = "linux-image-amd64"
# Modules the guest init loads (their dependencies are added from the .ko's modinfo).
WANTED_MODULES = ("virtio_mmio", "9pnet_virtio", "9p", "overlay")
# Host environment variables handed to CMD when set (besides PATH).
PASSED_ENV = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHASHSEED", "CI")

EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 125
GRACE_AFTER_STATUS = 15.0  # seconds the guest gets to power off after reporting

_ELF_MAGIC = b"\x7fELF"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_PR_SET_PDEATHSIG = 1


class VMError(Exception):
    """The guest cannot be set up or started (missing tool, download failed, ...)."""


# --------------------------------------------------------------------------- host tools


def find_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VMError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    return qemu


def _elf_is_static(data: bytes) -> bool:
    """True if an ELF64 little-endian executable has no PT_INTERP program header."""
    if data[:4] != _ELF_MAGIC or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> Path:
    candidates = [os.environ.get("CKPT_VM_BUSYBOX"), "/bin/busybox", shutil.which("busybox")]
    for cand in candidates:
        if cand and Path(cand).is_file():
            with open(cand, "rb") as f:
                if _elf_is_static(f.read(4096)):
                    return Path(cand)
    raise VMError("no statically linked busybox found (apt-get install busybox-static)")


# --------------------------------------------------------------------------- kernel assets


@dataclass(frozen=True)
class Kernel:
    """A cached, ready-to-boot kernel: uncompressed vmlinux plus the modules in load order."""

    directory: Path
    version: str
    package: str
    vmlinux: Path
    modules: tuple[Path, ...]


def _run(cmd: Sequence[str | Path], what: str, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                             check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise VMError(f"{what}: {exc.filename} not found") from exc
    if res.returncode != 0:
        raise VMError(f"{what} failed (exit {res.returncode}): {shlex.join(map(str, cmd))}\n"
                      f"{res.stdout}{res.stderr}")
    return res.stdout


def resolve_kernel_package() -> str:
    """The concrete linux-image-6.*-amd64 package behind the linux-image-amd64 metapackage."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE],
               f"apt-cache depends {KERNEL_META_PACKAGE}")
    for line in out.splitlines():
        match = re.fullmatch(r"\s*Depends:\s*(linux-image-[0-9][^\s]*)\s*", line)
        if match:
            return match.group(1)
    raise VMError(f"apt-cache knows no linux-image-* dependency of {KERNEL_META_PACKAGE} "
                  "(is this a Debian host? run apt-get update)")


def _modinfo(ko: bytes) -> dict[str, str]:
    """key=value strings of an ELF64 kernel module's .modinfo section."""
    if ko[:4] != _ELF_MAGIC or ko[4] != 2 or ko[5] != 1:
        raise VMError("not an ELF64 little-endian kernel module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", ko,
                                                                   shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if ko[stroff + name : ko.index(b"\0", stroff + name)] == b".modinfo":
            info: dict[str, str] = {}
            for item in ko[off : off + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise VMError(f"unsupported module compression: {path}")


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _collect_modules(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko) of wanted and their dependencies, dependencies first."""
    index = {_module_name(p): p for p in moddir.rglob("*.ko*") if ".ko" in p.name}
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {_module_name(Path(line)) for line in builtin_file.read_text().split()}
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name in chain:
            raise VMError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in index:
            if name in builtin:
                seen.add(name)
                return
            raise VMError(f"kernel module {name} not found under {moddir}")
        data = _read_module(index[name])
        for dep in filter(None, _modinfo(data).get("depends", "").split(",")):
            visit(dep, (*chain, name))
        seen.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return ordered


def _extract_vmlinux(vmlinuz: Path) -> bytes | None:
    """The ELF kernel inside a bzImage's xz payload, or None if it is not xz-compressed."""
    data = vmlinuz.read_bytes()
    start = data.find(_XZ_MAGIC)
    if start < 0:
        return None
    with contextlib.suppress(lzma.LZMAError):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        if out[:4] == _ELF_MAGIC:
            return out
    return None


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load_kernel(directory: Path) -> Kernel | None:
    try:
        meta = json.loads((directory / "kernel.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    vmlinux = directory / meta["vmlinux"]
    modules = tuple(directory / "modules" / m for m in meta["modules"])
    if not vmlinux.is_file() or not all(m.is_file() for m in modules):
        return None
    return Kernel(directory, meta["version"], meta["package"], vmlinux, modules)


def setup_kernel(cache: Path = DEFAULT_CACHE, *, deb: Path | None = None,
                 log: BinaryIO | None = None) -> Kernel:
    """Return the cached kernel, downloading and preparing it first if needed."""
    directory = cache / "kernel"
    kernel = _load_kernel(directory)
    if kernel is not None:
        return kernel
    with _locked(cache):
        kernel = _load_kernel(directory)  # another process may have built it meanwhile
        if kernel is not None:
            return kernel

        def say(msg: str) -> None:
            if log is not None:
                log.write(f"run_in_vm: {msg}\n".encode())
                log.flush()

        with tempfile.TemporaryDirectory(prefix="setup-", dir=cache) as tmp_name:
            tmp = Path(tmp_name)
            if deb is None:
                package = resolve_kernel_package()
                say(f"downloading {package}")
                _run(["apt-get", "download", "-q", package], "apt-get download", cwd=tmp)
                found = sorted(tmp.glob(f"{package}_*.deb"))
                if not found:
                    raise VMError(f"apt-get download {package} produced no .deb")
                deb = found[0]
            package = deb.name.split("_", 1)[0]
            say(f"unpacking {deb.name}")
            unpacked = tmp / "root"
            _run(["dpkg-deb", "-x", deb, unpacked], "dpkg-deb -x")
            versions = sorted(p.name for p in (unpacked / "lib" / "modules").iterdir())
            if len(versions) != 1:
                raise VMError(f"{deb.name}: expected one module tree, found {versions}")
            version = versions[0]
            boot = unpacked / "boot"
            config = (boot / f"config-{version}").read_text()
            if "\nCONFIG_MEM_SOFT_DIRTY=y\n" not in config:
                raise VMError(f"{package} is built without CONFIG_MEM_SOFT_DIRTY")

            out = tmp / "kernel"
            (out / "modules").mkdir(parents=True)
            (out / f"config-{version}").write_text(config)
            vmlinux = _extract_vmlinux(boot / f"vmlinuz-{version}")
            if vmlinux is not None:  # boots via PVH, skipping in-guest decompression
                (out / "vmlinux").write_bytes(vmlinux)
                image = "vmlinux"
            else:
                shutil.copyfile(boot / f"vmlinuz-{version}", out / "vmlinuz")
                image = "vmlinuz"
            names = []
            for name, data in _collect_modules(unpacked / "lib" / "modules" / version,
                                               WANTED_MODULES):
                (out / "modules" / f"{name}.ko").write_bytes(data)
                names.append(f"{name}.ko")
            meta = {"package": package, "version": version, "vmlinux": image, "modules": names}
            (out / "kernel.json").write_text(json.dumps(meta, indent=1) + "\n")
            if directory.exists():
                shutil.rmtree(directory)
            out.rename(directory)
            say(f"kernel {version} ready in {directory}")
    kernel = _load_kernel(directory)
    assert kernel is not None
    return kernel


# --------------------------------------------------------------------------- initramfs


class Cpio:
    """Writer of an uncompressed "newc" cpio archive, as the kernel unpacks an initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
             ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        self._parts += [header, encoded, b"\0" * (-(len(header) + len(encoded)) % 4),
                        data, b"\0" * (-len(data) % 4)]

    def directory(self, name: str) -> None:
        self._add(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self._parts)


# The guest's /init. /run.env sets MARK (the exit-status marker), CWD and RWDIRS (count).
INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin
hostname ckpt-vm
. /run.env
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || echo "vm-init: insmod $m failed"
done
status() { echo "$MARK=$1"; sync; poweroff -f; sleep 30; }
mount -t tmpfs -o size=50% tmpfs /ovl && mkdir /ovl/upper /ovl/work || status 125
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower ||
  { echo "vm-init: cannot mount the host root over 9p"; status 125; }
mount -t overlay -o lowerdir=/lower,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot ||
  { echo "vm-init: cannot mount the overlay"; status 125; }
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/run
i=0
while [ "$i" -lt "$RWDIRS" ]; do
  d=$(cat "/rwdir.$i")
  mkdir -p "$R$d" &&
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none "rw$i" "$R$d" ||
    { echo "vm-init: cannot mount $d read-write"; status 125; }
  i=$((i + 1))
done
cp /cmd $R/run/ckpt-vm-cmd
chroot $R /bin/sh /run/ckpt-vm-cmd </dev/null
status $?
"""


def build_initramfs(kernel: Kernel, busybox: Path, *, marker: str, cwd: Path,
                    argv: Sequence[str], env: dict[str, str], rw_dirs: Sequence[Path]
                    ) -> bytes:
    """The whole initramfs for one run: busybox, modules, /init and the command."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lower", "ovl", "newroot", "lib",
              "lib/modules"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for ko in kernel.modules:
        cpio.file(f"lib/modules/{ko.name}", ko.read_bytes())
    cpio.file("modules.order", "".join(f"{ko.name}\n" for ko in kernel.modules).encode())
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("run.env", f"MARK={marker}\nRWDIRS={len(rw_dirs)}\n".encode())
    for i, rw in enumerate(rw_dirs):
        cpio.file(f"rwdir.{i}", str(rw).encode())
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines += [f"cd {shlex.quote(str(cwd))} || exit 125", f"exec {shlex.join(argv)}"]
    cpio.file("cmd", ("\n".join(lines) + "\n").encode())
    return cpio.finish()


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Options:
    cpus: int = 2
    mem: str = "2G"
    timeout: float = 1800.0
    rw_dirs: tuple[Path, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    verbose: bool = False


def host_tsc_khz() -> int | None:
    """Under TCG the guest's TSC runs at the host's rate; telling the guest kernel skips
    a PIT calibration that fails on a busy host and then hangs the boot."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return round(float(value) * 1000)
    return None


def guest_env(extra: Iterable[tuple[str, str]]) -> dict[str, str]:
    env = {"HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
           "CKPT_IN_VM": "1"}
    env.update((k, os.environ[k]) for k in PASSED_ENV if k in os.environ)
    env.update(extra)
    return env


def qemu_command(qemu: str, kernel: Kernel, initrd: Path, opts: Options) -> list[str]:
    append = ["console=ttyS0", "panic=-1", "mitigations=off", "tsc=reliable", "pci=off"]
    if not opts.verbose:
        append.append("quiet")
    khz = host_tsc_khz()
    if khz:
        append.append(f"tsc_early_khz={khz}")
    cmd = [qemu, "-M", "microvm", "-accel", "tcg,thread=multi", "-cpu", "max",
           "-smp", str(opts.cpus), "-m", opts.mem, "-nodefaults", "-no-user-config",
           "-display", "none", "-serial", "stdio", "-no-reboot",
           "-kernel", str(kernel.vmlinux), "-initrd", str(initrd), "-append", " ".join(append),
           "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
           "-device", "virtio-9p-device,fsdev=hostroot,mount_tag=hostroot"]
    for i, d in enumerate(opts.rw_dirs):
        if "," in str(d):
            raise VMError(f"cannot share a path containing a comma: {d}")
        cmd += ["-fsdev", f"local,id=rw{i},path={d},security_model=none,multidevs=remap",
                "-device", f"virtio-9p-device,fsdev=rw{i},mount_tag=rw{i}"]
    return cmd


# Kernel lines that are expected noise on a microvm machine even with "quiet".
_NOISE = re.compile(rb"\[\s*\d+\.\d+\] (reboot: Power down|PCI: Fatal: No config space .*)")


class _Terminated(Exception):
    """SIGTERM or SIGHUP arrived: unwind so that QEMU is killed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL should this harness die without cleaning up."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run(argv: Sequence[str], opts: Options, *, cwd: Path | None = None,
        out: BinaryIO | None = None, cache: Path = DEFAULT_CACHE) -> int:
    """Run argv in a fresh guest; stream its output to out; return its exit status."""
    out = out if out is not None else sys.stdout.buffer
    qemu = find_qemu()
    busybox = find_busybox()
    kernel = setup_kernel(cache, log=sys.stderr.buffer)
    cwd = (cwd or Path.cwd()).resolve()
    marker = "__CKPT_VM_STATUS_" + secrets.token_hex(8)
    initrd_data = build_initramfs(kernel, busybox, marker=marker, cwd=cwd, argv=argv,
                                  env=guest_env(opts.env), rw_dirs=opts.rw_dirs)
    with tempfile.TemporaryDirectory(prefix="ckpt-vm-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        initrd.write_bytes(initrd_data)
        cmd = qemu_command(qemu, kernel, initrd, opts)
        return _supervise(cmd, marker.encode(), opts.timeout, out)


def _supervise(cmd: list[str], marker: bytes, timeout: float, out: BinaryIO) -> int:
    """Run QEMU, forward its console, and return the exit status the guest reported."""
    status: int | None = None
    deadline = time.monotonic() + timeout
    old_handlers: dict[int, signal._HANDLER] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old_handlers[sig] = signal.signal(sig, _raise_terminated)
    # Own session: a ^C on the terminal reaches only us, and we stop QEMU ourselves.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        pending = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                out.write(f"run_in_vm: timed out after {timeout:.0f}s\n".encode())
                out.flush()
                return EXIT_TIMEOUT
            if not sel.select(min(left, 1.0)):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if status is None and marker in line:
                    before, _, after = line.partition(marker + b"=")
                    if before:
                        out.write(before + b"\n")
                    with contextlib.suppress(ValueError):
                        status = int(after.strip())
                    deadline = min(deadline, time.monotonic() + GRACE_AFTER_STATUS)
                elif status is None and not _NOISE.fullmatch(line):
                    out.write(line + b"\n")
            out.flush()
        if pending and status is None:
            out.write(pending.rstrip(b"\r") + b"\n")
            out.flush()
        proc.wait()
    except KeyboardInterrupt:
        out.write(b"run_in_vm: interrupted, killing the guest\n")
        out.flush()
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
    if status is None:
        out.write(f"run_in_vm: the guest ended without reporting a status "
                  f"(qemu exit {proc.returncode})\n".encode())
        out.flush()
        return EXIT_NO_STATUS
    return status


# --------------------------------------------------------------------------- command line


def _parse_env(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"bad variable name in {item!r}")
    if not sep:
        if name not in os.environ:
            raise argparse.ArgumentTypeError(f"{name} is not set here")
        value = os.environ[name]
    return name, value


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run_in_vm.py", description=__doc__.split("\n\n")[0] if __doc__ else None,
        usage="%(prog)s [--setup] [options] -- CMD [ARGS...]")
    parser.add_argument("--setup", action="store_true",
                        help="prepare the cached kernel and check the host tools, then exit "
                        "(or run CMD if one is given)")
    parser.add_argument("--kernel-deb", type=Path,
                        help="with --setup: use this linux-image .deb instead of downloading")
    parser.add_argument("--cpus", type=int, default=int(os.environ.get("CKPT_VM_CPUS", "2")))
    parser.add_argument("--mem", default=os.environ.get("CKPT_VM_MEM", "2G"))
    parser.add_argument("--timeout", type=float,
                        default=float(os.environ.get("CKPT_VM_TIMEOUT", "1800")),
                        help="seconds before the guest is killed (exit status 124)")
    parser.add_argument("--rw", action="append", default=[], type=Path, metavar="DIR",
                        help="share host directory DIR read-write at the same path")
    parser.add_argument("--env", action="append", default=[], type=_parse_env,
                        metavar="NAME[=VALUE]", help="pass an environment variable to CMD")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="asset cache directory (default: $CKPT_VM_CACHE or .vmcache/)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the boot log")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    cmd: list[str] = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
    try:
        if ns.setup:
            started = time.monotonic()
            find_qemu()
            find_busybox()
            kernel = setup_kernel(ns.cache, deb=ns.kernel_deb, log=sys.stderr.buffer)
            print(f"run_in_vm: {kernel.package} ({kernel.version}) ready in "
                  f"{kernel.directory} ({time.monotonic() - started:.1f}s)", file=sys.stderr)
            if not cmd:
                return 0
        if not cmd:
            parser.error("no command given (put it after --)")
        rw_dirs = tuple(d.resolve() for d in ns.rw)
        for d in rw_dirs:
            if not d.is_dir():
                parser.error(f"--rw {d}: not a directory")
        opts = Options(cpus=ns.cpus, mem=ns.mem, timeout=ns.timeout, rw_dirs=rw_dirs,
                       env=tuple(ns.env), verbose=ns.verbose)
        return run(cmd, opts, cache=ns.cache)
    except VMError as exc:
        print(f"run_in_vm: {exc}", file=sys.stderr)
        return EXIT_NO_STATUS
    except KeyboardInterrupt:
        return 130
    except _Terminated as exc:
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
