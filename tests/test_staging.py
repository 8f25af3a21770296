"""ckpt.pagecopy.staging: a live pass and the frozen pass after it, merged into one layer,
must give what restoring the chain parent <- live <- frozen gives (a page-level model)."""

from __future__ import annotations

import random

import pytest

from ckpt.errors import CkptError
from ckpt.pagecopy.incremental import PassPlan
from ckpt.pagecopy.staging import Snap, assemble, live_coverage, merge_plans
from ckpt.ranges import Range, normalize, subtract

P = 4096
N = 64  # pages in the model's address space


def ranges(pages: set[int]) -> list[Range]:
    return normalize((p * P, (p + 1) * P) for p in pages)


def pages_of(rs: list[Range]) -> set[int]:
    return {a // P for s, e in rs for a in range(s, e, P)}


def snap(pages: set[int], tag: int) -> Snap:
    """Each page's bytes say (tag, page number)."""
    buf = bytearray()
    for p in sorted(pages):
        buf += bytes([tag, p]) * (P // 2)
    return Snap(ranges(pages), memoryview(buf))


def random_passes(rng: random.Random) -> tuple[set[int], set[int], set[int], set[int], set[int]]:
    """parent has; live copy and in-parent; frozen copy and in-parent (over live's cover)."""
    parent = {p for p in range(N) if rng.random() < 0.7}
    live_copy = {p for p in range(N) if rng.random() < 0.3}
    live_in_parent = parent - live_copy - {p for p in range(N) if rng.random() < 0.1}
    cover = live_copy | live_in_parent
    frozen_copy = {p for p in range(N) if rng.random() < 0.15}
    frozen_in_parent = cover - frozen_copy - {p for p in range(N) if rng.random() < 0.1}
    return parent, live_copy, live_in_parent, frozen_copy, frozen_in_parent


@pytest.mark.parametrize("seed", range(40))
def test_merge_matches_the_chain(seed: int) -> None:
    rng = random.Random(seed)
    parent, live_copy, live_in_parent, frozen_copy, frozen_in_parent = random_passes(rng)
    live = PassPlan(copy=ranges(live_copy), in_parent_now=ranges(live_in_parent),
                    whole=[(0, P, "live")])
    assert pages_of(live_coverage(live)) == live_copy | live_in_parent
    frozen = PassPlan(copy=ranges(frozen_copy), in_parent_now=ranges(frozen_in_parent),
                      whole=[(P, 2 * P, "frozen")])
    merged = merge_plans(live, frozen)

    # The chain, page by page: the newest layer that stores a page gives its bytes.
    want: dict[int, bytes] = {}
    for p in range(N):
        if p in frozen_copy:
            want[p] = bytes([2, p]) * (P // 2)
        elif p in frozen_in_parent and p in live_copy:
            want[p] = bytes([1, p]) * (P // 2)
    assert pages_of(merged.copy) == set(want)
    assert pages_of(merged.in_parent) == frozen_in_parent - live_copy
    assert pages_of(merged.in_parent) <= parent
    assert merged.precopied == len(set(want) - frozen_copy)
    assert [w[2] for w in merged.whole] == ["live", "frozen"]
    data = b"".join(assemble(merged.copy, snap(frozen_copy, 2), snap(live_copy, 1)))
    assert data == b"".join(want[p] for p in sorted(want))


def test_a_page_neither_pass_read_is_refused() -> None:
    with pytest.raises(CkptError, match="neither pass read"):
        list(assemble(ranges({1, 2, 3}), snap({1}, 2), snap({2}, 1)))


def test_snap_view_outside_its_ranges_is_refused() -> None:
    s = snap({1, 2, 5}, 1)
    assert bytes(s.view(2 * P, 3 * P)) == bytes([1, 2]) * (P // 2)
    assert len(s.view(P, 3 * P)) == 2 * P
    with pytest.raises(CkptError):
        s.view(2 * P, 4 * P)
    with pytest.raises(CkptError):
        s.view(0, P)
    assert subtract(ranges({1, 2, 5}), s.ranges) == []
