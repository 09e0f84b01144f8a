"""The forward-secret handshake in the compiled loop (docs/protocol.md, Extensions): the server
telling the two hellos apart, handing the extended one to Python and installing its key;
--require-pfs; probation (a replayed hello never ends a live session); the client's adopt()."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from loop_rig import (
    ClientRig,
    PfsRawClient,
    RawClient,
    ServerRig,
    dial,
    ip4_packet,
    pump,
    recv_exact,
    stat,
)
from test_pfs import (
    E_S_SECRET,
    HELLO,
    KEY,
    LOW_ORDER,
    R_C,
    R_S,
    REPLY,
    SESSION_KEY,
    T,
)

from dsvpn import _loop as L
from dsvpn import pfs
from dsvpn.charm import Charm

# docs/protocol.md, Extensions, Known answers: the first client frame carrying 000102..13.
FIRST_FRAME = bytes.fromhex("14008d357fe605170b0b46e0a07ed9bd07968534c1f12b43b664a2cd")


def has(code, text=None):
    return lambda evs: any(c == code and (text is None or text in m) for c, m in evs)


def assert_closed(sock, timeout=5.0):
    """The peer closed sock without sending anything."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(200)
    except ConnectionResetError:
        return
    assert data == b""


@pytest.fixture
def rigs():
    made: list[ServerRig] = []

    def make(key=KEY, **kw):
        r = ServerRig(key, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def answer(rig):
    """Pump the server until an extended hello waits, then answer it as the server does."""
    pump(rig.loop, has(L.EV_PFS_HELLO))
    return pfs.answer_hellos(rig.loop)


def connect_pfs(rig, src="127.0.0.1", **kw):
    c = PfsRawClient(rig.lst, KEY, src, **kw)
    c.hello()
    assert answer(rig) == 1
    c.finish()
    if stat(rig.loop, "probation"):
        pump(rig.loop, has(L.EV_LOG, "new connection from"))
    else:
        pump(rig.loop, has(L.EV_SESSION_UP))
    return c


def roundtrip(rig, client, n=3):
    """Packets both ways through the server's live session with client."""
    for i in range(n):
        pkt = ip4_packet("10.0.0.2", size=60 + i)
        sent = stat(rig.loop, "frames_tx")
        rig.peer_tun.send(pkt)
        pump(rig.loop, lambda _, want=sent + 1: stat(rig.loop, "frames_tx") == want)
        assert client.recv() == pkt
        want = stat(rig.loop, "tun_tx_packets") + 1
        client.send(pkt)
        pump(rig.loop, lambda _, w=want: stat(rig.loop, "tun_tx_packets") == w)
        assert rig.peer_tun.recv(70000) == pkt


def signed_hello(key, body):
    return body + Charm(key, pfs.PFS_IV).hash(body)


# --------------------------------------------------------------------- server: known answers


def test_server_known_answers(rigs):
    rig = rigs()
    rig.loop._set_test_clock(T)
    c = dial(rig.lst)
    c.sendall(HELLO)
    evs = pump(rig.loop, has(L.EV_PFS_HELLO))
    assert evs == [(L.EV_PFS_HELLO, "127.0.0.1")]
    token, state, client_public, peer = rig.loop.take_pfs_hello()
    assert rig.loop.take_pfs_hello() is None  # handed out once
    assert peer == "127.0.0.1" and client_public == pfs.client_public(HELLO)
    expected = Charm(KEY, pfs.PFS_IV)
    expected.hash(HELLO[:72])
    assert bytes(state) == expected.state  # the transcript state after H1, nothing more
    reply, key = pfs.server_reply(
        Charm.from_state(state), client_public, random=R_S, secret=E_S_SECRET
    )
    assert (reply, key) == (REPLY, SESSION_KEY)
    assert rig.loop.pfs_reply(token, reply, key)
    assert pump(rig.loop, has(L.EV_SESSION_UP)) == [(L.EV_SESSION_UP, "127.0.0.1")]
    assert recv_exact(c, 96) == REPLY
    session = rig.loop.session()
    assert session is not None and session["pfs"]
    st = rig.loop.stats()
    assert (st["handshakes_ok"], st["handshakes_pfs"], st["handshakes_failed"]) == (1, 1, 0)
    # Direction states exactly as classic, from the derived key: the documented frame.
    c.sendall(FIRST_FRAME)
    pump(rig.loop, lambda _: stat(rig.loop, "tun_tx_packets") == 1)
    assert rig.peer_tun.recv(100) == bytes(range(20))
    rig.peer_tun.send(bytes(range(30)))
    pump(rig.loop, lambda _: stat(rig.loop, "frames_tx") == 1)
    hdr = recv_exact(c, 8)
    assert struct.unpack("<H", hdr[:2]) == (30,)
    rx = Charm(SESSION_KEY, b"\x01" + bytes(15))
    assert rx.decrypt(recv_exact(c, 30), hdr[2:], 6) == bytes(range(30))
    # a pfs_reply for a handshake that is over does nothing
    assert not rig.loop.pfs_reply(token, reply, key)


def test_server_reads_the_hello_in_pieces(rigs):
    rig = rigs()
    c = PfsRawClient(rig.lst, KEY)
    # 72 bytes first: they do not verify as classic, so the server waits for the rest
    c.sock.sendall(c.pkt1[:72])
    t0 = time.monotonic()
    assert pump(rig.loop, lambda _: time.monotonic() - t0 > 0.3) == []
    assert stat(rig.loop, "pending_handshakes") == 1
    for i in range(72, 99, 5):
        c.sock.sendall(c.pkt1[i : i + 5])
        t1 = time.monotonic()
        # nothing before the last piece
        assert pump(rig.loop, lambda e, t1=t1: e or time.monotonic() - t1 > 0.02, step=1) == []
    c.sock.sendall(c.pkt1[102:])
    assert pump(rig.loop, has(L.EV_PFS_HELLO)) == [(L.EV_PFS_HELLO, "127.0.0.1")]
    assert pfs.answer_hellos(rig.loop) == 1
    c.finish()
    pump(rig.loop, has(L.EV_SESSION_UP))
    roundtrip(rig, c)


def test_the_first_frame_may_follow_the_hello_at_once(rigs):
    # Bytes after the 104 belong to the session, exactly as after a classic hello.
    rig = rigs()
    c = PfsRawClient(rig.lst, KEY)
    c.hello()
    assert answer(rig) == 1
    c.finish()
    c.sock.sendall(c.frame(ip4_packet("10.0.0.2")) + c.frame(ip4_packet("10.0.0.3")))
    pump(rig.loop, lambda _: stat(rig.loop, "tun_tx_packets") == 2)
    assert rig.peer_tun.recv(100) == ip4_packet("10.0.0.2")
    assert rig.peer_tun.recv(100) == ip4_packet("10.0.0.3")


def test_classic_handshake_still_served(rigs):
    rig = rigs()
    rc = RawClient(rig.lst, KEY)
    rc.hello()
    pump(rig.loop, has(L.EV_SESSION_UP))
    rc.finish()
    session = rig.loop.session()
    assert session is not None and not session["pfs"]
    roundtrip(rig, rc)


# --------------------------------------------------------------------- server: refusals


def test_wrong_key_extended_hello_refused(rigs):
    rig = rigs()
    c = PfsRawClient(rig.lst, bytes(32))
    c.hello()
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "authentication failed from 127.0.0.1: wrong key or garbage")]
    assert_closed(c.sock)
    assert stat(rig.loop, "handshakes_failed") == 1 and not rig.loop.session_active


