"""`ckpt show` on image directories built here (no root, no process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt.actions.show import render_text, summarize
from ckpt.images import ImageDir
from ckpt.images.pagemap import Pagemap
from ckpt.images.pb.image_pb2 import Inventory, PagemapHead


def predump(path: Path, parent: str = "") -> None:
    d = ImageDir.create(path)
    d.write_pagemap(42, PagemapHead(pid=42), Pagemap([], []))
    d.write_inventory(Inventory(root_pid=42, pids=[42], kind="predump", tracker="compare",
                                parent=parent))


def test_parents_are_shown_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    predump(tmp_path / "ck" / "1")
    predump(tmp_path / "ck" / "2", "../1")
    predump(tmp_path / "ck" / "3", "../2")
    summary = summarize("ck/3")
    assert summary["parents"] == ["ck/2", "ck/1"]
    assert "parents: ck/2 <- ck/1" in render_text(summary)


def test_parent_through_a_symlink_is_the_real_one(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ck/2 is a link to elsewhere/2: its "../1" is elsewhere/1, not ck/1."""
    monkeypatch.chdir(tmp_path)
    predump(tmp_path / "elsewhere" / "1")
    predump(tmp_path / "elsewhere" / "2", "../1")
    (tmp_path / "ck").mkdir()
    os.symlink(tmp_path / "elsewhere" / "2", tmp_path / "ck" / "2")
    assert summarize("ck/2")["parents"] == [str((tmp_path / "elsewhere" / "1").resolve())]
