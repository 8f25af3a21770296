"""TCP and UDP sockets, IPv4 and IPv6 (ckpt/collect/fdkinds/inet.py); target
examples/targets/fd_inet.py. inet_diag itself: tests/test_inet_diag.py."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    run_ckpt,
    wait_for,
)
from test_migrate import page_server_in, two_hosts  # noqa: F401 (a fixture)

from ckpt.actions.predump import check_target
from ckpt.collect.fdkinds import inet_mcast as mc
from ckpt.collect.fdkinds import inet_options as opts
from ckpt.collect.fdkinds.base import FdFlags
from ckpt.collect.fdkinds.inet import (
    Endpoint,
    InetState,
    make_socket,
    refuse,
)
from ckpt.collect.fdkinds.inet_options import changed
from ckpt.collect.fdkinds.inet_tables import unlisted
from ckpt.collect.fds import FdInfo
from ckpt.errors import ImageError, NotDumpable, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import problems, validate
from ckpt.kernel import inet_diag as diag
from ckpt.kernel.creds import made_as

# --------------------------------------------------------------------------- pure

V4 = socket.AF_INET
INFO = FdInfo(fd=5, target="socket:[99]", pos=0, flags=0o2, mnt_id=8, ino=99,
              st_mode=0o140777, st_dev=8, st_ino=99, st_rdev=0, st_size=0)
LOCAL = Endpoint(bytes([127, 0, 0, 1]), 6379)
PEER = Endpoint(bytes([127, 0, 0, 1]), 40000)
STREAM, DGRAM, TCP, UDP = socket.SOCK_STREAM, socket.SOCK_DGRAM, 6, 17


def state(**kw: object) -> InetState:
    base: dict[str, object] = {"family": V4, "type": STREAM, "protocol": TCP, "state": 10,
                               "local": LOCAL, "peer": None, "backlog": 511}
    base.update(kw)
    return InetState(**base)  # type: ignore[arg-type]


CLOSE = FdFlags(tcp_close=True)


def test_refuse_decisions() -> None:
    assert refuse(INFO, state(), FdFlags()) is None
    assert refuse(INFO, state(state=7, local=None), FdFlags()) is None  # unbound
    conn = state(state=1, peer=PEER)
    why = refuse(INFO, conn, FdFlags())
    assert why == ("a TCP connection 127.0.0.1:6379 -> 127.0.0.1:40000 (ESTABLISHED): "
                   "restored only closed, with --tcp-close")
    assert refuse(INFO, conn, CLOSE) is None
    assert conn.is_connection and not state().is_connection
    dead = state(state=7, shutdown=3)  # a connection reset or closed, fd still open
    assert dead.is_connection and "that ended" in (refuse(INFO, dead, FdFlags()) or "")
    assert refuse(INFO, dead, CLOSE) is None
    queued = state(rqueue=2, pending=("127.0.0.1:1 -> 127.0.0.1:6379",
                                      "127.0.0.1:2 -> 127.0.0.1:6379"))
    assert refuse(INFO, queued, FdFlags()) == (
        "a TCP listener on 127.0.0.1:6379 with 2 connection(s) not accepted yet "
        "(127.0.0.1:1 -> 127.0.0.1:6379, 127.0.0.1:2 -> 127.0.0.1:6379): dropped only "
        "with --tcp-close")
    assert refuse(INFO, queued, CLOSE) is None
    udp = state(type=DGRAM, protocol=UDP, state=7, rqueue=768)
    assert "768 bytes of datagrams queued" in (refuse(INFO, udp, CLOSE) or "")
    assert refuse(INFO, state(type=DGRAM, protocol=UDP, state=1, peer=PEER), FdFlags()) is None
    assert "socket filter" in (refuse(INFO, state(filtered=True), CLOSE) or "")
    assert "inet_diag does not show" in (refuse(INFO, state(state=-1), CLOSE) or "")


def test_sockets_inet_diag_does_not_list() -> None:
    assert unlisted(TCP, 7, bound=False) == (7, 0)  # unbound: restored as a new socket
    assert unlisted(TCP, 7, bound=True) == (7, 3)  # a connection that ended
    assert unlisted(TCP, 10, bound=True) == (-1, 0)  # a listener it should have listed
    assert unlisted(UDP, 7, bound=False) == (7, 0)
    assert unlisted(UDP, 7, bound=True) == (-1, 0)


def test_only_changed_options_are_kept() -> None:
    assert changed({"SO_RCVBUF": 131072, "TCP_NODELAY": 1, "IPV6_V6ONLY": 0},
                   {"SO_RCVBUF": 131072, "TCP_NODELAY": 0, "IPV6_V6ONLY": 0}) == \
        {"TCP_NODELAY": 1, "IPV6_V6ONLY": 0}


def test_endpoint_text() -> None:
    assert str(Endpoint.of(socket.AF_INET6, ("fe80::1%lo", 80, 0, 1))) == "[fe80::1]:80"
    assert Endpoint.of(socket.AF_INET6, ("fe80::1%lo", 80, 0, 1)).scope_id == 1
    assert Endpoint.of(V4, ("0.0.0.0", 0)).wildcard


def test_half_open_connections_count_as_pending() -> None:
    """TCP_DEFER_ACCEPT keeps a connection out of the accept queue (rqueue 0) until data
    comes: it is still one the restore would drop."""
    half = state(pending=("127.0.0.1:1 -> 127.0.0.1:6379",))
    assert "1 connection(s) not accepted yet" in (refuse(INFO, half, FdFlags()) or "")


# --------------------------------------------------------------------------- live


def test_listeners_and_udp_sockets_survive(harness: Harness) -> None:
    target = Asker(harness, "fd_inet.py")
    before = target.ask()
    assert isinstance(before, dict)
    assert before["v4"]["accepts"] and before["dual"]["accepts"] == [True, True]
    assert before["v4"]["TCP_NODELAY"] and before["v4"]["backlog"] == 7
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    assert target.ask() == before


def asked(target: Asker) -> dict[str, Any]:
    answer = target.ask()
    assert isinstance(answer, dict)
    return answer


def assert_reset_and_same(target: Asker, before: dict[str, Any]) -> None:
    """After a restore with --tcp-close: both ends of the connection read ECONNRESET,
    everything else answers as before the dump."""
    after = asked(target)
    assert after.pop("conn") == {"client": "ECONNRESET", "server": "ECONNRESET"}
    assert after == {k: v for k, v in before.items() if k != "conn"}


def test_tcp_connection_refused_without_tcp_close(harness: Harness) -> None:
    target = Asker(harness, "fd_inet.py", "conn")
    before = asked(target)
    assert before["conn"] == {"client": "EAGAIN", "server": "EAGAIN"}
    port = before["v4"]["name"][1]
    for action in ("dump", "predump"):
        res = run_ckpt(action, "-t", str(target.proc.pid), "-D", harness.images(action))
        line = assert_one_error_line(res)
        assert re.search(rf"a TCP connection 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{port} "
                         r"\(ESTABLISHED\): restored only closed, with --tcp-close", line), line
    assert_running_untraced(target.proc.pid)
    again = asked(target)
    assert again == before


def test_tcp_close_restores_connections_reset(harness: Harness) -> None:
    """--tcp-close: both ends of the connection read ECONNRESET once, then EOF; every
    listener accepts new connections."""
    target = Asker(harness, "fd_inet.py", "conn")
    before = asked(target)
    images = harness.images()
    harness.dump_and_reap(target.proc, images, "--tcp-close")
    harness.restore_detached(images)
    assert_reset_and_same(target, before)
    assert asked(target)["conn"] == {"client": "EOF", "server": "EOF"}


def test_ended_connection(harness: Harness) -> None:
    """A connection its peer reset, the fd still open (its error already read): refused,
    then with --tcp-close reset again: the program reads ECONNRESET once more, then EOF."""
    target = Asker(harness, "fd_inet.py", "dead")
    assert asked(target)["dead"] == "ECONNRESET"
    before = asked(target)
    assert before["dead"] == "EOF"
    res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images("refused"))
    line = assert_one_error_line(res)
    assert re.search(r"a TCP connection from 127\.0\.0\.1:\d+ that ended \(reset, or "
                     r"closed by both sides\): restored only with --tcp-close", line), line
    images = harness.images()
    harness.dump_and_reap(target.proc, images, "--tcp-close")
    harness.restore_detached(images)
    assert asked(target) == {**before, "dead": "ECONNRESET"}
    assert asked(target) == before


def test_unaccepted_connection_refused_then_dropped(harness: Harness) -> None:
    target = Asker(harness, "fd_inet.py")
    before = asked(target)
    port = before["dual"]["name"][1]
    client = socket.create_connection(("::1", port), timeout=10)
    try:
        me = client.getsockname()[1]
        res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images("refused"))
        line = assert_one_error_line(res)
        assert (f"a TCP listener on [::]:{port} with 1 connection(s) not accepted yet "
                f"([::1]:{me} -> [::1]:{port}): dropped only with --tcp-close") in line, line
        assert_running_untraced(target.proc.pid)
        images = harness.images()
        harness.dump_and_reap(target.proc, images, "--tcp-close")
        # the dumped listener died with the connection in its queue: the client is reset
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    finally:
        client.close()
    harness.restore_detached(images)
    assert asked(target) == before


def test_queued_datagrams_refused(harness: Harness) -> None:
    target = Asker(harness, "fd_inet.py")
    before = asked(target)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"unread", tuple(before["udp"]["name"]))
    res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images(), "--tcp-close")
    line = assert_one_error_line(res)
    assert re.search(rf"a UDP socket on 127\.0\.0\.1:{before['udp']['name'][1]} with \d+ "
                     r"bytes of datagrams queued", line), line
    assert_running_untraced(target.proc.pid)


def test_socket_filter_refused(harness: Harness) -> None:
    target = Asker(harness, "fd_inet.py", "filter")
    before = asked(target)
    res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images(), "--tcp-close")
    line = assert_one_error_line(res)
    assert "a UDP socket with a socket filter (SO_ATTACH_FILTER/BPF)" in line, line
    assert_running_untraced(target.proc.pid)
    assert asked(target) == before


def test_port_taken_at_restore(harness: Harness) -> None:
    target = Asker(harness, "fd_inet.py")
    before = asked(target)
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    port = before["v4"]["name"][1]
    with socket.create_server(("127.0.0.1", port)):
        res = run_ckpt("restore", "-D", images, "--restore-detached", "--pidfile",
                       harness.new_pidfile())
        harness.skip_if_ids_reused(res)
        line = assert_one_error_line(res)
    assert f"cannot bind to TCP 127.0.0.1:{port}: Address already in use" in line, line


def test_predump_incremental_tcp_close(harness: Harness) -> None:
    target = Asker(harness, "fd_inet.py", "conn")
    before = asked(target)
    pid = str(target.proc.pid)
    first = harness.images("1")
    assert_ckpt_ok(run_ckpt("predump", "-t", pid, "-D", first, "--tcp-close"))
    second = harness.images("2")
    harness.dump_and_reap(target.proc, second, "--incremental", "--prev-images-dir", "../1",
                          "--tcp-close")
    harness.restore_detached(second)
    assert_reset_and_same(target, before)


def test_listener_on_fd_0_stays_inheritable(harness: Harness) -> None:
    """A socket restored onto fd 0 without close-on-exec keeps it off (pidfd_getfd sets
    it on the fd it makes, which may be the fd's own number)."""
    target = Asker(harness, "fd_inet.py", "stdin")
    before = asked(target)
    assert before["stdin"]["cloexec"] == 0 and before["stdin"]["state"] == 10
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    after = asked(target)
    assert after["stdin"] == before["stdin"]
    assert after == before


def test_sockets_of_another_network_namespace(harness: Harness) -> None:
    """A target in its own network namespace: a restore makes sockets in ckpt's, where its
    listeners would come back on the host's addresses, so the dump is refused naming the
    namespace, the target running on. ckpt run in that namespace dumps it (inet_diag and
    the multicast groups are read there) and restores it there."""
    netns = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    target = Asker(harness, "fd_inet.py", "conn", "mcast", prefix=netns)
    pid = target.proc.pid
    ns = os.readlink(f"/proc/{pid}/ns/net")
    assert ns != os.readlink("/proc/self/ns/net")
    before = asked(target)
    assert before["mc"]["got"] == "to group"
    for extra in ((), ("--tcp-close",)):
        res = run_ckpt("dump", "-t", str(pid), "-D", harness.images("refused"), *extra)
        line = assert_one_error_line(res)
        assert re.search(rf"a (TCP|UDP) socket \S+ of network namespace {re.escape(ns)}, "
                         r"not ckpt's: a restore makes sockets in ckpt's", line), line
    assert_running_untraced(pid)
    assert asked(target) == before
    keep = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)  # outlives the dumped process
    try:
        inside = ("nsenter", f"--net=/proc/{os.getpid()}/fd/{keep}")
        images = harness.images()
        assert_ckpt_ok(run_ckpt("dump", "-t", str(pid), "-D", images, "--tcp-close",
                                reap=target.proc, prefix=inside, pass_fds=(keep,)))
        pidfile = harness.new_pidfile()
        res = run_ckpt("restore", "-D", images, "--restore-detached", "--pidfile", pidfile,
                       prefix=inside, pass_fds=(keep,))
        harness.track(int(pidfile.read_text()))
        assert_ckpt_ok(res)
        assert os.readlink(f"/proc/{pidfile.read_text().strip()}/ns/net") == ns
    finally:
        os.close(keep)
    assert_reset_and_same(target, before)


