"""plan_restore on zdtm-like tree shapes (pure: no root, no processes)."""

from __future__ import annotations

import pytest

from ckpt.errors import ImageError
from ckpt.images.pb import core_pb2 as pb
from ckpt.tree import (
    SIGCHLD,
    ExitHelper,
    Fork,
    Member,
    Setpgid,
    Setsid,
    Subreaper,
    Tree,
    TreeRefusal,
    Zombie,
    helper_pids,
    plan_restore,
    tree_refusal,
)


def m(pid: int, ppid: int, pgid: int, sid: int, **kw: object) -> Member:
    return Member(pid=pid, ppid=ppid, pgid=pgid, sid=sid, **kw)  # type: ignore[arg-type]


def test_tree_lists_children_in_preorder_and_refuses_a_parent_after_its_child() -> None:
    t = Tree([m(10, 1, 10, 10), m(11, 10, 10, 10), m(13, 11, 10, 10), m(12, 10, 10, 10)])
    assert [c.pid for c in t.children(10)] == [11, 12]
    assert [a.pid for a in t.ancestors(t.by_pid[13])] == [11, 10]
    with pytest.raises(ImageError, match="parent 11 does not come before"):
        Tree([m(10, 1, 10, 10), m(13, 11, 10, 10), m(11, 10, 10, 10)])


def test_from_entries_reads_ids_zombie_and_subreaper() -> None:
    root = pb.ProcessEntry(pid=10, ppid=1, pgid=10, sid=10, exit_signal=17,
                           settings=[pb.Setting(name="child_subreaper", value=1)],
                           threads=[pb.ThreadCore(tid=10), pb.ThreadCore(tid=14)])
    z = pb.ProcessEntry(pid=11, ppid=10, pgid=10, sid=10, exit_signal=17, zombie=True,
                        exit_status=7 << 8, comm="z")
    t = Tree.from_entries([root, z])
    assert t.root.subreaper and t.root.tids == (10, 14)
    assert t.by_pid[11] == Member(11, 10, 10, 10, 17, True, 7 << 8, "z", False, (11,))


def test_session_leader_root_forks_children_after_setsid_and_sets_groups() -> None:
    t = Tree([m(100, 1, 100, 100), m(101, 100, 100, 100), m(102, 100, 102, 100),
              m(103, 102, 102, 100, exit_signal=0)])
    assert plan_restore(t, shell_job=False) == [
        Setsid(100), Fork(100, 101, SIGCHLD), Fork(100, 102, SIGCHLD), Fork(102, 103, 0),
        Setpgid(102, 102), Setpgid(101, 100), Setpgid(103, 102)]


def test_shell_job_root_keeps_the_shells_session_and_group() -> None:
    # root 50 in the shell's session 40 and job group 50; child 52 leads its own group
    t = Tree([m(50, 40, 50, 40), m(51, 50, 50, 40), m(52, 50, 52, 40)])
    assert plan_restore(t, shell_job=True) == [
        Fork(50, 51, SIGCHLD), Fork(50, 52, SIGCHLD), Setpgid(52, 52)]


def test_child_forked_before_its_parents_setsid_is_forked_first() -> None:
    # 2 forked 3, then setsid(): 3 stays in the root's session 1
    t = Tree([m(1, 0, 1, 1), m(2, 1, 2, 2), m(3, 2, 1, 1), m(4, 2, 2, 2)])
    plan = plan_restore(t, shell_job=False)
    assert plan[:5] == [Setsid(1), Fork(1, 2, SIGCHLD), Fork(2, 3, SIGCHLD), Setsid(2),
                        Fork(2, 4, SIGCHLD)]


def test_born_sid_chain_goes_up_to_the_first_ancestor_in_the_session() -> None:
    # 3 forked 4 then setsid; 2 forked 3 then setsid: 4 is in 1's session
    t = Tree([m(1, 0, 1, 1), m(2, 1, 2, 2), m(3, 2, 3, 3), m(4, 3, 1, 1)])
    plan = plan_restore(t, shell_job=False)
    assert plan.index(Fork(2, 3, SIGCHLD)) < plan.index(Setsid(2))
    assert plan.index(Fork(3, 4, SIGCHLD)) < plan.index(Setsid(3))


def test_conflicting_born_sessions_are_refused() -> None:
    t = Tree([m(1, 0, 1, 1), m(2, 1, 2, 2), m(3, 2, 3, 3), m(4, 3, 1, 1), m(5, 3, 2, 2)])
    assert "cannot tell whether process 3 was born in session 1 or 2" in str(
        tree_refusal(t, shell_job=False))