@pytest.mark.parametrize(
    ("field", "offset"), [("R_c", 0), ("T", 32), ("E_c", 40), ("H1", 72), ("H1 end", 103)]
)
def test_each_hello_field_tampered_is_refused(rigs, field, offset):
    rig = rigs()
    rig.loop._set_test_clock(T)
    bad = bytearray(HELLO)
    bad[offset] ^= 0x01
    c = dial(rig.lst)
    c.sendall(bytes(bad))
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "authentication failed from 127.0.0.1: wrong key or garbage")]
    assert_closed(c)


@pytest.mark.parametrize("skew", [7201, -7201])
def test_extended_hello_outside_the_window_refused(rigs, skew):
    rig = rigs()
    rig.loop._set_test_clock(T + skew)
    c = dial(rig.lst)
    c.sendall(HELLO)
    evs = pump(rig.loop, has(L.EV_LOG))
    way = "behind" if skew > 0 else "ahead of"  # the server's clock is the one moved
    assert evs == [
        (
            L.EV_LOG,
            f"clock difference too large from 127.0.0.1: its clock is 7201 s {way} ours "
            "(at most 7200 s)",
        )
    ]
    assert_closed(c)


@pytest.mark.parametrize("skew", [7200, -7200])
def test_extended_hello_at_the_window_edge_accepted(rigs, skew):
    rig = rigs()
    rig.loop._set_test_clock(T + skew)
    c = dial(rig.lst)
    c.sendall(HELLO)
    assert pump(rig.loop, has(L.EV_PFS_HELLO)) == [(L.EV_PFS_HELLO, "127.0.0.1")]


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "order-8"])
def test_low_order_client_key_closes_without_a_reply(rigs, point):
    rig = rigs()
    c = dial(rig.lst)
    c.sendall(signed_hello(KEY, R_C + int(time.time()).to_bytes(8, "little") + point))
    pump(rig.loop, has(L.EV_PFS_HELLO))
    assert pfs.answer_hellos(rig.loop) == 0
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [
        (
            L.EV_LOG,
            "handshake failed from 127.0.0.1: the peer's public key is a low-order point",
        )
    ]
    assert_closed(c)
    st = rig.loop.stats()
    assert st["handshakes_failed"] == 1 and st["handshakes_pfs"] == 0
    assert not rig.loop.session_active


