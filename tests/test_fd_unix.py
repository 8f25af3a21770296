"""Unix sockets come back with their peers, names, queues, shutdown state and options
(ckpt/collect/fdkinds/unix.py, unix_build.py, ckpt/kernel/unix_diag.py); what a restore
could not bring back is refused before the freeze, naming the fd."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    TARGETS,
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    require_reachable_by_others,
    run_ckpt,
    wait_for,
    wait_for_line,
)
from test_creds import NOBODY, SYSTEM_PYTHON
from test_migrate import page_server_in, two_hosts  # noqa: F401 (a fixture)

from ckpt.collect.fdkinds.unix import OPTIONS, Seen, external, path_name, refusal
from ckpt.collect.fdkinds.unix_build import component
from ckpt.collect.fdkinds.unix_queue import merge_runs
from ckpt.collect.holders import scan_holders
from ckpt.errors import ImageError
from ckpt.images.fields import UNIX_OPTIONS
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import validate
from ckpt.kernel.sys import pidfd_getfd
from ckpt.kernel.unix_diag import UnixDiag, build_request, parse_replies, parse_reply

# --------------------------------------------------------------------------- pure

# unix_diag's answer for a connected stream socket (captured on this kernel): inode
# 518274, peer 518277 (attribute 2), rqueue 0 wqueue 0 (4), shutdown 0 (6)
CAPTURED = bytes.fromhex(
    "3c00000014000000010000000f4300000101010082e8070004100000000000000800020085e80700"
    "0c00040000000000000000000500060000000000")


def test_parse_unix_diag_reply() -> None:
    d = parse_reply(CAPTURED)
    assert d == UnixDiag(ino=518274, type=socket.SOCK_STREAM, state=1, peer=518277)


def test_parse_unix_diag_error_and_request() -> None:
    error = bytes.fromhex("2400000002000000000000000000000" "0fe ffffff".replace(" ", "")
                          + "00" * 16)
    with pytest.raises(Exception, match="No such file or directory"):
        parse_reply(error)
    req = build_request(42)
    assert len(req) == 40 and int.from_bytes(req[24:28], "little") == 42


def test_parse_unix_diag_dump() -> None:
    """A dump's read: messages, each padded to 4 bytes, until NLMSG_DONE."""
    done = bytes.fromhex("14000000030002000100000000000000" "00000000")
    found, finished = parse_replies(CAPTURED + CAPTURED + done)
    assert [d.ino for d in found] == [518274, 518274] and finished
    assert parse_replies(CAPTURED) == ([parse_reply(CAPTURED)], False)


