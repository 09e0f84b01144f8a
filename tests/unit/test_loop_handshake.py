"""Handshakes of the compiled loop (dsvpn._loop) against the reference transcripts.

Sockets only: TCP on loopback for the session, AF_UNIX SOCK_SEQPACKET as the tun stand-in
(it keeps packet boundaries, one packet per read/write, like a tun device); rigs in loop_rig.
"""

from __future__ import annotations

import re
import socket
import struct
import time

import pytest
from loop_rig import (
    ClientRig,
    RawClient,
    ServerRig,
    dial,
    hx,
    make_pkt1,
    pump,
    recv_exact,
    tun_pair,
)

from dsvpn import _loop as L

KEY = bytes(range(32))


def has(code, text=None):
    return lambda evs: any(c == code and (text is None or text in m) for c, m in evs)


def assert_closed(sock, timeout=5.0):
    sock.settimeout(timeout)
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        return
    assert data == b""


@pytest.fixture
def rigs():
    made: list[ServerRig] = []

    def make(key, **kw):
        r = ServerRig(key, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# --------------------------------------------------------------------- transcripts


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_server_transcript(vectors, rigs, idx):
    h = vectors["handshake"][idx]
    rig = rigs(hx(h["key"]))
    rig.loop._set_test_random(hx(h["server_random"]))
    rig.loop._set_test_clock(h["server_clock"])
    c = dial(rig.lst)
    c.sendall(hx(h["pkt1"]))
    evs = pump(rig.loop, has(L.EV_SESSION_UP))
    assert evs == [(L.EV_SESSION_UP, "127.0.0.1")]
    assert rig.loop.session_active and rig.loop.peer == "127.0.0.1"
    assert recv_exact(c, 64) == hx(h["pkt2"])
    # server -> client: plaintexts into the tun, exact wire bytes out of the socket
    for f in h["server_to_client"]:
        rig.peer_tun.send(hx(f["plaintext"]))
    want = b"".join(hx(f["wire"]) for f in h["server_to_client"])
    pump(rig.loop, lambda _: rig.loop.stats()["sock_tx_bytes"] >= len(want))
    assert recv_exact(c, len(want)) == want
    # client -> server: exact wire bytes in, plaintexts out on the tun
    c.sendall(b"".join(hx(f["wire"]) for f in h["client_to_server"]))
    pump(rig.loop, lambda _: rig.loop.stats()["tun_tx_packets"] == 3)
    for f in h["client_to_server"]:
        assert rig.peer_tun.recv(70000) == hx(f["plaintext"])
    st = rig.loop.stats()
    assert st["frames_rx"] == 3 and st["frames_tx"] == 3 and st["handshakes_ok"] == 1
    assert st["rx_buffered"] == 0 and st["tx_queued"] == 0
    c.close()
    evs = pump(rig.loop, has(L.EV_SESSION_DOWN))
    assert evs == [(L.EV_SESSION_DOWN, "connection closed by peer")]
    assert not rig.loop.session_active and rig.loop.peer is None


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_client_transcript(vectors, idx):
    h = vectors["handshake"][idx]
    with ClientRig(hx(h["key"])) as rig:
        loop, peer_tun = rig.loop, rig.peer_tun
        loop._set_test_random(hx(h["client_random"]))
        loop._set_test_clock(h["timestamp"])
        rig.connect(tcp_options=True)
        srv = rig.srv
        assert recv_exact(srv, 72) == hx(h["pkt1"])
        s2c = [hx(f["wire"]) for f in h["server_to_client"]]
        # pkt2 and the first frame in one segment: the handshake must not eat the frame
        srv.sendall(hx(h["pkt2"]) + s2c[0])
        evs = pump(loop, has(L.EV_SESSION_UP))
        assert evs == [(L.EV_SESSION_UP, "127.0.0.1")]
        srv.sendall(s2c[1] + s2c[2])
        pump(loop, lambda _: loop.stats()["tun_tx_packets"] == 3)
        for f in h["server_to_client"]:
            assert peer_tun.recv(70000) == hx(f["plaintext"])
        for f in h["client_to_server"]:
            peer_tun.send(hx(f["plaintext"]))
        want = b"".join(hx(f["wire"]) for f in h["client_to_server"])
        pump(loop, lambda _: loop.stats()["sock_tx_bytes"] >= len(want))
        assert recv_exact(srv, len(want)) == want
        srv.close()
        evs = pump(loop, has(L.EV_SESSION_DOWN))
        assert evs[-1] == (L.EV_SESSION_DOWN, "connection closed by peer")


# --------------------------------------------------------------------- server checks


def test_handshake_checks(vectors, rigs):
    hc = vectors["vpn_behaviour"]["handshake_checks"]
    sess = hc["session"]
    for case in hc["cases"]:
        rig = rigs(hx(sess["key"]))
        rig.loop._set_test_random(hx(sess["server_random"]))
        rig.loop._set_test_clock(case["server_clock"])
        wrong = "differs" in case["case"]
        ckey = hx(sess["wrong_client_key"] if wrong else sess["key"])
        pkt1, kx = make_pkt1(ckey, hx(sess["client_random"]), case["timestamp"])
        c = dial(rig.lst)
        c.sendall(pkt1)
        if wrong:
            # 72 bytes that are no classic hello could be the start of an extended one: the
            # server refuses them once the client gives up (or at its deadline).
            c.shutdown(socket.SHUT_WR)
        if case["server_result"] == 0:
            evs = pump(rig.loop, has(L.EV_SESSION_UP))
            pkt2 = recv_exact(c, 64)
            assert pkt2[:32] == hx(sess["server_random"])
            assert kx.hash(pkt2[:32]) == pkt2[32:]
        else:
            evs = pump(rig.loop, has(L.EV_LOG))
            msg = evs[-1][1]
            if wrong:
                assert msg == "authentication failed from 127.0.0.1: wrong key or garbage"
            else:
                assert msg.startswith("clock difference too large from 127.0.0.1: its ")
            assert_closed(c)
            st = rig.loop.stats()
            assert st["handshakes_failed"] == 1 and not rig.loop.session_active
        assert case["pkt2_sent"] == (case["server_result"] == 0)
        c.close()


def connect_raw(rig, src="127.0.0.1", **kw):
    rc = RawClient(rig.lst, KEY, src, **kw)
    rc.hello()
    evs = pump(rig.loop, has(L.EV_SESSION_UP))
    rc.finish()
    return rc, evs


def roundtrip(rig, rc, n=20):
    for i in range(n):
        pkt = bytes([0x45]) + i.to_bytes(2, "big") * 30
        sent = rig.loop.stats()["frames_tx"]
        rig.peer_tun.send(pkt)
        pump(rig.loop, lambda _, want=sent + 1: rig.loop.stats()["frames_tx"] == want, step=2)
        assert rc.recv() == pkt
        want = rig.loop.stats()["tun_tx_packets"] + 1
        rc.send(pkt[::-1])
        pump(rig.loop, lambda _, w=want: rig.loop.stats()["tun_tx_packets"] == w, step=2)
        assert rig.peer_tun.recv(70000) == pkt[::-1]


def test_failed_handshakes_do_not_disturb_session(rigs):
    rig = rigs(KEY)
    rc, _ = connect_raw(rig)
    roundtrip(rig, rc, 3)
    # garbage from the same IP
    g = dial(rig.lst)
    g.sendall(bytes(104))  # as long as an extended hello
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "authentication failed from 127.0.0.1: wrong key or garbage")]
    assert_closed(g)
    # stale timestamp
    stale = RawClient(rig.lst, KEY, ts=int(time.time()) - 7300)
    stale.hello()
    evs = pump(rig.loop, has(L.EV_LOG))
    # by how much, and which way: the operator knows which clock to fix
    assert len(evs) == 1 and evs[0][0] == L.EV_LOG
    assert re.fullmatch(
        r"clock difference too large from 127\.0\.0\.1: its clock is 730[0-9] s behind ours "
        r"\(at most 7200 s\)",
        evs[0][1],
    ), evs
    assert_closed(stale.sock)
    # wrong key
    wk = RawClient(rig.lst, bytes(32))
    wk.hello()
    wk.sock.shutdown(socket.SHUT_WR)
    evs = pump(rig.loop, has(L.EV_LOG))
    assert "wrong key or garbage" in evs[0][1]
    assert_closed(wk.sock)
    assert rig.loop.session_active
    roundtrip(rig, rc, 3)
    assert rig.loop.stats()["handshakes_failed"] == 3