def test_classic_wrong_key_is_refused_at_the_deadline(rigs):
    # 72 bytes that are no classic hello under our key may be the start of an extended one.
    rig = rigs()
    rig.loop._set_test_timeouts(accept_ms=1500)
    rc = RawClient(rig.lst, bytes(32))
    t0 = time.monotonic()
    rc.hello()
    assert pump(rig.loop, lambda _: time.monotonic() - t0 > 1.0, step=50) == []
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "authentication failed from 127.0.0.1: wrong key or garbage")]
    assert time.monotonic() - t0 < 3
    assert_closed(rc.sock)


def test_unanswered_hello_times_out(rigs):
    rig = rigs()
    rig.loop._set_test_timeouts(accept_ms=800)
    c = PfsRawClient(rig.lst, KEY)
    c.hello()
    pump(rig.loop, has(L.EV_PFS_HELLO))
    token, *_ = rig.loop.take_pfs_hello()
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "handshake timeout from 127.0.0.1")]
    assert not rig.loop.pfs_reply(token, bytes(96), bytes(32))
    assert not rig.loop.pfs_abort(token, "late")
    assert_closed(c.sock)


def test_require_pfs_refuses_classic_and_names_the_client(rigs):
    rig = rigs(require_pfs=True)
    rc = RawClient(rig.lst, KEY)
    rc.hello()
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "classic handshake from 127.0.0.1 refused (--require-pfs)")]
    assert_closed(rc.sock)
    assert not rig.loop.session_active and stat(rig.loop, "handshakes_failed") == 1
    c = connect_pfs(rig)
    assert rig.loop.session_active
    roundtrip(rig, c)


def test_another_address_is_refused_during_an_extended_session(rigs):
    rig = rigs()
    a = connect_pfs(rig, "127.0.0.2")
    b = PfsRawClient(rig.lst, KEY, "127.0.0.3")
    b.hello()
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [
        (L.EV_LOG, "connection from 127.0.0.3 refused: a session from 127.0.0.2 is already active")
    ]
    assert_closed(b.sock)
    roundtrip(rig, a)


# --------------------------------------------------------------------- replay and probation


def test_replayed_extended_hello_does_not_end_the_live_session(rigs):
    rig = rigs()
    live = connect_pfs(rig)
    roundtrip(rig, live)
    # The recorded hello, replayed from the same address within the window.
    replayer = dial(rig.lst)
    replayer.sendall(live.pkt1)
    assert answer(rig) == 1
    reply = recv_exact(replayer, 96)
    assert reply[64:] != bytes(32)  # it gets a genuine reply...
    pump(rig.loop, lambda _: stat(rig.loop, "probation") == 1)
    assert rig.loop.session_active
    roundtrip(rig, live)  # ...but the live session goes on
    # Without the client's ephemeral secret it cannot make a frame that authenticates.
    replayer.sendall(struct.pack("<H", 20) + os.urandom(26))
    evs = pump(rig.loop, has(L.EV_LOG, "closed before it replaced"))
    assert evs[-1] == (
        L.EV_LOG,
        "new connection from 127.0.0.1 closed before it replaced the active session: its "
        "first frame failed authentication (a replayed hello?)",
    )
    assert_closed(replayer)
    st = rig.loop.stats()
    assert st["probation"] == 0 and st["probation_closed"] == 1
    assert rig.loop.session_active
    roundtrip(rig, live)


