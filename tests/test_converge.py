"""The migration's convergence policy (ckpt.actions.migrate.converged), a pure function of
the rounds so far."""

from __future__ import annotations

from ckpt.actions.migrate import NOT_CONVERGING, MigrateOptions, Round, converged

OPTS = MigrateOptions(pid=1, host="h", port=1, token=b"t", max_rounds=5, max_downtime_ms=50)


def rounds(*spec: tuple[int, float]) -> list[Round]:
    """(dirty pages, round ms) per round, each page sent as 1 KiB."""
    return [Round(n=i + 1, dirty_pages=p, bytes_sent=p * 1024, seconds=ms / 1000)
            for i, (p, ms) in enumerate(spec)]


def test_goes_on_after_one_round() -> None:
    assert converged(rounds((10_000, 10)), OPTS) == ""


def test_stops_when_the_estimate_fits() -> None:
    # 1000 pages at 1000 pages per 200 ms ... the last round sent 500 pages in 40 ms
    why = converged(rounds((1000, 200), (500, 40)), OPTS)
    assert "fits --max-downtime-ms" in why and "40.0 ms" in why


def test_a_small_round_is_estimated_at_the_link_rate() -> None:
    """154 pages took 57 ms, nearly all of it per-round overhead: at the 100 MiB/s the
    bulk round reached, sending them takes 1.5 ms."""
    why = converged(rounds((102_400, 1000), (154, 57)), OPTS)
    assert "estimated final round 1.5 ms fits" in why, why


def test_goes_on_while_the_dirty_set_shrinks() -> None:
    assert converged(rounds((10_000, 900), (5_000, 450)), OPTS) == ""


def test_a_set_that_barely_shrinks_is_not_converging() -> None:
    assert converged(rounds((8251, 87), (8225, 86)), OPTS) == NOT_CONVERGING
    assert converged(rounds((8000, 87), (9000, 98)), OPTS) == NOT_CONVERGING


def test_max_rounds() -> None:
    spec = [(10_000 // 2**i, 900 / 2**i) for i in range(5)]
    assert converged(rounds(*spec[:4]), OPTS) == ""
    assert converged(rounds(*spec), OPTS) == "--max-rounds 5 reached"