def test_migrate_rounds_take_sockets_of_another_namespace(harness: Harness) -> None:
    """The predump rounds of a migration check the target as its final dump does
    (migrating): sockets of another namespace pass there, not in a plain predump, nor
    in one that only refuses external objects."""
    netns = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    target = Asker(harness, "fd_inet.py", prefix=netns)
    with pytest.raises(NotDumpable, match="of network namespace net:"):
        check_target(target.proc.pid)
    with pytest.raises(NotDumpable, match="of network namespace net:"):
        check_target(target.proc.pid, externals=False)
    assert check_target(target.proc.pid, externals=False, migrating=True)
    assert_running_untraced(target.proc.pid)


def test_another_network_namespace_refused_unless_migrating() -> None:
    """Pure: the refusal names the namespace; a migration (the restore is on another
    host) moves the sockets on purpose; a local dump refusing external objects does not."""
    foreign = state(netns="net:[4026532000]")
    assert refuse(INFO, foreign, CLOSE) == (
        "a TCP socket 127.0.0.1:6379 of network namespace net:[4026532000], not ckpt's: a "
        "restore makes sockets in ckpt's (run ckpt in that namespace, or migrate the "
        "process there)")
    assert refuse(INFO, foreign, FdFlags(externals=False, migrating=True)) is None
    assert "not ckpt's" in str(refuse(INFO, foreign, FdFlags(externals=False)))


