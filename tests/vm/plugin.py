"""pytest plugin: the ``soft_dirty`` marker.

Tests marked ``@pytest.mark.soft_dirty`` need CONFIG_MEM_SOFT_DIRTY. They are skipped
when the running kernel lacks it; tests/test_in_guest.py runs them inside a QEMU guest
with Debian's kernel, which has it. Load with ``pytest_plugins = ["vm.plugin"]`` in
tests/conftest.py (tests/ is on sys.path there) or ``-p vm.plugin`` with tests/ on
PYTHONPATH.
"""

from __future__ import annotations

import functools

import pytest

SOFT_DIRTY = "soft_dirty"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{SOFT_DIRTY}: needs CONFIG_MEM_SOFT_DIRTY; skipped on kernels without it, run in a "
        "QEMU guest by tests/test_in_guest.py",
    )


@functools.cache
def soft_dirty_missing() -> str | None:
    """Why the running kernel cannot track soft-dirty pages, or None if it can."""
    from ckpt.kernel.probe import probe

    feature = probe().get("soft-dirty")
    return None if feature.ok else feature.detail


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker(SOFT_DIRTY) is not None]
    if not marked:
        return
    why = soft_dirty_missing()
    if why is None:
        return
    skip = pytest.mark.skip(
        reason=f"kernel lacks soft-dirty ({why}); tests/test_in_guest.py runs this in a VM")
    for item in marked:
        item.add_marker(skip)
