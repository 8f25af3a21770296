"""The kernel capability probe: runs for real on this machine (6.18, root, no soft-dirty)."""

from __future__ import annotations

import os
import re

import pytest

from ckpt.actions import check
from ckpt.kernel import probe as pr
from ckpt.kernel.ptrace import Tracee


def children_of_self() -> list[int]:
    pids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids += [int(x) for x in f.read().split()]
    return pids


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def mapping_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture(scope="module")
def cap() -> pr.Capabilities:
    return pr.probe()


def test_every_feature_reported(cap: pr.Capabilities) -> None:
    assert [f.name for f in cap.features] == list(pr.FEATURE_NAMES)
    assert all(f.detail for f in cap.features)
    with pytest.raises(KeyError):
        cap.get("no-such-feature")


def test_soft_dirty_unavailable_here(cap: pr.Capabilities) -> None:
    f = cap.get("soft-dirty")
    assert not f.ok
    assert f.detail == "clear_refs accepted but bit 55 never set (CONFIG_MEM_SOFT_DIRTY off)"


def test_features_available_here(cap: pr.Capabilities) -> None:
    for name in ("ptrace-seize", "xstate", "process_vm_readv", "uffd-wp-async", "pagemap-scan",
                 "uffd-copy", "clone3-set-tid", "ns-last-pid", "vdso-layout"):
        assert cap.ok(name), cap.get(name)
    assert "EINVAL" in cap.get("pagemap-scan").detail
    assert cap.ns_last_pid_writable


def test_xstate_values(cap: pr.Capabilities) -> None:
    assert cap.xstate_size is not None and cap.xcr0 is not None
    assert 576 < cap.xstate_size <= 16384  # legacy area + header, at least
    assert cap.xcr0 & 0b11 == 0b11  # x87 and SSE are always enabled
    assert f"{cap.xstate_size} bytes" in cap.get("xstate").detail


def test_uffd_features(cap: pr.Capabilities) -> None:
    from ckpt.kernel import uffd

    assert cap.uffd_features & uffd.WP_ASYNC_FEATURES == uffd.WP_ASYNC_FEATURES


def test_vdso_layout(cap: pr.Capabilities) -> None:
    detail = cap.get("vdso-layout").detail
    assert re.fullmatch(r"(\w+ \d+p, )+(contiguous|gaps [-\d,]+)", detail), detail
    assert "vdso " in detail
    assert detail == "vvar 4p, vvar_vclock 2p, vdso 2p, contiguous"  # 6.18 layout


def test_meaning(cap: pr.Capabilities) -> None:
    lines = check.meaning(cap)
    assert "predump: uffd-wp tracking (soft-dirty unavailable)" in lines
    assert "restore: exact pids (ns_last_pid for the process, clone3 set_tid for threads)" \
        in lines
    assert "dump: memory copied with process_vm_readv" in lines
    assert all(re.match(r"(predump|dump|restore): ", line) for line in lines)


def test_meaning_fallbacks() -> None:
    feats = tuple(pr.Feature(n, False, "x") for n in pr.FEATURE_NAMES)
    lines = check.meaning(pr.Capabilities(feats, ns_last_pid_writable=True))
    assert lines[0].startswith("predump: compare backend")
    assert "dump: impossible: tasks cannot be seized" in lines
    assert any(line.startswith("restore: exact pids via ns_last_pid") for line in lines)
    assert "restore: every page written with process_vm_writev (userfaultfd unavailable)" in lines
    sd_only = tuple(pr.Feature(n, n == "soft-dirty", "x") for n in pr.FEATURE_NAMES)
    assert check.meaning(pr.Capabilities(sd_only))[0].startswith("predump: soft-dirty tracking")


def test_missing_features() -> None:
    """`check --feature`: unknown names and features that do not work are the error."""
    feats = tuple(pr.Feature(n, n != "soft-dirty", f"why {n}") for n in pr.FEATURE_NAMES)
    caps = pr.Capabilities(feats)
    assert check.missing(caps, ()) == ""
    assert check.missing(caps, ("uffd-copy", "ns-last-pid")) == ""
    assert check.missing(caps, ("soft-dirty", "soft-dirty")) == \
        "soft-dirty is not available: why soft-dirty"
    assert check.missing(caps, ("nope",)).startswith("unknown feature nope (known: ")


def test_format(cap: pr.Capabilities) -> None:
    lines = check.format_capabilities(cap).splitlines()
    assert len(lines) == len(pr.FEATURE_NAMES)
    sd = next(line for line in lines if " soft-dirty " in line)
    assert re.fullmatch(r"NO  soft-dirty +clear_refs accepted but bit 55 never set "
                        r"\(CONFIG_MEM_SOFT_DIRTY off\)", sd)
    assert re.match(r"ok  ptrace-seize +\S", lines[0])


def test_probe_leaves_nothing_behind() -> None:
    before = (children_of_self(), open_fds(), mapping_count())
    for _ in range(3):
        pr.probe()
    assert children_of_self() == [] == before[0]
    assert open_fds() == before[1]
    assert mapping_count() <= before[2]  # freed mappings may merge with neighbours
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_failing_probe_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(extra: object) -> pr.Feature:
        raise RuntimeError("injected failure")

    probes = tuple((names, boom if names == ("ptrace-seize", "xstate") else fn)
                   for names, fn in pr._PROBES)
    monkeypatch.setattr(pr, "_PROBES", probes)
    cap = pr.probe()
    assert cap.get("ptrace-seize") == pr.Feature("ptrace-seize", False,
                                                 "probe failed: injected failure")
    assert not cap.ok("xstate")
    assert cap.ok("uffd-wp-async")
    assert children_of_self() == []


def test_ptrace_probe_cleans_up_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after SEIZE (here: in DETACH) still kills and reaps the child."""

    def flaky(self: Tracee, sig: int = 0) -> None:
        raise RuntimeError("detach failed")

    monkeypatch.setattr(Tracee, "detach", flaky)
    cap = pr.probe()
    assert not cap.ok("ptrace-seize")
    assert "detach failed" in cap.get("ptrace-seize").detail
    assert children_of_self() == []