def test_restored_socket_keeps_its_owner() -> None:
    """The socket is made as its owner (sk_uid, which SO_REUSEPORT groups and the
    inode's owner follow) and the process's gid, not as ckpt's root; ckpt's thread is
    root again after."""
    listener = pb.InetSocket(family=V4, type=STREAM, protocol=TCP, state=10, backlog=4,
                             uid=65534)
    listener.local.addr, listener.local.port = bytes([127, 0, 0, 1]), 0
    listener.options.add(name="SO_REUSEPORT", value=1)
    owner = made_as(65534, 65534, 65533, (65533, 100))
    sock = make_socket(listener, Endpoint(listener.local.addr, 0), None, "fd 3", owner)
    with sock:
        assert (os.fstat(sock.fileno()).st_uid, os.fstat(sock.fileno()).st_gid) == \
            (65534, 65533)
        me = diag.find(V4, TCP, os.fstat(sock.fileno()).st_ino)
        assert me is not None and (me.uid, me.state, me.wqueue) == (65534, 10, 4)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    with socket.socket() as mine:
        assert os.fstat(mine.fileno()).st_uid == os.geteuid()


def fetch(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/hello.txt", timeout=10) as r:
        return str(r.read().decode())


def test_http_server_with_an_idle_client(harness: Harness, tmp_path: Path) -> None:
    """Python's http.server (a dual-stack listener on [::], a thread per connection):
    an idle client's connection is refused, then under --tcp-close the thread waiting in
    recv() gets ECONNRESET, the client sees its connection closed, and the restored
    server answers new requests over IPv4 and IPv6."""
    (tmp_path / "hello.txt").write_text("hello")
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "server.out"
    proc = harness.launch([sys.executable, "-m", "http.server", "--bind", "::",
                           "--directory", str(tmp_path), str(port)], out)
    wait_for(lambda: _serves(port), 10, "http.server answering")
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    me = idle.getsockname()[1]
    wait_for(lambda: any(s.dport == me and s.inode for s in
                         diag.dump(socket.AF_INET6, TCP)), 10, "the idle client accepted")
    try:
        res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images("refused"))
        line = assert_one_error_line(res)
        assert (f"a TCP connection [::ffff:127.0.0.1]:{port} -> [::ffff:127.0.0.1]:{me} "
                "(ESTABLISHED)") in line, line
        images = harness.images()
        harness.dump_and_reap(proc, images, "--tcp-close")
        assert idle.recv(1) == b""  # the dumped server died: FIN
    finally:
        idle.close()
    harness.restore_detached(images)
    assert fetch("127.0.0.1", port) == "hello"
    assert fetch("[::1]", port) == "hello"
    wait_for(lambda: "ConnectionResetError" in out.read_text() or None, 10,
             "the restored handler thread to see the reset")


