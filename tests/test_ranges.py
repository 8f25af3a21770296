"""Range set operations against a page-by-page reference on random inputs."""

from __future__ import annotations

import itertools
import random

import pytest

from ckpt import ranges as R


def as_set(rs: list[R.Range]) -> set[int]:
    return {p for s, e in rs for p in range(s, e)}


def random_ranges(rng: random.Random, n: int, span: int) -> list[R.Range]:
    out = []
    for _ in range(n):
        s = rng.randrange(span)
        out.append((s, s + rng.randrange(0, 12)))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_operations_match_sets(seed: int) -> None:
    rng = random.Random(seed)
    a = R.normalize(random_ranges(rng, rng.randrange(0, 8), 60))
    b = R.normalize(random_ranges(rng, rng.randrange(0, 8), 60))
    for rs in (a, b):
        assert all(s < e for s, e in rs)
        assert all(x[1] < y[0] for x, y in itertools.pairwise(rs)), rs  # merged
    assert as_set(R.intersect(a, b)) == as_set(a) & as_set(b)
    assert as_set(R.subtract(a, b)) == as_set(a) - as_set(b)
    assert as_set(R.union(a, b)) == as_set(a) | as_set(b)
    assert R.total(R.union(a, b)) == len(as_set(a) | as_set(b))
    assert as_set(R.clip(a, 10, 30)) == as_set(a) & set(range(10, 30))
    halves = (((s, (s + e) // 2), ((s + e) // 2, e)) for s, e in a)
    split = [piece for pair in halves for piece in pair if piece[0] < piece[1]]
    assert R.merge_sorted(split) == a


def test_touching_ranges_merge() -> None:
    assert R.normalize([(5, 8), (0, 5), (9, 9), (8, 10)]) == [(0, 10)]
    assert R.subtract([(0, 10)], [(0, 10)]) == []
    assert R.subtract([(0, 10)], [(2, 3), (5, 7)]) == [(0, 2), (3, 5), (7, 10)]


@pytest.mark.parametrize("seed", range(40))
def test_intersect_of_many_with_few_is_the_plain_walk(seed: int) -> None:
    """The bisecting path (one side FEW times shorter) gives exactly the side-by-side
    walk's result, in both argument orders, for wide and narrow ranges (the walk itself
    is checked against sets above)."""
    rng = random.Random(seed)
    many = R.normalize(random_ranges(rng, rng.randrange(40, 400), 3000))
    few = R.normalize((s, s + rng.randrange(1, 400)) for s in
                      (rng.randrange(3000) for _ in range(rng.randrange(1, 3))))
    assert len(few) * R.FEW < len(many)
    want = R.intersect_walk(many, few)
    assert R.intersect(many, few) == want == R.intersect(few, many)
    assert as_set(want) == as_set(many) & as_set(few)