def test_reparented_member_of_a_gone_session_gets_a_session_helper() -> None:
    # 5 was forked by 4 (setsid, exited); reparented to the subreaper root
    t = Tree([m(1, 0, 1, 1, subreaper=True), m(5, 1, 4, 4), m(6, 1, 6, 4)])
    plan = plan_restore(t, shell_job=False)
    assert plan == [Subreaper(1), Setsid(1), Fork(1, 4, 0, helper=True), Setsid(4),
                    Fork(4, 5, SIGCHLD), Fork(4, 6, SIGCHLD), Setpgid(6, 6), Setpgid(5, 4),
                    ExitHelper(4, 1)]
    assert helper_pids(plan) == [4]


def test_reparent_to_a_parent_that_is_no_subreaper_is_refused() -> None:
    t = Tree([m(1, 0, 1, 1), m(5, 1, 4, 4)])
    with pytest.raises(TreeRefusal, match="parent 1 is no child subreaper"):
        plan_restore(t, shell_job=False)


def test_reparent_into_a_session_whose_leader_lives_is_refused() -> None:
    t = Tree([m(1, 0, 1, 1, subreaper=True), m(4, 1, 4, 4), m(5, 1, 4, 4)])
    # 5 is in 4's session but 4 is not its parent nor an ancestor
    assert "only when the session's leader is gone" in str(tree_refusal(t, shell_job=False))


def test_group_whose_leader_is_gone_gets_a_helper_under_its_first_member() -> None:
    t = Tree([m(1, 0, 1, 1), m(2, 1, 7, 1), m(3, 2, 7, 1)])
    plan = plan_restore(t, shell_job=False)
    assert plan == [Setsid(1), Fork(1, 2, SIGCHLD), Fork(2, 3, SIGCHLD),
                    Fork(2, 7, 0, helper=True), Setpgid(7, 7), Setpgid(2, 7), Setpgid(3, 7),
                    ExitHelper(7, 2)]


def test_shell_jobs_group_gets_no_helper() -> None:
    t = Tree([m(50, 40, 45, 40), m(51, 50, 45, 40)])
    assert plan_restore(t, shell_job=True) == [Fork(50, 51, SIGCHLD)]


def test_zombies_exit_last_and_may_lead_a_group() -> None:
    t = Tree([m(1, 0, 1, 1), m(2, 1, 2, 1, zombie=True, exit_status=7 << 8, comm="z"),
              m(3, 1, 2, 1)])
    plan = plan_restore(t, shell_job=False)
    assert plan[-3:] == [Setpgid(2, 2), Setpgid(3, 2), Zombie(2, 1, 7 << 8, SIGCHLD, "z")]


@pytest.mark.parametrize(("members", "why"), [
    ([m(1, 0, 1, 1), m(2, 1, 2, 1, zombie=True), m(3, 2, 2, 1)], "zombie 2 has children"),
    ([m(1, 0, 1, 1), m(2, 1, 1, 1, zombie=True, exit_status=17)], "signal 17, which ends no"),
    ([m(1, 0, 1, 1), m(2, 1, 1, 1, zombie=True, exit_status=0x137f)], "no exit"),
    ([m(1, 0, 1, 1), m(2, 1, 3, 2)], "leads session 2 but is in process group 3"),
    ([m(1, 0, 1, 1), m(2, 1, 2, 2), m(3, 2, 2, 1)], "group 2 spans sessions 2 and 1"),
    ([m(1, 0, 1, 5), m(2, 1, 2, 9)], "no process of the tree leads"),
])
def test_shapes_the_kernel_cannot_make_or_restore_cannot_build_are_refused(
        members: list[Member], why: str) -> None:
    assert why in str(tree_refusal(Tree(members), shell_job=False))


def test_a_buildable_tree_has_no_refusal() -> None:
    assert tree_refusal(Tree([m(1, 0, 1, 1), m(2, 1, 2, 1)]), shell_job=False) is None


def test_a_zombie_session_leader_forks_its_reparented_members_before_it_dies() -> None:
    t = Tree([m(1, 0, 1, 1, subreaper=True), m(4, 1, 4, 4, zombie=True, comm="sh"),
              m(5, 1, 4, 4)])
    plan = plan_restore(t, shell_job=False)
    assert plan == [Subreaper(1), Setsid(1), Fork(1, 4, SIGCHLD), Setsid(4),
                    Fork(4, 5, SIGCHLD), Setpgid(5, 4), Zombie(4, 1, 0, SIGCHLD, "sh")]
