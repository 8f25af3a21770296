"""dump --incremental's pre-copy (ckpt.pagecopy.staging) with the target changing between
the live pass and the freeze: a whole phase of the scenarios (random writes, a VMA
replaced in place, MAP_FIXED, mremap, mprotect, MADV_DONTNEED, brk, new mmaps) runs
right after the live pass read its pages. The merged layer must hold the frozen state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Bins, Harness
from test_incremental import predump, require, restore, scenarios, show, stats

import ckpt.actions.dump as dump_mod
import ckpt.actions.member as member_mod
from ckpt.actions.dump import DumpOptions


def test_changes_between_the_live_pass_and_the_freeze(harness: Harness, bins: Bins,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    require("uffd-wp")
    t = scenarios(harness, bins, tmp_path)
    ck = tmp_path / "ck"
    predump(t.pid, ck / "1", "--track=uffd-wp")
    t.advance()
    real = member_mod.live_pass
    ran: list[bool] = []

    def live_pass_then_a_phase(*args: Any, **kwargs: Any) -> member_mod.LivePass | None:
        live = real(*args, **kwargs)
        ran.append(live is not None)
        t.advance()  # the target changes after the live pass read its pages
        return live

    monkeypatch.setattr(member_mod, "live_pass", live_pass_then_a_phase)
    dump_mod.dump(DumpOptions(pid=t.pid, images_dir=str(ck / "2"), incremental=True,
                              prev_images_dir="../1"))
    t.proc.wait(timeout=10)
    assert ran == [True]
    st = stats(show(ck / "2"))
    # phase 1's writes the live pass read and phase 2 left alone, and phase 2's own
    assert st.get("pages_precopied", 0) > 0 and st["pages_written"] > st["pages_precopied"], st
    restore(harness, ck / "2", t.pid)
    t.assert_verifies()
    t.advance()
    t.assert_verifies()
