"""Tracking state consumed by a pass is never trusted again (ckpt/track/ledger.py): a
second pass from the same parent, as after a pass that failed half-way or a branch of
the chain, falls back to whole copies instead of missing what the first one consumed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Bins, Harness, assert_one_error_line, assert_running_untraced, run_ckpt
from test_incremental import (
    covered_whole,
    final_dump,
    predump,
    require,
    restore,
    scenarios,
    show,
    stats,
)

from ckpt.errors import CkptError
from ckpt.track import ledger

CONSUMED = "consumed by another pass"


@pytest.mark.parametrize("backend", [
    pytest.param("uffd-wp", id="uffd-wp"),
    pytest.param("soft-dirty", id="soft-dirty", marks=pytest.mark.soft_dirty),
])
def test_second_pass_from_a_consumed_parent(harness: Harness, bins: Bins, tmp_path: Path,
                                            backend: str) -> None:
    """ck/2 consumed the tracking ck/1 armed, and the phase's writes are in ck/2 only. A
    dump from ck/1 again must not trust the tracker (it would take those pages from ck/1,
    stale): every VMA is copied whole, saying why, and the restore verifies."""
    require(backend)
    t = scenarios(harness, bins, tmp_path)
    ck = tmp_path / "ck"
    predump(t.pid, ck / "1", f"--track={backend}")
    t.advance()
    predump(t.pid, ck / "2", "--prev-images-dir", "../1")
    res = final_dump(t, ck / "3", "../1")
    st = stats(show(ck / "3"))
    assert CONSUMED in res.stderr, res.stderr
    a = t.addr("a")
    assert covered_whole(st, a, a + 1024 * 4096), st
    restore(harness, ck / "3", t.pid)
    t.assert_verifies()


def test_unwritable_state_dir_is_one_error_line(harness: Harness, bins: Bins,
                                                tmp_path: Path) -> None:
    """Where the ledger cannot be written, the pass stops before it consumes anything:
    one error line naming the place, the target runs on untraced."""
    require("uffd-wp")
    t = scenarios(harness, bins, tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    res = run_ckpt("predump", "-t", str(t.pid), "-D", tmp_path / "ck",
                   prefix=("env", f"CKPT_STATE_DIR={blocker}"))
    line = assert_one_error_line(res)
    assert "cannot record the tracking state" in line and str(blocker) in line, line
    assert_running_untraced(t.pid)
    t.assert_verifies()


def test_ledger_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path / "state"))
    assert ledger.last_token(123, 456) == ""
    one, two = ledger.new_token(), ledger.new_token()
    assert one != two
    ledger.claim(123, 456, one)
    ledger.claim(123, 789, two)  # the same pid, another process (start time)
    assert (ledger.last_token(123, 456), ledger.last_token(123, 789)) == (one, two)
    ledger.claim(123, 456, two)
    assert ledger.last_token(123, 456) == two
    assert oct((tmp_path / "state" / "track").stat().st_mode & 0o777) == "0o700"
    ledger.forget(123, 456)
    assert ledger.last_token(123, 456) == ""
    assert os.listdir(tmp_path / "state" / "track") == ["123-789"]
    monkeypatch.setenv("CKPT_STATE_DIR", str(tmp_path / "state" / "track" / "123-789"))
    with pytest.raises(CkptError, match="cannot record the tracking state"):
        ledger.claim(1, 2, one)
