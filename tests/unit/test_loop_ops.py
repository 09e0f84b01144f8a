"""What the loop gives operators and the control plane: per-session counters, the control fd,
a failing random source, SO_MARK, and the enums shared with Python."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from loop_rig import (
    ClientRig,
    Pair,
    RawClient,
    ServerRig,
    ip4_packet,
    pump,
    serve_handshake,
    stat,
    tun_pair,
)

from dsvpn import _loop as L

KEY = bytes(range(3, 35))
RANDOM_FAILED = "the system's random source failed: " + os.strerror(errno.EIO)


def has(code: int) -> object:
    return lambda evs: any(c == code for c, _ in evs)


# --------------------------------------------------------------------- enums


def test_events_are_one_enum() -> None:
    names = [e.name for e in L.Event]
    assert names[0] == "EV_TIMEOUT" and "EV_CONTROL" in names
    assert len({int(e) for e in L.Event}) == len(names)
    for e in L.Event:
        assert getattr(L, e.name) is e  # the module attributes are the enum's members
    tun, peer = tun_pair()
    loop = L.Loop(tun.fileno(), KEY, is_server=True)
    try:
        code, message = loop.run(0)
        assert code is L.Event.EV_TIMEOUT and message == ""
    finally:
        loop.close()
        tun.close()
        peer.close()


def test_drop_names_and_timeouts() -> None:
    tun, peer = tun_pair()
    loop = L.Loop(tun.fileno(), KEY, is_server=True)
    try:
        names = [d.name.removeprefix("DROP_").lower() for d in L.Drop]
        assert names == [
            *("bad_tag", "oversize", "no_session", "spoofed", "congestion", "non_ip"),
            "link_local",
        ]
        st = loop.stats()
        assert all(st[f"{n}_drops"] == 0 for n in names)
    finally:
        loop.close()
        tun.close()
        peer.close()
    assert L.Timeout.TIMEOUT_MS == 60_000 and L.Timeout.ACCEPT_TIMEOUT_MS == 10_000


# --------------------------------------------------------------------- session counters


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair(KEY)
    yield p
    p.close()


def test_session_counters(pair: Pair) -> None:
    assert pair.srv.session() is None and pair.srv.ended_session() is None
    # packets with no session are dropped; they count for the session that comes up next
    for _ in range(3):
        pair.speer.send(ip4_packet("10.0.0.1"))
    pump(pair.srv, lambda _: stat(pair.srv, "no_session_drops") == 3)
    t0 = int(time.time())
    pair.connect()
    t1 = int(time.time())
    up = [ip4_packet("10.0.0.2", size=100 + i) for i in range(5)]
    down = [ip4_packet("10.0.0.1", size=300 + i) for i in range(7)]
    for p in up:
        pair.cpeer.send(p)
    for p in down:
        pair.speer.send(p)
    pump(
        [pair.cli, pair.srv],
        lambda _: stat(pair.srv, "tun_tx_packets") == 5 and stat(pair.cli, "tun_tx_packets") == 7,
    )
    s = pair.srv.session()
    c = pair.cli.session()
    assert s is not None and c is not None
    up_bytes = sum(len(p) + 8 for p in up)
    down_bytes = sum(len(p) + 8 for p in down)
    assert (s["rx_packets"], s["rx_bytes"], s["tx_packets"], s["tx_bytes"]) == (
        5,
        up_bytes,
        7,
        down_bytes,
    )
    assert (c["rx_packets"], c["rx_bytes"], c["tx_packets"], c["tx_bytes"]) == (
        7,
        down_bytes,
        5,
        up_bytes,
    )
    assert t0 <= s["since"] <= t1 and s["latest_handshake"] == s["since"]
    assert s["drops"]["no_session"] == 3 and c["drops"]["no_session"] == 0
    # endpoints: each side names the other's address and port
    host, port = pair.lst.getsockname()
    assert c["endpoint"] == f"{host}:{port}"
    assert s["endpoint"].startswith("127.0.0.1:") and s["endpoint"] != c["endpoint"]

    # the client goes away: the server keeps the session's totals and why it ended
    pair.cli.disconnect()
    assert pair.cli.session() is None
    ended_c = pair.cli.ended_session()
    assert ended_c is not None and ended_c["reason"] == "disconnected locally"
    assert ended_c["tx_packets"] == 5
    evs = pump(pair.srv, lambda e: e)
    assert evs == [(L.EV_SESSION_DOWN, "connection closed by peer")]
    assert pair.srv.session() is None
    ended = pair.srv.ended_session()
    assert ended is not None
    assert ended["reason"] == "connection closed by peer" and ended["ended"] >= ended["since"]
    assert (ended["rx_packets"], ended["tx_bytes"]) == (5, down_bytes)

    # the next session starts from zero, and only the gap's drops count as its own
    pair.speer.send(ip4_packet("10.0.0.1"))
    pump(pair.srv, lambda _: stat(pair.srv, "no_session_drops") == 4)
    pair.connect()
    s2 = pair.srv.session()
    assert s2 is not None
    assert (s2["rx_packets"], s2["tx_packets"], s2["rx_bytes"], s2["tx_bytes"]) == (0, 0, 0, 0)
    assert s2["drops"]["no_session"] == 1
    assert stat(pair.srv, "frames_rx") == 5  # the global counters carry on


def test_replaced_session_is_recorded() -> None:
    with ServerRig(KEY) as rig:
        first = RawClient(rig.lst, KEY)
        first.hello()
        pump(rig.loop, has(L.EV_SESSION_UP))
        first.finish()
        first.send(ip4_packet("10.0.0.2"))
        pump(rig.loop, lambda _: stat(rig.loop, "tun_tx_packets") == 1)
        second = RawClient(rig.lst, KEY)
        second.hello()
        pump(rig.loop, lambda _: stat(rig.loop, "probation") == 1)
        second.finish()
        second.send(ip4_packet("10.0.0.2"))  # its first frame ends the probation
        pump(rig.loop, has(L.EV_SESSION_UP))
        ended = rig.loop.ended_session()
        assert ended is not None and ended["rx_packets"] == 1
        assert ended["reason"] == "replaced by a new session from the same address"
        session = rig.loop.session()
        assert session is not None and session["rx_packets"] == 1 and not session["pfs"]
        for rc in (first, second):
            rc.sock.close()


# --------------------------------------------------------------------- control fd


def test_control_fd_returns_without_reading() -> None:
    tun, peer = tun_pair()
    ours, theirs = socket.socketpair()
    loop = L.Loop(tun.fileno(), KEY, is_server=True, control_fd=ours.fileno())
    try:
        assert loop.run(0) == (L.EV_TIMEOUT, "")
        theirs.send(b"?")
        t0 = time.monotonic()
        assert loop.run(5000) == (L.EV_CONTROL, "")
        assert time.monotonic() - t0 < 2
        # not read by the loop: it says so again until Python reads it
        assert loop.run(5000) == (L.EV_CONTROL, "")
        assert ours.recv(10) == b"?"
        assert loop.run(50) == (L.EV_TIMEOUT, "")
    finally:
        loop.close()
        for s in (tun, peer, ours, theirs):
            s.close()


def test_control_fd_is_answered_promptly_at_full_throughput() -> None:
    ours, theirs = socket.socketpair()
    p = Pair(KEY, client={"control_fd": ours.fileno()})
    stop = threading.Event()
    pkt = ip4_packet("10.0.0.2", size=1400)

    def feed() -> None:
        p.cpeer.settimeout(0.2)
        while not stop.is_set():
            try:
                p.cpeer.send(pkt)
            except TimeoutError:
                continue
            except OSError:
                return

    def sink() -> None:
        p.speer.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                p.speer.recv(70000)

    def serve() -> None:
        while not stop.is_set():
            p.srv.run(20)

    threads = [threading.Thread(target=f, daemon=True) for f in (feed, sink, serve)]
    try:
        p.connect()
        for t in threads:
            t.start()
        pump(p.cli, lambda _: stat(p.cli, "frames_tx") > 1000, timeout=10)
        delays = []
        for _ in range(10):
            theirs.send(b"s")
            t0 = time.monotonic()
            while p.cli.run(1000)[0] != L.EV_CONTROL:
                pass
            delays.append(time.monotonic() - t0)
            assert ours.recv(10) == b"s"
            p.cli.run(5)  # traffic flows between the requests
        assert stat(p.cli, "frames_tx") > 2000
        # Unanswered, a request would wait for run()'s 1 s timeout; the margins are for a
        # busy machine.
        assert statistics.median(delays) < 0.3, delays
        assert max(delays) < 0.9, delays
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(5)
        p.close()
        ours.close()
        theirs.close()


# --------------------------------------------------------------------- random source


def test_client_handshake_fails_without_random_bytes() -> None:
    with ClientRig(KEY) as rig:
        rig.loop._set_test_random_failure(True)
        rig.connect()
        evs = pump(rig.loop, has(L.EV_HANDSHAKE_FAILED))
        assert evs == [(L.EV_HANDSHAKE_FAILED, RANDOM_FAILED)]
        assert stat(rig.loop, "handshakes_failed") == 1 and not rig.loop.session_active
        assert rig.srv is not None
        assert rig.srv.recv(100) == b""  # closed, and no pkt1 was sent
        # once the source works again, so does the handshake
        rig.loop._set_test_random_failure(False)
        rig.connect()
        assert rig.srv is not None
        serve_handshake(rig.srv, KEY)
        evs = pump(rig.loop, has(L.EV_SESSION_UP))
        assert evs == [(L.EV_SESSION_UP, "127.0.0.1")]


def test_server_handshake_fails_without_random_bytes() -> None:
    with ServerRig(KEY) as rig:
        rig.loop._set_test_random_failure(True)
        rc = RawClient(rig.lst, KEY)
        rc.hello()
        evs = pump(rig.loop, has(L.EV_LOG))
        assert evs == [(L.EV_LOG, f"handshake failed from 127.0.0.1: {RANDOM_FAILED}")]
        assert rc.sock.recv(100) == b""  # no pkt2
        assert stat(rig.loop, "handshakes_failed") == 1 and not rig.loop.session_active
        rig.loop._set_test_random_failure(False)
        rc2 = RawClient(rig.lst, KEY)
        rc2.hello()
        pump(rig.loop, has(L.EV_SESSION_UP))
        rc2.finish()
        rc2.send(ip4_packet("10.0.0.2"))
        pump(rig.loop, lambda _: stat(rig.loop, "tun_tx_packets") == 1)
        assert rig.peer_tun.recv(70000) == ip4_packet("10.0.0.2")
        for s in (rc.sock, rc2.sock):
            s.close()


# --------------------------------------------------------------------- SO_MARK

SO_MARK = getattr(socket, "SO_MARK", 36)
linux_root = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="SO_MARK: Linux, as root"
)


@linux_root
def test_tcp_options_sets_the_mark() -> None:
    with socket.socket() as marked, socket.socket() as plain:
        L.tcp_options(marked.fileno(), mark=42069)
        L.tcp_options(plain.fileno())
        assert marked.getsockopt(socket.SOL_SOCKET, SO_MARK) == 42069
        assert plain.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
        assert marked.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@linux_root
def test_accepted_sockets_carry_the_loops_mark() -> None:
    with ServerRig(KEY, mark=4242) as rig:
        rc = RawClient(rig.lst, KEY)
        rc.hello()
        pump(rig.loop, has(L.EV_SESSION_UP))
        rc.finish()
        # the loop's socket is the one whose peer is our client socket
        ours = rc.sock.getsockname()
        marks = []
        for fd in map(int, os.listdir("/proc/self/fd")):
            with contextlib.suppress(OSError):
                s = socket.socket(fileno=os.dup(fd))
                with s:
                    if s.type == socket.SOCK_STREAM and s.getpeername() == ours:
                        marks.append(s.getsockopt(socket.SOL_SOCKET, SO_MARK))
        assert marks == [4242]
        rc.sock.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_MARK is Linux only")
def test_a_mark_that_cannot_be_set_is_an_error() -> None:
    with pytest.raises(OSError) as err:
        L.tcp_options(-1, mark=42069)
    assert err.value.errno == errno.EBADF and "SO_MARK 42069" in str(err.value)
    L.tcp_options(-1)  # without a mark, errors are still ignored
