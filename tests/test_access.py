"""A restored process never holds a file it could not have: the stub reopens files as
root, so a path that now names another file (a symlink planted between dump and restore)
must not end up in the restored, unprivileged process (ckpt.restore.access).

The target (examples/targets/dropped.py) opens a root-only file and enters a root-only
directory as root, then becomes uid 65534: a legitimate holder of both, as long as they
are the same files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_one_error_line,
    needs_root,
    py_target,
    run_ckpt,
    wait_for_lines,
)

from ckpt.restore.access import legitimate

pytestmark = needs_root


def test_legitimate_rule() -> None:
    same, other, user = (1, 10), (1, 11), (1, 12)
    assert legitimate(same, same, None)  # the very file it had
    assert legitimate(user, same, user)  # a file it may open itself
    assert not legitimate(other, same, None)  # another file, root-only
    assert not legitimate(other, None, user)  # nothing recorded, not what it may open


def start(harness: Harness, tmp_path: Path) -> tuple[int, Path, Path, Path]:
    secret_dir = tmp_path / "private"
    secret_dir.mkdir(mode=0o700)
    data = secret_dir / "data"
    data.write_text("root only\n")
    os.chmod(data, 0o600)
    os.chmod(tmp_path, 0o755)
    out = tmp_path / "out"
    proc = harness.launch([*py_target("dropped.py"), str(data), str(secret_dir)], out)
    wait_for_lines(out, 3)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    return proc.pid, images, data, out


def test_unchanged_root_only_files_restore(harness: Harness, tmp_path: Path) -> None:
    _, images, _, out = start(harness, tmp_path)
    harness.restore_detached(images, "--new-pid", "--skip-file-check")
    lines = wait_for_lines(out, len(out.read_text().splitlines()) + 3)
    assert lines[-1].endswith("uid=65534 data='root only'"), lines[-1]


@pytest.mark.parametrize("what", ["file", "cwd"])
def test_a_planted_file_is_refused(harness: Harness, tmp_path: Path, what: str) -> None:
    """The path now names another root-only file (or directory): opened by the stub as
    root, the restored uid 65534 process would hold it."""
    _, images, data, _ = start(harness, tmp_path)
    secret = tmp_path / "secret"
    if what == "file":
        secret.write_text("shadow\n")
        os.chmod(secret, 0o600)
        data.unlink()
        data.symlink_to(secret)
    else:
        secret.mkdir(mode=0o700)
        data.parent.rename(tmp_path / "moved")
        data.parent.symlink_to(secret)
        (tmp_path / "moved" / "data").rename(secret / "data")
    res = run_ckpt("restore", "-D", images, "--new-pid", "-d", "--skip-file-check")
    line = assert_one_error_line(res)
    assert "would gain access" in line, line
    assert ("fd 3" if what == "file" else "working directory") in line, line
