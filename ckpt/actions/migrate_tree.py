"""The end of a tree's migration when the destination can restore it only after the
source's copy is dead (its pids are held there by this very tree: one kernel, as with the
migration demo's network-namespace hosts; ckpt.transfer.tree).

    freeze, dump, send    as for one process; RestoreDone{pid=0}: "kill it first"
    kill                  every member SIGKILLed and reaped from ptrace (the dump returns)
    commit                the destination waits until the pids are released, restores the
                          tree running, and Acks                (downtime ends)

Never two copies: the destination restores only on the Commit, sent after the kill. If it
cannot restore the tree (Ack{ok=false}: nothing of it runs there), the tree is restored
here again from the same images; if the link breaks instead, nobody can tell whether it
runs there: the images are kept and the error says where.
"""

from __future__ import annotations

from pathlib import Path

from ckpt.errors import CkptError
from ckpt.images import ImageDir
from ckpt.transfer.client import commit_deferred
from ckpt.transfer.tree import tree_entries, wait_ids_free
from ckpt.transfer.wire import Conn, TransferError


class TreeLost(CkptError):
    """The source's tree is gone and it runs nowhere we know of; its images are kept."""


def restore_after_kill(conn: Conn, images: Path, root: int) -> None:
    """Commit the killed tree of ``root`` (dumped into ``images``) to the destination;
    if it could not restore it, restore it here. Raises once it runs here again (the
    migration failed) or when nobody knows where it runs (TreeLost: images kept)."""
    try:
        why = commit_deferred(conn)
    except TransferError as exc:
        raise TreeLost(f"the tree of {root} is gone here, and {conn.peer} did not confirm "
                       f"that it restored it ({exc}); its images are kept in {images}: if it "
                       f"does not run there, `ckpt restore -d -D {images}` brings it back "
                       "here") from None
    if not why:
        return
    from ckpt.actions.restore import RestoreOptions, restore

    try:
        wait_ids_free(tree_entries(ImageDir.open(images)))
        res = restore(RestoreOptions(images_dir=str(images)))
    except CkptError as exc:
        raise TreeLost(f"{conn.peer} could not restore the tree of {root} ({why}), nor could "
                       f"this host ({exc}); its images are kept in {images}") from None
    raise CkptError(f"{conn.peer} could not restore the tree ({why}); it runs here again "
                    f"as pid {res.pid}")
