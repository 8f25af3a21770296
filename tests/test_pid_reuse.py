"""PID reuse at restore: who holds a dumped id, in words (no root: a /proc tree built
here). The end-to-end case is test_cli_errors.py's
test_restore_names_the_process_holding_a_thread_id."""

from __future__ import annotations

from pathlib import Path

from ckpt.collect.proc import id_holder
from ckpt.restore.tasks import tid_taken


def task(root: Path, tid: int, tgid: int, name: str, state: str = "S (sleeping)") -> None:
    d = root / str(tid)
    d.mkdir(parents=True)
    (d / "status").write_text(f"Name:\t{name}\nState:\t{state}\nTgid:\t{tgid}\nPid:\t{tid}\n"
                              "PPid:\t1\n")


def test_id_holder(tmp_path: Path) -> None:
    task(tmp_path, 812, 812, "sleep")
    task(tmp_path, 813, 812, "sleep")
    task(tmp_path, 900, 900, "gone", "Z (zombie)")
    root = str(tmp_path)
    assert id_holder(812, root=root) == (812, "process 812 (sleep)")
    assert id_holder(813, root=root) == (812, "thread 813 of process 812 (sleep)")
    assert id_holder(900, root=root) == (900, "process 900 (gone, a zombie not reaped yet)")
    assert id_holder(814, root=root) is None


def test_eexist_from_clone3_is_explained(tmp_path: Path) -> None:
    task(tmp_path, 812, 812, "sleep")
    task(tmp_path, 501, 500, "restored")
    root = str(tmp_path)
    assert tid_taken(812, 500, root) == (
        "thread id 812 is taken by process 812 (sleep), which started after the dump; use "
        "--new-pid to restore under new ids")
    assert "exited since" in tid_taken(700, 500, root)
    assert "already used by the process being restored" in tid_taken(501, 500, root)
