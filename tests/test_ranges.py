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