def _serves(port: int) -> bool | None:
    try:
        return fetch("127.0.0.1", port) == "hello" or None
    except OSError:
        return None


def test_migrate_tcp_close(harness: Harness, tmp_path: Path,
                           two_hosts: tuple[str, str, str]) -> None:  # noqa: F811
    """`ckpt migrate --tcp-close` from host A to host B (network namespaces over veth):
    the listeners and UDP sockets are bound again in B, the connection comes back reset;
    without the flag the migration is refused before its first round."""
    a, b, b_addr = two_hosts
    token = tmp_path / "token"
    token.write_text("inet\n")
    server = page_server_in(harness, b, f"{b_addr}:27078", tmp_path, token)
    in_a = ("ip", "netns", "exec", a)
    target = Asker(harness, "fd_inet.py", "conn", prefix=in_a)
    before = asked(target)
    migrate = ("migrate", "-t", str(target.proc.pid), "--to", f"{b_addr}:27078",
               "--auth-token-file", token)
    line = assert_one_error_line(run_ckpt(*migrate, prefix=in_a))
    assert "a TCP connection" in line and "--tcp-close" in line, line
    res = run_ckpt(*migrate, "--tcp-close", reap=target.proc, prefix=in_a)
    assert res.returncode == 0, res.describe()
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    assert os.stat(f"/proc/{new_pid}/ns/net").st_ino == os.stat(f"/run/netns/{b}").st_ino
    assert_reset_and_same(target, before)
    harness.kill(server.pid)