def test_replayed_classic_hello_does_not_end_the_live_session(rigs):
    rig = rigs()
    live = RawClient(rig.lst, KEY)
    live.hello()
    pump(rig.loop, has(L.EV_SESSION_UP))
    live.finish()
    roundtrip(rig, live)
    replayer = dial(rig.lst)
    replayer.sendall(live.pkt1)
    pump(rig.loop, lambda _: stat(rig.loop, "probation") == 1)
    recv_exact(replayer, 64)
    roundtrip(rig, live)
    replayer.close()  # gives up: the probation ends, the session stays
    pump(rig.loop, lambda _: stat(rig.loop, "probation") == 0)
    assert rig.loop.session_active and stat(rig.loop, "probation_closed") == 1
    roundtrip(rig, live)


def test_probation_has_the_handshake_deadline(rigs):
    rig = rigs()
    live = connect_pfs(rig)
    rig.loop._set_test_timeouts(accept_ms=300)
    began = time.monotonic()
    silent = connect_pfs(rig)  # same address: on probation
    assert stat(rig.loop, "probation") == 1
    silent.sock.sendall(silent.frame(ip4_packet("10.0.0.2"))[:5])  # only the start of a frame
    evs = pump(rig.loop, has(L.EV_LOG, "closed before it replaced"))
    # Not before its deadline (the loop's clock counts whole milliseconds, read once a turn).
    assert time.monotonic() - began >= 0.3 - 0.01
    assert evs[-1] == (
        L.EV_LOG,
        "new connection from 127.0.0.1 closed before it replaced the active session: no frame "
        "authenticated within the handshake timeout",
    )
    assert all(code != L.EV_SESSION_DOWN for code, _ in evs)
    assert_closed(silent.sock)
    st = rig.loop.stats()
    assert st["probation"] == 0 and st["probation_closed"] == 1
    assert rig.loop.session_active and rig.loop.ended_session() is None
    roundtrip(rig, live)


def test_genuine_reconnect_replaces_the_session_after_its_first_frame(rigs):
    rig = rigs()
    old = connect_pfs(rig)
    new = connect_pfs(rig)  # same address
    assert stat(rig.loop, "probation") == 1
    roundtrip(rig, old, 1)
    # A --pfs client's loop sends an empty frame first (adopt()): that is enough.
    new.send(b"")
    evs = pump(rig.loop, has(L.EV_SESSION_UP))
    assert evs[-1] == (L.EV_SESSION_UP, "127.0.0.1")
    assert_closed(old.sock)
    ended = rig.loop.ended_session()
    assert ended is not None
    assert ended["reason"] == "replaced by a new session from the same address"
    assert stat(rig.loop, "probation") == 0
    roundtrip(rig, new)


def test_probation_promoted_when_the_live_session_ends(rigs):
    rig = rigs()
    old = connect_pfs(rig)
    new = connect_pfs(rig)
    partial = new.frame(ip4_packet("10.0.0.9"))
    new.sock.sendall(partial[:5])  # a first frame that has only begun
    pump(rig.loop, lambda _: stat(rig.loop, "sock_rx_bytes") >= 0)
    old.sock.close()
    evs = pump(rig.loop, has(L.EV_SESSION_UP))
    assert evs == [(L.EV_SESSION_DOWN, "connection closed by peer"), (L.EV_SESSION_UP, "127.0.0.1")]
    new.sock.sendall(partial[5:])
    pump(rig.loop, lambda _: stat(rig.loop, "tun_tx_packets") == 1)
    assert rig.peer_tun.recv(100) == ip4_packet("10.0.0.9")
    roundtrip(rig, new)


def test_a_newer_connection_takes_the_probation_place(rigs):
    rig = rigs()
    live = connect_pfs(rig)
    first = connect_pfs(rig)
    second = connect_pfs(rig)
    assert_closed(first.sock)
    st = rig.loop.stats()
    assert st["probation"] == 1 and st["probation_closed"] == 1
    second.send(ip4_packet("10.0.0.2"))
    pump(rig.loop, has(L.EV_SESSION_UP))
    assert rig.peer_tun.recv(100) == ip4_packet("10.0.0.2")
    assert_closed(live.sock)
    roundtrip(rig, second)


