"""Run the tests marked ``soft_dirty`` inside a QEMU guest whose kernel has soft-dirty.

The host kernel may lack CONFIG_MEM_SOFT_DIRTY (those tests then skip on the host), so
this boots Debian's 6.1 kernel once under QEMU (tests/vm/run_in_vm.py) and runs
``pytest -m soft_dirty tests/`` there, with the same python, venv and checkout. It fails
if the guest run fails, collects no such test, or the guest kernel lacks soft-dirty.

Skips when QEMU, a static busybox or the kernel package is unavailable, unless
CKPT_REQUIRE_VM=1 (CI sets it), which turns that into a failure.
"""

from __future__ import annotations

import io
import os
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from vm import run_in_vm

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
GUEST_TIMEOUT = float(os.environ.get("CKPT_VM_TIMEOUT", "1800"))
PROBE_TAG = "guest-soft-dirty:"

PROBE = (
    "from ckpt.kernel.probe import probe; f = probe().get('soft-dirty'); "
    f"print({PROBE_TAG!r}, f.ok, f.detail, flush=True)"
)


@pytest.fixture(scope="module")
def kernel() -> run_in_vm.Kernel:
    if os.environ.get("CKPT_IN_VM"):
        pytest.skip("already inside the test VM")
    try:
        run_in_vm.find_qemu()
        run_in_vm.find_busybox()
        return run_in_vm.setup_kernel()
    except run_in_vm.VMError as exc:
        if os.environ.get("CKPT_REQUIRE_VM") == "1":
            pytest.fail(f"CKPT_REQUIRE_VM=1 but the test VM is unavailable: {exc}")
        pytest.skip(f"test VM unavailable: {exc}")


def test_soft_dirty_tests_pass_in_guest(kernel: run_in_vm.Kernel, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    junit = tmp_path / "guest-junit.xml"
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    pytest_argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "vm.plugin",
                   "-p", "no:cacheprovider", "-m", "soft_dirty", f"--junitxml={junit}",
                   str(TESTS)]
    script = f'{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)}; exec "$@"'
    monkeypatch.chdir(ROOT)
    out = io.BytesIO()
    opts = run_in_vm.Options(timeout=GUEST_TIMEOUT, rw_dirs=(tmp_path.resolve(),),
                             env=(("PYTHONPATH", pythonpath),))
    rc = run_in_vm.run(["sh", "-c", script, "sh", *pytest_argv], opts, out=out)
    output = out.getvalue().decode(errors="replace")
    print(f"--- guest ({kernel.version}) output:\n{output}")
    tail = "\n".join(output.splitlines()[-40:])

    probe_lines = [line for line in output.splitlines() if line.startswith(PROBE_TAG)]
    assert probe_lines, f"the soft-dirty probe did not run in the guest:\n{tail}"
    assert probe_lines[0].split()[1] == "True", f"guest kernel lacks soft-dirty: {probe_lines[0]}"
    assert rc != run_in_vm.EXIT_TIMEOUT, f"the guest timed out after {GUEST_TIMEOUT:.0f}s:\n{tail}"
    assert rc != run_in_vm.EXIT_NO_STATUS, f"the guest did not report a status:\n{tail}"
    assert rc != 5, f"no soft_dirty test was collected in the guest:\n{tail}"
    assert rc == 0, f"soft_dirty tests failed in the guest (pytest exit {rc}):\n{tail}"

    assert junit.exists(), "the guest wrote no junit report into the shared directory"
    suite = ET.parse(junit).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    assert passed > 0, f"no soft_dirty test passed in the guest: {counts}\n{tail}"