# --------------------------------------------------------------------------- state no
# getsockopt lists: multicast memberships, options the table lacked, refused state

IGMP = """Idx\tDevice    : Count Querier\tGroup    Users Timer\tReporter
1\tlo        :     2      V3
\t\t\t\t030201EF     1 0:00000000\t\t0
\t\t\t\t010000E0     1 0:00000000\t\t0
4\teth0      :     1      V3
\t\t\t\t010000E0     1 0:00000000\t\t0
"""
IGMP6 = """1    lo              ff020000000000000000000000000123     1 00000004 0
4    eth0            ff0200000000000000000001ff000002     1 00000004 0
"""


def test_igmp_tables_parsed() -> None:
    assert mc.parse_igmp(IGMP) == [(V4, 1, bytes([239, 1, 2, 3])), (V4, 1, bytes([224, 0, 0, 1])),
                                   (V4, 4, bytes([224, 0, 0, 1]))]
    assert mc.parse_igmp6(IGMP6) == [
        (socket.AF_INET6, 1, socket.inet_pton(socket.AF_INET6, "ff02::123")),
        (socket.AF_INET6, 4, socket.inet_pton(socket.AF_INET6, "ff02::1:ff00:2"))]
    assert mc.parse_igmp("") == [] and mc.parse_igmp6("") == []