def test_probation_ends_with_the_loop(rigs):
    rig = rigs()
    connect_pfs(rig)
    new = connect_pfs(rig)
    rig.loop.disconnect()
    assert stat(rig.loop, "probation") == 0
    assert_closed(new.sock)


# --------------------------------------------------------------------- client: adopt()


def serve_pfs(srv: socket.socket, key: bytes) -> bytes:
    """Play the server side of an extended handshake on an accepted socket: the key."""
    hello = recv_exact(srv, pfs.HELLO_LEN)
    st = pfs.verify_hello(key, hello, int(time.time()))
    reply, k = pfs.server_reply(st, pfs.client_public(hello))
    srv.sendall(reply)
    return k


def test_client_adopt_installs_the_session_and_sends_an_empty_frame():
    with ClientRig(KEY) as rig:
        c = socket.socket()
        c.settimeout(5)
        c.connect(rig.lst.getsockname())
        srv, _ = rig.lst.accept()
        srv.settimeout(5)
        rig.srv = srv
        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append(serve_pfs(srv, KEY)))
        t.start()
        c.setblocking(False)
        key = pfs.client_exchange(c, KEY, lambda s, r: _ready(c, s, r), 5)
        t.join()
        assert result == [key]
        rig.loop.adopt(c.detach(), key)
        assert pump(rig.loop, has(L.EV_SESSION_UP)) == [(L.EV_SESSION_UP, "127.0.0.1")]
        session = rig.loop.session()
        assert session is not None and session["pfs"]
        # an empty frame first, under the client-to-server state
        rx = Charm(key, bytes(16))
        hdr = recv_exact(srv, 8)
        assert hdr[:2] == b"\x00\x00"
        assert rx.decrypt(b"", hdr[2:], 6) == b""
        rig.peer_tun.send(ip4_packet("10.0.0.2"))
        pump(rig.loop, lambda _: stat(rig.loop, "frames_tx") == 2)
        hdr = recv_exact(srv, 8)
        (n,) = struct.unpack("<H", hdr[:2])
        assert rx.decrypt(recv_exact(srv, n), hdr[2:], 6) == ip4_packet("10.0.0.2")
        tx = Charm(key, b"\x01" + bytes(15))
        ct, tag = tx.encrypt(ip4_packet("10.0.0.3"))
        srv.sendall(struct.pack("<H", len(ct)) + tag[:6] + ct)
        pump(rig.loop, lambda _: stat(rig.loop, "tun_tx_packets") == 1)
        assert rig.peer_tun.recv(100) == ip4_packet("10.0.0.3")


def test_adopt_refuses_a_bad_key_and_closes_the_socket():
    with ClientRig(KEY) as rig:
        a, b = socket.socketpair()
        with pytest.raises(ValueError, match="32 bytes"):
            rig.loop.adopt(a.detach(), bytes(31))
        b.settimeout(5)
        assert b.recv(10) == b""  # closed by the loop
        b.close()


def test_adopt_is_for_clients(rigs):
    rig = rigs()
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="client"):
        rig.loop.adopt(a.detach(), bytes(32))
    b.close()


def _ready(sock: socket.socket, seconds: float, readable: bool) -> bool:
    import select

    r, w, _ = select.select([sock] if readable else [], [] if readable else [sock], [], seconds)
    return bool(r or w)