def test_silent_pending_handshake_does_not_stall_forwarding(rigs):
    rig = rigs(KEY)
    rig.loop._set_test_timeouts(accept_ms=1500)
    rc, _ = connect_raw(rig)
    silent = dial(rig.lst)
    silent.sendall(b"\x01" * 10)  # a partial pkt1, then nothing
    pump(rig.loop, lambda _: rig.loop.stats()["pending_handshakes"] == 1)
    t0 = time.monotonic()
    roundtrip(rig, rc, 50)
    elapsed = time.monotonic() - t0
    # The C reference would block up to 10 s per byte here; we must keep forwarding.
    assert rig.loop.stats()["pending_handshakes"] == 1
    assert elapsed < 5, elapsed
    evs = pump(rig.loop, has(L.EV_LOG), timeout=5)
    assert evs == [(L.EV_LOG, "handshake timeout from 127.0.0.1")]
    assert time.monotonic() - t0 < 3
    assert_closed(silent)
    assert rig.loop.session_active
    roundtrip(rig, rc, 2)


def test_default_handshake_deadline_is_10s(rigs):
    rig = rigs(KEY)
    silent = dial(rig.lst)
    pump(rig.loop, lambda _: rig.loop.stats()["pending_handshakes"] == 1)
    t0 = time.monotonic()
    # not yet after 1 s
    evs = pump(rig.loop, lambda _: time.monotonic() - t0 > 1.0, step=100)
    assert evs == []
    assert rig.loop.stats()["pending_handshakes"] == 1
    silent.close()
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "handshake failed from 127.0.0.1: connection closed")]