def test_memberships_found_per_socket() -> None:
    """Of the namespace's groups, a socket answers for the ones it joined, with their
    source filters; a socket that joined nothing answers for none (not the kernel's
    all-hosts groups, nor another socket's)."""
    group = socket.inet_aton("239.1.2.7")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as joined, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        joined.setsockopt(0, 35, struct.pack("4s4si", group, bytes(4), 1))  # on lo
        joined.setsockopt(0, 38, group + socket.inet_aton("127.0.0.1")
                          + socket.inet_aton("10.0.0.9"))  # IP_BLOCK_SOURCE
        six = socket.inet_pton(socket.AF_INET6, "ff02::127")
        joined.setsockopt(41, 20, six + struct.pack("I", 1))  # IPV6_JOIN_GROUP on lo
        found = mc.memberships(joined.fileno(), socket.AF_INET6, mc.read_candidates())
        assert set(found) == {mc.Membership(V4, group, 1, False, (bytes([10, 0, 0, 9]),)),
                              mc.Membership(socket.AF_INET6, six, 1, False)}
        assert mc.memberships(other.fileno(), V4, mc.read_candidates()) == ()
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as again:
            for m in found:
                mc.join(again, m)
            assert set(mc.memberships(again.fileno(), socket.AF_INET6,
                                      mc.read_candidates())) == set(found)


def test_multicast_group_and_receive_options_survive(harness: Harness) -> None:
    """A UDP socket in multicast group 239.1.2.3 on lo with IP_MULTICAST_IF, SO_TIMESTAMP
    and IP_RECVTTL: after the restore it still gets the group's datagrams, with a
    timestamp and a TTL."""
    target = Asker(harness, "fd_inet.py", "mcast")
    before = asked(target)
    assert before["mc"]["got"] == "to group" and before["mc"]["cmsgs"] == [[0, 2], [1, 29]]
    assert before["mc"]["IP_MULTICAST_IF"] == "127.0.0.1"
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    assert asked(target) == before