def test_dsvpn_client_to_dsvpn_server_and_reconnect_with_fresh_keys(rigs):
    """client_exchange + adopt() on one side, the server loop + answer_hellos on the other,
    twice: each connection has fresh ephemeral keys, and the reconnect replaces the session
    at once (the client's empty frame ends the probation)."""
    rig = rigs()
    ctun, cpeer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cli = L.Loop(ctun.fileno(), KEY, is_server=False)
    seen: list[bytes] = []
    real_take = rig.loop.take_pfs_hello
    try:
        for attempt in range(2):
            c = socket.create_connection(rig.lst.getsockname(), timeout=5)
            c.setblocking(False)
            stop = threading.Event()

            def serve(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    event, _ = rig.loop.run(5)
                    if event == L.EV_PFS_HELLO:
                        hello = real_take()
                        assert hello is not None
                        seen.append(hello[2])
                        token, state, peer_public, _peer = hello
                        reply, k = pfs.server_reply(Charm.from_state(state), peer_public)
                        rig.loop.pfs_reply(token, reply, k)

            t = threading.Thread(target=serve)
            t.start()
            try:
                key = pfs.client_exchange(c, KEY, lambda s, r, c=c: _ready(c, s, r), 5)
            finally:
                stop.set()
                t.join()
            cli.adopt(c.detach(), key)
            pump(cli, has(L.EV_SESSION_UP))
            pump(rig.loop, lambda _: rig.loop.session_active and stat(rig.loop, "probation") == 0)
            assert stat(rig.loop, "handshakes_pfs") == attempt + 1
            # traffic both ways
            cpeer.send(ip4_packet("10.0.0.2"))
            n = attempt + 1
            pump([cli, rig.loop], lambda _, n=n: stat(rig.loop, "tun_tx_packets") == n)
            assert rig.peer_tun.recv(100) == ip4_packet("10.0.0.2")
            rig.peer_tun.send(ip4_packet("10.9.0.1", "10.0.0.2"))
            cpeer.settimeout(5)
            pump([rig.loop, cli], lambda _, n=n: stat(cli, "tun_tx_packets") == n)
            assert cpeer.recv(100) == ip4_packet("10.9.0.1", "10.0.0.2")
        assert len(seen) == 2 and seen[0] != seen[1]
    finally:
        cli.close()
        ctun.close()
        cpeer.close()


# --------------------------------------------------------------------- client_exchange


def _pfs_server(behaviour):
    """A listener whose first connection gets behaviour(sock) in a thread."""
    lst = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        s, _ = lst.accept()
        with s:
            behaviour(s)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    c = socket.create_connection(lst.getsockname(), timeout=5)
    c.setblocking(False)
    return lst, c, t


def _exchange(c, timeout=5.0):
    return pfs.client_exchange(c, KEY, lambda s, r: _ready(c, s, r), timeout)


def _c_dsvpn_server(s):
    # C DSVPN: reads 72 bytes, finds no valid H1 there, closes (32 bytes left unread: RST).
    recv_exact(s, 72)


@pytest.mark.parametrize(
    "behaviour",
    [_c_dsvpn_server, lambda s: None, lambda s: (recv_exact(s, 104), s.sendall(bytes(50)))],
    ids=["c-server-reset", "closed-at-once", "closed-mid-reply"],
)
def test_exchange_refused_by_the_server(behaviour):
    lst, c, t = _pfs_server(behaviour)
    with lst, c, pytest.raises(pfs.NotAcceptedError):
        _exchange(c)
    t.join(5)


def test_exchange_bad_reply_is_a_handshake_error():
    def bad(s):
        recv_exact(s, 104)
        s.sendall(bytes(96))

    lst, c, t = _pfs_server(bad)
    with lst, c, pytest.raises(pfs.HandshakeError, match="wrong key") as info:
        _exchange(c)
    assert not isinstance(info.value, pfs.NotAcceptedError)
    t.join(5)


def test_exchange_times_out():
    done = threading.Event()
    lst, c, t = _pfs_server(lambda s: done.wait(5))
    t0 = time.monotonic()
    with lst, c, pytest.raises(TimeoutError):
        _exchange(c, timeout=0.5)
    assert time.monotonic() - t0 < 2
    done.set()
    t.join(5)


def test_exchange_leaves_the_first_frame_in_the_socket():
    def server(s):
        k = serve_pfs(s, KEY)
        tx = Charm(k, b"\x01" + bytes(15))
        ct, tag = tx.encrypt(b"hello")
        s.sendall(struct.pack("<H", 5) + tag[:6] + ct)

    lst, c, t = _pfs_server(server)
    with lst, c:
        key = _exchange(c)
        c.setblocking(True)
        c.settimeout(5)
        hdr = recv_exact(c, 8)
        assert Charm(key, b"\x01" + bytes(15)).decrypt(recv_exact(c, 5), hdr[2:], 6) == b"hello"
    t.join(5)


def test_exchange_uses_fresh_ephemeral_keys():
    hellos: list[bytes] = []

    def server(s):
        hellos.append(recv_exact(s, 104))

    for _ in range(2):
        lst, c, t = _pfs_server(server)
        with lst, c, pytest.raises(pfs.NotAcceptedError):
            _exchange(c)
        t.join(5)
    assert len(hellos) == 2
    assert pfs.client_public(hellos[0]) != pfs.client_public(hellos[1])
    assert hellos[0][:32] != hellos[1][:32]
