"""redis-server with a BGSAVE child (the fork that writes the RDB, slowed down by
rdb-key-save-delay) dumped and restored mid-save: after the restore the child finishes
the RDB, the parent reaps it and logs success, and the RDB holds every key."""

from __future__ import annotations

import pytest
from conftest import (
    TREE_HOWS,
    Harness,
    dump_tree,
    needs_root,
    read_lines,
    restore_tree,
    tree_ids,
    wait_for,
    wait_for_tree,
)
from test_daemons import KEYS, check_redis, fill_redis, redis, start_redis

pytestmark = needs_root
SUCCESS = "Background saving terminated with success"


@pytest.mark.parametrize("how", TREE_HOWS)
def test_redis_bgsave_child_finishes_after_restore(harness: Harness, how: str) -> None:
    proc, port = start_redis(harness)
    fill_redis(port)
    assert redis("127.0.0.1", port, [("CONFIG", "SET", "rdb-key-save-delay", "20000"),
                                     ("BGSAVE",)]) == ["+OK", "+Background saving started"]
    wait_for_tree(harness, proc.pid, 2)  # the BGSAVE child
    before = tree_ids(proc.pid)
    # the BGSAVE child keeps a copy of a client connection its parent closed since
    # (CLOSE_WAIT): restored closed, as it is
    images = dump_tree(harness, proc, how, flags=("--tcp-close",))
    log = harness.tmp / "redis.out"
    assert SUCCESS not in "\n".join(read_lines(log))
    root = restore_tree(harness, images, before)
    wait_for(lambda: any(SUCCESS in line for line in read_lines(log)) or None, 60,
             "redis to log the BGSAVE's success")
    wait_for_tree(harness, root, 1)  # the child reaped
    assert (harness.tmp / "dump.rdb").stat().st_size > KEYS * 10
    check_redis(port)