def test_every_option_set_reads_back() -> None:
    """A socket with options the first table lacked: each one is kept (differs from a new
    socket's) and a new socket given them reads them back."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        for level, name, value in ((1, 29, 1), (0, 12, 1), (1, 42, 5), (41, 66, 1),
                                   (41, 51, 1), (0, 32, socket.inet_aton("127.0.0.1"))):
            sock.setsockopt(level, name, value)
        values = opts.read(sock, socket.AF_INET6, UDP)
    kept = opts.changed(values, dict(opts.defaults(socket.AF_INET6, DGRAM, UDP)))
    assert {"SO_TIMESTAMP", "IP_RECVTTL", "SO_PEEK_OFF", "IPV6_RECVTCLASS",
            "IPV6_RECVHOPLIMIT", "IP_MULTICAST_IF"} <= set(kept)
    assert opts.replay(socket.AF_INET6, DGRAM, UDP, tuple(kept.items())) == ()


def test_options_that_do_not_read_back_are_refused() -> None:
    """A value a new socket does not take (no such congestion control; a receive buffer
    the kernel clamps) is named by replay, and the dump refuses the socket."""
    bad = (("TCP_CONGESTION", b"nosuchcc".ljust(16, b"\0")), ("SO_RCVLOWAT", 1 << 40))
    assert opts.replay(V4, STREAM, TCP, bad) == (
        "TCP_CONGESTION: No such file or directory", "SO_RCVLOWAT: 1099511627776 is not a "
        "C int")
    why = refuse(INFO, state(unreplayable=("TCP_CONGESTION: No such file or directory",)),
                 FdFlags())
    assert why == ("a TCP socket with options a new socket does not take back as they "
                   "were (TCP_CONGESTION: No such file or directory): not supported")


def test_state_no_getsockopt_reads_is_refused() -> None:
    """TCP repair mode, TCP-MD5 keys (seen only in inet_diag), a timestamp counter."""
    with socket.socket() as sock:
        sock.setsockopt(TCP, 19, 1)  # TCP_REPAIR
        assert opts.unreadable(sock, {}, TCP) == ("repair mode on (TCP_REPAIR)",)
    with socket.socket(socket.AF_INET, DGRAM) as sock:
        sock.setsockopt(1, 37, struct.pack("ii", 1 << 7 | 1 << 1, 0))  # OPT_ID|TX_SOFTWARE
        values = opts.read(sock, V4, UDP)
        assert opts.unreadable(sock, values, UDP) == (
            "SO_TIMESTAMPING SOF_TIMESTAMPING_OPT_ID (its counter cannot be read)",)
    with socket.socket() as sock:
        key = struct.pack("HH4s", V4, 0, bytes([127, 0, 0, 2])).ljust(128, b"\0")
        sock.setsockopt(TCP, 14, key + struct.pack("BBHi", 0, 0, 4, 0)
                        + b"key1".ljust(80, b"\0"))  # TCP_MD5SIG
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        me = diag.find(V4, TCP, os.fstat(sock.fileno()).st_ino)
        assert me is not None and me.md5
    why = refuse(INFO, state(unreadable=("TCP-MD5 keys (TCP_MD5SIG)",)), CLOSE)
    assert why == "a TCP socket with TCP-MD5 keys (TCP_MD5SIG): not supported yet"
    conn = state(state=1, peer=PEER, unreadable=("repair mode on (TCP_REPAIR)",))
    assert refuse(INFO, conn, CLOSE) is None  # restored reset: nothing of it matters


# --------------------------------------------------------------------------- image fields


def inet_file() -> pb.OpenFile:
    f = pb.OpenFile(id=1, type=pb.OpenFile.INET_SOCKET)
    m = f.inet_socket
    m.family, m.type, m.protocol, m.state, m.backlog, m.uid = V4, STREAM, TCP, 10, 5, 1000
    m.local.addr, m.local.port = bytes([127, 0, 0, 1]), 80
    m.options.add(name="SO_RCVLOWAT", value=4)
    m.memberships.add(family=V4, group=bytes([239, 1, 2, 3]), ifindex=1)
    return f


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: setattr(m, "uid", 0xFFFFFFFF), "inet_socket.uid"),
    (lambda m: setattr(m, "backlog", 1 << 31), "inet_socket.backlog"),
    (lambda m: setattr(m, "family", 1), "inet_socket.family"),
    (lambda m: setattr(m, "protocol", 17), "inet_socket.protocol"),
    (lambda m: setattr(m, "state", 0), "inet_socket.state"),
    (lambda m: setattr(m, "shutdown", 4), "inet_socket.shutdown"),
    (lambda m: setattr(m.local, "port", 70000), "inet_socket.local.port"),
    (lambda m: setattr(m.local, "addr", bytes(16)), "inet_socket.local.addr"),
    (lambda m: setattr(m.peer, "addr", bytes(5)), "inet_socket.peer.addr"),
    (lambda m: setattr(m.options[0], "value", 1 << 40), "inet_socket.options[0].value"),
    (lambda m: setattr(m.options[0], "raw", bytes(4096)), "inet_socket.options[0].raw"),
    (lambda m: setattr(m.memberships[0], "ifindex", 0), "inet_socket.memberships[0].ifindex"),
    (lambda m: setattr(m.memberships[0], "group", bytes(16)),
     "inet_socket.memberships[0].group"),
    (lambda m: m.memberships[0].sources.append(bytes(3)),
     "inet_socket.memberships[0].sources[0]"),
])
def test_inet_fields_validated(change: Any, field: str) -> None:
    f = inet_file()
    assert list(problems(f)) == []
    change(f.inet_socket)
    with pytest.raises(ImageError, match=rf"corrupted \({re.escape(field)} = "):
        validate("core-42.img", f)


def test_option_value_no_setsockopt_takes_fails_cleanly() -> None:
    """A value past a C int (an image not validated: one written by another tool) fails
    the restore naming the option, and the socket made for it is closed."""
    m = inet_file().inet_socket
    m.options[0].value = 1 << 40
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RestoreError, match=r"fd 3: cannot setsockopt SO_RCVLOWAT: "
                                           r"1099511627776 is not a C int"):
        make_socket(m, Endpoint(m.local.addr, 0), None, "fd 3", contextlib.nullcontext())
    assert len(os.listdir("/proc/self/fd")) == before