def test_scan_holders_reads_fd_links(tmp_path: Path) -> None:
    for pid, fd, link in ((10, 3, "socket:[5]"), (11, 4, "socket:[5]"), (11, 5, "socket:[6]"),
                          (12, 3, "socket:[5]"), (13, 0, "/dev/null")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        (tmp_path / str(pid) / "fd" / str(fd)).symlink_to(link)
    (tmp_path / "self").mkdir()
    found = scan_holders({"socket:[5]", "socket:[6]", "socket:[7]"}, {12}, root=str(tmp_path))
    assert found == {"socket:[5]": (10, 11), "socket:[6]": (11,)}


def test_path_names_lose_the_kernels_terminating_nul() -> None:
    assert path_name(b"/run/x.sock\0") == b"/run/x.sock"
    assert path_name(b"\0abstract\0") == b"\0abstract\0"


PAIR = UnixDiag(ino=10, type=socket.SOCK_STREAM, state=1, peer=11)
OK = Seen(diag=PAIR, peer=replace(PAIR, ino=11, peer=10), peer_here=True,
          listeners=frozenset(), scm_fds=0, oob=False, name_file="same")
LISTENER = UnixDiag(ino=12, type=socket.SOCK_STREAM, state=10, name=b"/run/s.sock\0",
                    rqueue=0, wqueue=5)

REFUSALS: dict[str, tuple[Seen, str]] = {
    "held outside": (replace(OK, outside=(77, 78)),
                     "also held by process 77, 78 outside the dump"),
    "other netns": (replace(OK, diag=None), "unix_diag does not show"),
    "pending connections": (replace(OK, diag=replace(LISTENER, rqueue=2), peer=None,
                                    peer_here=False),
                            "(/run/s.sock) with 2 connection(s) not accepted yet"),
    "fds in flight": (replace(OK, scm_fds=3), "3 file descriptor(s) in flight (SCM_RIGHTS)"),
    "oob": (replace(OK, oob=True), "out-of-band byte"),
    "error pending": (replace(OK, error=True), "an error pending (SO_ERROR)"),
    "filter": (replace(OK, filtered=True), "a socket filter (SO_ATTACH_FILTER)"),
    "relative path": (replace(OK, diag=replace(LISTENER, name=b"rel.sock\0"), peer=None,
                              peer_here=False), "bound to a relative path (rel.sock)"),
    "name now another file": (replace(OK, diag=LISTENER, peer=None, peer_here=False,
                                      name_file="other"),
                              "bound to /run/s.sock, which now names another file"),
    "directory gone": (replace(OK, diag=LISTENER, peer=None, peer_here=False,
                               name_file="gone"),
                       "bound to /run/s.sock, whose directory is gone"),
    "in a backlog": (replace(OK, diag=replace(PAIR, peer=0), peer=None, peer_here=False),
                     "waits in a listener's backlog"),
    "external, data queued from outside": (
        replace(OK, diag=replace(PAIR, rqueue=9), peer_here=False),
        "9 bytes queued from socket:[11] outside the process, which a socket given by "
        "--inherit-fd would not hold"),
    "dgram peer by relative path": (
        replace(OK, diag=replace(PAIR, type=socket.SOCK_DGRAM), peer_here=False,
                peer=replace(PAIR, ino=11, name=b"log.sock\0")),
        "connected to log.sock (socket:[11]), a relative path outside the process"),
    "both ends bound": (replace(OK, diag=replace(PAIR, name=b"\0a"),
                                peer=replace(PAIR, ino=11, peer=10, name=b"\0b")),
                        "bound to @a and connected to another bound one (socket:[11])"),
    "path listener gone": (replace(OK, diag=replace(PAIR, name=b"/run/s.sock\0")),
                           "connected through /run/s.sock, whose listening socket is gone"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_unrestorable_unix_socket_is_refused(case: str) -> None:
    seen, says = REFUSALS[case]
    why = refusal(seen)
    assert why is not None and says in why, why
    assert why.endswith("not supported yet")


def test_external_sockets_are_recorded_but_not_for_migrate() -> None:
    """A stream (or unnamed dgram) peer outside the process: restore takes the socket
    from --inherit-fd; migrate (externals=False) refuses it."""
    dgram = replace(PAIR, type=socket.SOCK_DGRAM)
    for seen in (replace(OK, peer_here=False),
                 replace(OK, diag=dgram, peer=replace(dgram, ino=11), peer_here=False)):
        assert external(seen) and refusal(seen) is None
        why = refusal(seen, externals=False)
        assert why is not None and "connected to socket:[11] outside the process: this " \
            "cannot be connected on another host (restore's --inherit-fd)" in why, why
    assert not external(OK)


def test_restorable_unix_sockets_are_not_refused() -> None:
    dgram = replace(PAIR, type=socket.SOCK_DGRAM, peer=30)
    cases = [
        OK,  # a socketpair
        replace(OK, diag=LISTENER, peer=None, peer_here=False),  # an idle listener
        replace(OK, diag=replace(PAIR, peer=0, shutdown=3), peer=None,
                peer_here=False),  # its peer was closed
        replace(OK, diag=replace(PAIR, peer=0, shutdown=3), peer=None, peer_here=False,
                error=True),  # ... before reading all: ECONNRESET pending
        replace(OK, diag=dgram, peer=replace(dgram, ino=30, name=b"/dev/log\0"),
                peer_here=False),  # a dgram connected to a named socket outside
        replace(OK, diag=replace(PAIR, name=b"/run/s.sock\0"),
                listeners=frozenset({b"/run/s.sock\0"})),  # accepted from a listener here
        replace(OK, diag=replace(PAIR, name=b"\0gone")),  # from a gone abstract listener
        replace(OK, diag=replace(LISTENER, name=b"/run/s.sock\0"), peer=None,
                peer_here=False, name_file="missing"),  # unlinked since the bind
    ]
    assert [refusal(seen) for seen in cases] == [None] * len(cases)


def test_stream_runs_merge_by_sender() -> None:
    me, other = (5, 0, 0), (6, 0, 0)
    runs = [(b"ab", b"", me), (b"cd", b"", me), (b"e", b"", other), (b"f", b"", me)]
    assert merge_runs(runs, socket.SOCK_STREAM) == [(b"abcd", b"", me), (b"e", b"", other),
                                                     (b"f", b"", me)]
    assert merge_runs(runs, socket.SOCK_SEQPACKET) == runs


def test_images_check_unix_sockets() -> None:
    """The image boundary (ckpt.images.validate) knows the options the kind carries, and
    refuses names a restore could not bind (a relative path) and impossible states."""
    assert set(UNIX_OPTIONS) == {name for name, _ in OPTIONS}
    good = pb.UnixSocket(type=1, state=10, name=b"/run/s.sock", backlog=5, queue=[
        pb.UnixMessage(data=b"x", sender=b"\0peer")])
    validate("core-1.img", good)
    for bad, says in ((pb.UnixSocket(type=1, state=7, name=b"rel.sock"), "name = b'rel.sock'"),
                      (pb.UnixSocket(type=2, state=10), "a listening dgram socket"),
                      (pb.UnixSocket(type=3, state=7), "type = 3: not one of 1, 2, 5"),
                      (pb.UnixSocket(type=1, state=1, options=[
                          pb.UnixOption(level=1, name=99, value=b"1234")]), "name = 99"),
                      (pb.UnixSocket(type=2, state=7, queue=[
                          pb.UnixMessage(sender=b"/a\0b")]), "a path with a NUL byte")):
        with pytest.raises(ImageError, match=re.escape(says)):
            validate("core-1.img", bad)


def sock(ino: int, peer: int = 0, state: int = 1, name: bytes = b"",
         senders: tuple[bytes, ...] = ()) -> pb.OpenFile:
    return pb.OpenFile(type=pb.OpenFile.UNIX_SOCKET, unix_socket=pb.UnixSocket(
        inode=ino, peer=peer, state=state, name=name, type=socket.SOCK_DGRAM,
        queue=[pb.UnixMessage(data=b"m", sender=s) for s in senders]))


def test_a_restore_builds_each_socket_with_all_it_is_tied_to() -> None:
    files = [sock(1, 2), sock(2, 1), sock(3, state=10, name=b"\0l"), sock(4, 5, name=b"\0l"),
             sock(5, 4), sock(6, 0, 7, b"\0rx", senders=(b"\0tx",)), sock(7, 0, 7, b"\0tx"),
             sock(8)]
    inodes = [[f.unix_socket.inode for f in component(files, files[i])] for i in range(8)]
    assert inodes == [[1, 2], [1, 2], [3, 4, 5], [3, 4, 5], [3, 4, 5], [6, 7], [6, 7], [8]]


# --------------------------------------------------------------------------- live


def dump_restore(harness: Harness, target: Asker, *extra: str) -> int:
    images = harness.images()
    harness.dump_and_reap(target.proc, images, *extra)
    return harness.restore_detached(images)


@needs_root
def test_socketpair_stream_bytes_both_ways_survive(harness: Harness) -> None:
    """200 kB queued one way, a line the other; the non-blocking end, SO_PASSCRED, a set
    SO_SNDBUF and SO_RCVTIMEO too, and SO_PEERCRED naming the process (restore has it make the
    pair)."""
    target = Asker(harness, "fd_unix.py", "stream")
    first = {"b": [200000, True], "a": "to a 1", "names": [],
             "opts": [False, 1, 600000, [7, 500000]], "peercred": [True, True],
             "peergroups": [True]}
    assert target.ask() == first
    dump_restore(harness, target)
    assert target.ask() == {**first, "a": "to a 2"}
    assert target.ask() == {**first, "a": "to a 3"}


class NobodyAsker(Asker):
    """An Asker whose target runs as uid and gid 65534 (setpriv, the system python: the
    venv's lives under /root), with its control files in a directory it can search."""

    def __init__(self, harness: Harness, target: str, *args: str,
                 setpriv: tuple[str, ...] = tuple(NOBODY)) -> None:
        require_reachable_by_others()
        if shutil.which("setpriv") is None or not os.path.exists(SYSTEM_PYTHON):
            pytest.skip("needs setpriv and /usr/bin/python3")
        where = Path(tempfile.mkdtemp(prefix="ckpt-test-unix-"))
        where.chmod(0o755)
        self.control = where / f"{target}.control"
        self.out = harness.tmp / f"{target}.out"
        self.proc = harness.launch([*setpriv, SYSTEM_PYTHON, str(TARGETS / target),
                                    str(self.control), *args], self.out)
        wait_for_line(self.out, lambda line: line == "ready", 10, "ready")
        self.asked = 0

    def cleanup(self) -> None:
        shutil.rmtree(self.control.parent, ignore_errors=True)


@needs_root
def test_peer_credentials_name_the_process_not_ckpt(harness: Harness) -> None:
    """SO_PEERCRED and SO_PEERGROUPS of a socketpair name who made it: after the restore,
    the restored process with its uid, gid and groups (65534, and 100), not ckpt or
    root."""
    as_nobody = ("setpriv", "--reuid", "65534", "--regid", "65534", "--groups", "100")
    target = NobodyAsker(harness, "fd_unix.py", "stream", setpriv=as_nobody)
    try:
        first = target.ask()
        assert isinstance(first, dict) and first["peercred"] == [True, True]
        assert first["peergroups"] == [True]
        dump_restore(harness, target)
        assert target.ask() == {**first, "a": "to a 2"}
    finally:
        target.cleanup()


@needs_root
def test_leave_running_dump_takes_nothing_and_show_lists_the_queues(harness: Harness,
                                                                   ) -> None:
    """The peek consumes nothing and gives SO_PEEK_OFF and SO_PASSCRED back: a target
    dumped with --leave-running answers as if nothing happened. `ckpt show` lists each
    socket's state, a queue by its length."""
    target = Asker(harness, "fd_unix.py", "stream")
    first = target.ask()
    assert isinstance(first, dict)
    images = harness.images()
    harness.dump(target.proc.pid, images, "--leave-running")
    assert target.ask() == {**first, "a": "to a 2"}
    res = run_ckpt("show", images, "--json")
    assert_ckpt_ok(res)
    fds = {f["fd"]: f for f in json.loads(res.stdout)["processes"][0]["fds"]}
    assert fds[4]["type"] == "UNIX_SOCKET" and fds[4]["state"]["peer"] == \
        fds[3]["state"]["inode"]
    text = run_ckpt("show", images)
    line = next(x for x in text.stdout.splitlines() if x.split()[:2] == ["fd", "4"])
    assert "queue=[{'data': '<200000 bytes>', 'fromSelf': True}]" in line, line


@needs_root
@pytest.mark.parametrize("mode", ["dgram", "seqpacket"])
def test_message_boundaries_survive(harness: Harness, mode: str) -> None:
    """Four messages (one empty) each way of a dgram / seqpacket pair."""
    target = Asker(harness, "fd_unix.py", mode)
    assert target.ask() == {"b": [5, 0, 3000, 4], "a": ["back 1"]}
    dump_restore(harness, target)
    assert target.ask() == {"b": [5, 0, 3000, 4], "a": ["back 2"]}
    assert target.ask() == {"b": [5, 0, 3000, 4], "a": ["back 3"]}


@needs_root
def test_o_async_socket_still_signals_the_process(harness: Harness) -> None:
    """O_ASYNC with the process as owner: data arriving after the restore raises SIGIO
    in it, as before."""
    target = Asker(harness, "fd_unix.py", "sigio")
    assert target.ask(timeout=20) == {"sigio": True}
    dump_restore(harness, target)
    assert target.ask(timeout=20) == {"sigio": True}


@needs_root
def test_an_empty_datagram_the_process_peeked_is_kept(harness: Harness) -> None:
    """A peek at an offset skips an empty datagram peeked before: the first one is
    peeked plainly."""
    target = Asker(harness, "fd_unix.py", "peeked")
    assert target.ask() == {"b": [0, 1]}
    dump_restore(harness, target)
    assert target.ask() == {"b": [0, 1]}


@needs_root
def test_accepted_connection_survives_its_gone_listener(harness: Harness) -> None:
    """A connection accepted from an abstract listener since closed: both ends' names
    and queues come back (restore connects through a passing listener on the name)."""
    target = Asker(harness, "fd_unix.py", "connected")
    first = target.ask()
    assert isinstance(first, dict) and first["b"] == [5000, True] and first["a"] == "to a 1"
    dump_restore(harness, target)
    assert target.ask() == {**first, "a": "to a 2"}


@needs_root
def test_connection_from_a_path_listener_survives(harness: Harness, tmp_path: Path) -> None:
    """Accepted from a listener on a path that stays: restore connects through the
    restored listener, so both ends' names come back."""
    path = str(tmp_path / "srv.sock")
    target = Asker(harness, "fd_unix.py", "served", path)
    first = target.ask()
    assert isinstance(first, dict) and first["names"] == ["", path, path, ""]
    assert first["peercred"] == [True, True]  # who listened, who connected
    dump_restore(harness, target)
    assert target.ask() == {**first, "a": "to a 2"}


@needs_root
@pytest.mark.parametrize(("mode", "then"), [("orphan", []), ("reset", ["ECONNRESET"])])
def test_end_whose_peer_was_closed_reads_then_eof(harness: Harness, mode: str,
                                                 then: list[str]) -> None:
    """b reads what a wrote, then end of file; if a was closed without reading what b had
    sent it, b's read meets ECONNRESET first (poll shows the pending error: restore has
    the temporary other end closed unread too)."""
    target = Asker(harness, "fd_unix.py", mode)
    assert target.ask() == {"b": ["last words"], "a_send": "EPIPE"}
    dump_restore(harness, target)
    assert target.ask() == {"b": ["last words", *then], "a_send": "EPIPE"}


@needs_root
def test_migrate_carries_a_connection_with_its_queues(
        harness: Harness, tmp_path: Path, two_hosts: tuple[str, str, str]) -> None:  # noqa: F811
    """`ckpt migrate` from host A to host B (network namespaces: abstract names are each
    namespace's): the connection accepted from a gone abstract listener comes back in B
    with its names and what both ends had queued."""
    a, b, b_addr = two_hosts
    token = tmp_path / "token"
    token.write_text("unix\n")
    server = page_server_in(harness, b, f"{b_addr}:27079", tmp_path, token)
    in_a = ("ip", "netns", "exec", a)
    target = Asker(harness, "fd_unix.py", "connected", prefix=in_a)
    first = target.ask()
    assert isinstance(first, dict) and first["a"] == "to a 1"
    res = run_ckpt("migrate", "-t", str(target.proc.pid), "--to", f"{b_addr}:27079",
                   "--auth-token-file", token, reap=target.proc, prefix=in_a)
    assert res.returncode == 0, res.describe()
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    assert os.stat(f"/proc/{new_pid}/ns/net").st_ino == os.stat(f"/run/netns/{b}").st_ino
    assert target.ask() == {**first, "a": "to a 2"}
    harness.kill(server.pid)


@needs_root
def test_datagrams_from_named_and_unnamed_senders(harness: Harness) -> None:
    target = Asker(harness, "fd_unix.py", "named")
    first = target.ask()
    assert isinstance(first, dict)
    tx = first["rx"][1][1]
    assert first == {"rx": [["conn 1", None], ["tx 1", tx]]}
    dump_restore(harness, target)
    assert target.ask() == {"rx": [["conn 2", None], ["tx 2", tx]]}


@needs_root
def test_dgram_connected_to_a_receiver_outside_connects_again(harness: Harness,
                                                              tmp_path: Path) -> None:
    """Like a syslog client on /dev/log: the peer is outside the process, but a datagram
    connection is only an address: restore connects to the same name, or stops naming the
    fd and the name while nothing is bound there."""
    path = str(tmp_path / "log.sock")
    images = harness.images()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
        log.bind(path)
        log.settimeout(10)
        target = Asker(harness, "fd_unix.py", "syslog", path)
        assert target.ask() == {"peer": path}
        assert log.recv(100) == b"log 1"
        harness.dump_and_reap(target.proc, images)
    os.unlink(path)
    line = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached"))
    assert f"fd 3: a unix socket connected to {path}: No such file or directory" in line, line
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
        log.bind(path)
        log.settimeout(10)
        harness.restore_detached(images)
        assert target.ask() == {"peer": path}
        assert log.recv(100) == b"log 2"


@needs_root
def test_listening_path_socket_accepts_after_restore(harness: Harness, tmp_path: Path,
                                                     ) -> None:
    """The socket file the dumped process left behind is unlinked and bound again, with
    its mode; a new client's connection is accepted."""
    path = str(tmp_path / "srv.sock")
    target = Asker(harness, "fd_unix.py", "listen", path)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(path)
        assert target.ask() == {"accepted": True, "name": path, "mode": "0o666"}
        assert c.recv(100) == b"hello 1"
    dump_restore(harness, target)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        assert target.ask() == {"accepted": True, "name": path, "mode": "0o666"}
        assert c.recv(100) == b"hello 2"


@needs_root
def test_listener_whose_file_was_unlinked_stays_unreachable(harness: Harness,
                                                            tmp_path: Path) -> None:
    """Bound to a path whose file was unlinked since: restore binds it (the name comes
    back) and unlinks the file again; a stale socket file there (a failed restore's) is
    no obstacle."""
    path = str(tmp_path / "hidden.sock")
    target = Asker(harness, "fd_unix.py", "hidden", path)
    assert target.ask() == {"name": path, "file": False}
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
    harness.restore_detached(images)
    assert target.ask() == {"name": path, "file": False}
    assert not os.path.lexists(path)


@needs_root
def test_listening_abstract_socket_accepts_after_restore(harness: Harness) -> None:
    target = Asker(harness, "fd_unix.py", "abstract")
    name = f"\0ckpt-test-listen-{target.proc.pid}"
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(name)
        assert target.ask() == {"accepted": True, "name": "abstract", "mode": ""}
        assert c.recv(100) == b"hello 1"
    dump_restore(harness, target)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(name)
        assert target.ask() == {"accepted": True, "name": "abstract", "mode": ""}
        assert c.recv(100) == b"hello 2"


@needs_root
def test_shut_down_end_keeps_its_state(harness: Harness) -> None:
    """a wrote "last words" and shut down for writing: after the restore b reads them,
    then end of file, and a still cannot send."""
    target = Asker(harness, "fd_unix.py", "shutdown")
    assert target.ask() == {"b": ["last words"], "a_send": "EPIPE"}
    dump_restore(harness, target)
    assert target.ask() == {"b": ["last words"], "a_send": "EPIPE"}


@needs_root
def test_predump_then_incremental_dump(harness: Harness) -> None:
    """The queues are the incremental dump's (a round runs between the passes)."""
    target = Asker(harness, "fd_unix.py", "stream")
    first = target.ask()
    assert isinstance(first, dict)
    ck = harness.images("ck")
    assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", ck / "1"))
    assert target.ask() == {**first, "a": "to a 2"}
    harness.dump_and_reap(target.proc, ck / "2", "--incremental", "--prev-images-dir", "../1")
    harness.restore_detached(ck / "2")
    assert target.ask() == {**first, "a": "to a 3"}


@contextlib.contextmanager
def refused_target(harness: Harness, case: str) -> Iterator[tuple[Asker, str]]:
    """A target in one of the live refusal cases, and what its refusal must say."""
    with contextlib.ExitStack() as stack:
        if case == "backlog":
            target = Asker(harness, "fd_unix.py", "abstract")
            c = stack.enter_context(socket.socket(socket.AF_UNIX))
            c.connect(f"\0ckpt-test-listen-{target.proc.pid}")
            yield target, "1 connection(s) not accepted yet"
        elif case == "held":
            target = Asker(harness, "fd_unix.py", "abstract")
            pidfd = os.pidfd_open(target.proc.pid)
            held = socket.socket(fileno=pidfd_getfd(pidfd, 3))  # its listener
            os.close(pidfd)
            stack.enter_context(held)
            yield target, f"also held by process {os.getpid()} outside the dump"
        elif case == "netns":
            netns = ("unshare", "--net", "sh", "-c", 'exec "$@"', "sh")
            yield (Asker(harness, "fd_unix.py", "shutdown", prefix=netns),
                   "a unix socket unix_diag does not show (another network namespace?)")
        elif case == "inflight":
            yield Asker(harness, "fd_unix.py", "inflight"), "1 file descriptor(s) in flight"
        else:
            name = f"@ckpt-test-outside-{os.getpid()}"
            lis = stack.enter_context(socket.socket(socket.AF_UNIX))
            lis.bind(name.replace("@", "\0"))
            lis.listen(1)
            target = Asker(harness, "fd_unix.py", "external", name)
            conn = stack.enter_context(lis.accept()[0])
            conn.send(b"unread")
            yield target, "6 bytes queued from socket:["


@needs_root
@pytest.mark.parametrize("case", ["backlog", "held", "inflight", "external", "netns"])
def test_unrestorable_socket_is_refused_and_the_target_runs_on(harness: Harness,
                                                               case: str) -> None:
    """dump and predump refuse before the freeze, naming the fd and what; nothing is
    written and the target runs on untouched."""
    with refused_target(harness, case) as (target, says):
        before = None if case in ("backlog", "external") else target.ask()
        for action in ("dump", "predump"):
            images = harness.images(action)
            res = run_ckpt(action, "-t", str(target.proc.pid), "-D", images)
            message = assert_one_error_line(res)
            assert "is a socket (socket:[" in message and says in message, message
            assert not (images / "inventory.img").exists()
            assert_running_untraced(target.proc.pid)
        accepted = {"accepted": True, "name": "abstract", "mode": ""}
        expected = {"backlog": accepted, "external": {"fd": 3}}.get(case, before)
        assert target.ask() == expected


@needs_root
def test_datagram_from_outside_is_refused_while_frozen(harness: Harness) -> None:
    """Who sent a queued datagram is seen only by the peek, in the freeze: a named sender
    outside the process is refused then, and the target is thawed untouched."""
    target = Asker(harness, "fd_unix.py", "named")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
        out.bind(f"\0ckpt-test-out-{os.getpid()}")
        out.sendto(b"from outside", f"\0ckpt-test-rx-{target.proc.pid}")
        res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images())
    message = assert_one_error_line(res)
    assert f"a datagram queued from @ckpt-test-out-{os.getpid()}, outside" in message, message
    assert_running_untraced(target.proc.pid)
    answer = target.ask()
    assert isinstance(answer, dict) and [m[0] for m in answer["rx"]] == \
        ["conn 1", "tx 1", "from outside"]


@needs_root
def test_an_external_socket_is_taken_from_inherit_fd(harness: Harness) -> None:
    """A stream connected to a server outside the dump (a journald, a database): dump
    records it as socket:[INODE] and names the fd; restore stops without --inherit-fd,
    naming it, and with one (here a new connection to the same server) the restored
    process writes into the socket it is given."""
    name = f"\0ckpt-test-server-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket(socket.AF_UNIX))
        server.bind(name)
        server.listen(2)
        server.settimeout(10)
        target = Asker(harness, "fd_unix.py", "external", name.replace("\0", "@"))
        first = stack.enter_context(server.accept()[0])
        first.settimeout(10)
        assert target.ask() == {"fd": 3}
        assert first.recv(100) == b"hello 1"
        external = os.readlink(f"/proc/{target.proc.pid}/fd/3")
        images = harness.images()
        res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", images, reap=target.proc)
        assert res.returncode == 0, res.describe()
        assert f"fd 3 leads outside the dump ({external}): restore it with --inherit-fd " \
            f"fd[N]:{external}" in res.stderr, res.describe()
        target.proc.wait(timeout=10)
        line = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached"))
        assert f"fd 3: {external} is external" in line, line
        assert first.recv(100) == b""  # the old connection is closed with its process
        null = os.open("/dev/null", os.O_RDWR)
        stack.callback(os.close, null)
        line = assert_one_error_line(run_ckpt(
            "restore", "-D", images, "--restore-detached",
            f"--inherit-fd=fd[{null}]:{external}", pass_fds=(null,)))
        assert f"--inherit-fd fd[{null}]:{external}: not a unix socket of type 1" in line, line

        given = stack.enter_context(socket.socket(socket.AF_UNIX))
        given.connect(name)
        second = stack.enter_context(server.accept()[0])
        second.settimeout(10)
        harness.restore_detached(images, f"--inherit-fd=fd[{given.fileno()}]:{external}",
                                 pass_fds=(given.fileno(),))
        assert target.ask() == {"fd": 3}
        assert second.recv(100) == b"hello 2"


@needs_root
def test_restore_refuses_a_path_a_live_socket_holds(harness: Harness, tmp_path: Path,
                                                    ) -> None:
    """The socket file left behind is unlinked only if no live socket is bound to it."""
    path = str(tmp_path / "srv.sock")
    target = Asker(harness, "fd_unix.py", "listen", path)
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as squatter:
        squatter.bind(path)
        res = run_ckpt("restore", "-D", images, "--restore-detached", "--pidfile",
                       harness.new_pidfile())
        message = assert_one_error_line(res)
        assert f"unix socket {path}: a live socket (socket:[" in message, message
    harness.restore_detached(images)  # the squatter is gone: its file is stale
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        assert target.ask() == {"accepted": True, "name": path, "mode": "0o666"}


# --------------------------------------------------------------------------- daemons

DAEMONS = {
    "redis": ("redis-server", "--port", "0", "--unixsocket", "{path}", "--unixsocketperm",
              "700", "--save", "", "--appendonly", "no", "--dir", "{dir}"),
    "memcached": ("memcached", "-u", "root", "-s", "{path}", "-a", "700", "-t", "2"),
}


def talk(path: Path, request: bytes, lines: int) -> list[bytes]:
    """Send ``request`` on a new connection to ``path``; its answer's first ``lines``."""
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(path))
        c.sendall(request)
        answer = b""
        while answer.count(b"\r\n") < lines:
            chunk = c.recv(4096)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
        return answer.split(b"\r\n")[:lines]


def put(daemon: str, path: Path, key: str, value: str) -> None:
    request = f"SET {key} {value}\r\n" if daemon == "redis" else \
        f"set {key} 0 0 {len(value)}\r\n{value}\r\n"
    assert talk(path, request.encode(), 1) == [b"+OK" if daemon == "redis" else b"STORED"]


def get(daemon: str, path: Path, key: str) -> str:
    """The value (redis: "$N", value; memcached: "VALUE k 0 N", value, "END")."""
    request = f"GET {key}\r\n" if daemon == "redis" else f"get {key}\r\n"
    return talk(path, request.encode(), 2)[1].decode()


@needs_root
@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_daemon_on_a_unix_socket_predump_incremental_restore(harness: Harness,
                                                             tmp_path: Path,
                                                             daemon: str) -> None:
    """redis (an epoll loop, a pipe to itself, background threads) and memcached (worker
    threads woken through pipes and eventfds) listening on a unix socket: keys written
    before a predump and between it and the incremental dump are read back after the
    restore, and new keys are written, each over a new connection."""
    argv = DAEMONS[daemon]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (.ci/run installs it)")
    path = tmp_path / f"{daemon}.sock"
    proc = harness.launch([a.format(path=path, dir=tmp_path) for a in argv],
                          tmp_path / "out.txt")
    wait_for(lambda: path.exists() or None, 10, f"{daemon}'s socket")
    put(daemon, path, "k1", "before-predump")
    ck = harness.images("ck")
    res = run_ckpt("predump", "-t", str(proc.pid), "-D", ck / "1")
    assert_ckpt_ok(res)
    put(daemon, path, "k2", "after-predump")
    harness.dump_and_reap(proc, ck / "2", "--incremental", "--prev-images-dir", "../1")
    harness.restore_detached(ck / "2")
    assert get(daemon, path, "k1") == "before-predump"
    assert get(daemon, path, "k2") == "after-predump"
    put(daemon, path, "k3", "after-restore")
    assert get(daemon, path, "k3") == "after-restore"


@needs_root
@pytest.mark.parametrize("locked", [False, True], ids=["writable", "locked"])
def test_a_path_socket_is_bound_with_the_process_file_access(harness: Harness, open_dir: Path,
                                                              locked: bool) -> None:
    """A uid 65534 process listens on a path in its own directory; after the dump the
    directory is made read-only to it: root could unlink the stale socket file and bind
    there again, the process itself could not."""
    socks = open_dir / "socks"
    socks.mkdir()
    os.chown(socks, 65534, 65534)
    path = socks / "srv.sock"
    target = Asker(harness, "fd_unix.py", "listen", str(path), nobody_in=open_dir)
    first = target.ask()
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    if locked:
        socks.chmod(0o555)
        line = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached",
                                              "--pidfile", harness.new_pidfile()))
        assert f"unix socket {path}: Permission denied" in line, line
        assert path.exists()  # the stale socket file is still there: not unlinked as root
    else:
        harness.restore_detached(images)
        assert target.ask() == first