def test_other_ip_refused_same_ip_replaces(rigs):
    rig = rigs(KEY)
    a, evs = connect_raw(rig, src="127.0.0.2")
    assert evs == [(L.EV_SESSION_UP, "127.0.0.2")]
    b = RawClient(rig.lst, KEY, src="127.0.0.3")
    b.hello()
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [
        (L.EV_LOG, "connection from 127.0.0.3 refused: a session from 127.0.0.2 is already active")
    ]
    assert_closed(b.sock)
    roundtrip(rig, a, 2)
    # a reconnect from the same IP replaces the session, once its first frame authenticates
    a2 = RawClient(rig.lst, KEY, src="127.0.0.2")
    a2.hello()
    pump(rig.loop, lambda _: rig.loop.stats()["probation"] == 1)
    a2.finish()
    roundtrip(rig, a, 1)  # the old session still carries traffic
    want = rig.loop.stats()["tun_tx_packets"] + 1
    first = bytes([0x45]) + bytes(range(59))
    a2.send(first)
    evs = pump(rig.loop, lambda _: rig.loop.stats()["tun_tx_packets"] == want)
    assert evs == [(L.EV_SESSION_UP, "127.0.0.2")]
    assert rig.peer_tun.recv(70000) == first  # the frame that ended the probation
    assert_closed(a.sock)
    roundtrip(rig, a2, 3)
    st = rig.loop.stats()
    assert st["handshakes_ok"] == 2 and rig.loop.peer == "127.0.0.2"


def test_pending_limit_drops_oldest(rigs):
    rig = rigs(KEY)
    socks = [dial(rig.lst) for _ in range(10)]
    evs = pump(rig.loop, lambda e: len(e) == 2)
    assert all(c == L.EV_LOG and "too many pending handshakes" in m for c, m in evs)
    assert rig.loop.stats()["pending_handshakes"] == 8
    assert_closed(socks[0])
    assert_closed(socks[1])
    # a genuine client still gets in (it evicts the oldest silent one)
    rc, _ = connect_raw(rig)
    roundtrip(rig, rc, 1)
    for s in socks:
        s.close()


def test_dual_stack_mapped_address_compare():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    tun, peer_tun = tun_pair()
    lst = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lst.bind(("::", 0))
    except OSError:
        pytest.skip("no dual-stack loopback")
    lst.listen(8)
    lst.setblocking(False)
    loop = L.Loop(tun.fileno(), KEY, is_server=True, listen_fd=lst.fileno())
    try:
        port = lst.getsockname()[1]
        v4 = socket.create_connection(("127.0.0.1", port), timeout=5)
        pkt1, _kx = make_pkt1(KEY, bytes(32), int(time.time()))
        v4.sendall(pkt1)
        evs = pump(loop, has(L.EV_SESSION_UP))
        assert evs == [(L.EV_SESSION_UP, "127.0.0.1")]  # ::ffff:127.0.0.1 shown as IPv4
        # the same IPv4 client again: same IP, must not be refused (it goes on probation)
        v4b = socket.create_connection(("127.0.0.1", port), timeout=5)
        v4b.sendall(make_pkt1(KEY, bytes(32), int(time.time()))[0])
        pump(loop, lambda _: loop.stats()["probation"] == 1)
        assert recv_exact(v4b, 64)
        try:
            v6 = socket.create_connection(("::1", port), timeout=5)
        except OSError:
            pytest.skip("no ::1")
        evs = pump(loop, has(L.EV_LOG))
        assert evs == [
            (L.EV_LOG, "connection from ::1 refused: a session from 127.0.0.1 is already active")
        ]
        assert_closed(v6)
    finally:
        loop.close()
        for s in (tun, peer_tun, lst):
            s.close()


# --------------------------------------------------------------------- client failures


def client_rig() -> ClientRig:
    """A client Loop (key KEY) in the middle of its handshake with a test-played server."""
    rig = ClientRig(KEY)
    rig.connect()
    return rig


@pytest.mark.parametrize("how", ["eof", "reset"])
def test_client_server_closes_during_handshake(how):
    with client_rig() as rig:
        loop, srv = rig.loop, rig.srv
        if how == "reset":
            # What a refusing server does: close without reading pkt1, so the kernel sends RST.
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            recv_exact(srv, 72)
        srv.close()
        evs = pump(loop, has(L.EV_HANDSHAKE_FAILED))
        assert evs == [
            (
                L.EV_HANDSHAKE_FAILED,
                "the server closed the connection during the handshake: wrong key, "
                "or the server is busy with another client",
            )
        ]
        assert not loop.session_active
        assert loop.stats()["handshakes_failed"] == 1


def test_client_bad_reply_and_timeout():
    with client_rig() as rig:
        recv_exact(rig.srv, 72)
        rig.srv.sendall(bytes(64))
        evs = pump(rig.loop, has(L.EV_HANDSHAKE_FAILED))
        assert "failed authentication" in evs[0][1]
        assert_closed(rig.srv)
    with client_rig() as rig:
        rig.loop._set_test_timeouts(connect_ms=300)
        c = socket.create_connection(rig.lst.getsockname(), timeout=5)
        rig.loop.connect(c.detach())  # restart with the short deadline
        t0 = time.monotonic()
        evs = pump(rig.loop, has(L.EV_HANDSHAKE_FAILED))
        assert evs == [(L.EV_HANDSHAKE_FAILED, "handshake timed out")]
        assert 0.2 < time.monotonic() - t0 < 2
