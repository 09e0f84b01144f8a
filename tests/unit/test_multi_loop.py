"""The server loop of several clients (dsvpn._multi): each client found by its key, routing by
destination, isolation, replacement through probation, replays, reloads, full sockets."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from loop_rig import (
    MultiRig,
    RawClient,
    dial,
    ip4_packet,
    ip6_packet,
    make_pkt1,
    pump,
    recv_exact,
)

from dsvpn import _loop as L
from dsvpn._multi import MultiLoop

KEYS = {name: os.urandom(32) for name in ("alice", "bob", "carol")}
ADDR = {"alice": "10.8.0.1", "bob": "10.8.0.2", "carol": "10.8.0.3"}
PEERS = [(n, KEYS[n], ADDR[n]) for n in ("alice", "bob", "carol")]
SERVER = "10.8.0.254"


def events_until(rig: MultiRig, cond, timeout: float = 5.0) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    return pump(rig.loop, cond, timeout)


def tun_recv(rig: MultiRig, timeout: float = 5.0) -> bytes:
    """The next packet the loop wrote to the tun (running the loop meanwhile)."""
    rig.peer_tun.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return rig.peer_tun.recv(70000)
        except BlockingIOError:
            assert time.monotonic() < deadline, "nothing written to the tun"
            rig.loop.run(2)


def tun_quiet(rig: MultiRig, ms: int = 100) -> None:
    """Nothing reaches the tun within ms of running the loop."""
    rig.peer_tun.setblocking(False)
    end = time.monotonic() + ms / 1000
    while time.monotonic() < end:
        rig.loop.run(5)
    with pytest.raises(BlockingIOError):
        rig.peer_tun.recv(70000)


def recv_on(rig: MultiRig, c: RawClient, timeout: float = 5.0) -> bytes:
    return rig.recv(c, timeout)


def _len(buf: bytes) -> int:
    return int(struct.unpack("<H", buf[:2])[0])


def nothing_for(rig: MultiRig, c: RawClient, ms: int = 100) -> None:
    c.sock.setblocking(False)
    end = time.monotonic() + ms / 1000
    while time.monotonic() < end:
        rig.loop.run(5)
    with pytest.raises(BlockingIOError):
        c.sock.recv(1)
    c.sock.settimeout(5)


def closed(rig: MultiRig, c: RawClient, timeout: float = 5.0) -> bool:
    """Whether the server closed the client's connection (running the loop meanwhile)."""
    c.sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            rig.loop.run(5)
            continue
        except ConnectionResetError:
            return True
        if not data:
            return True
    return False


@pytest.fixture
def rig():  # type: ignore[no-untyped-def]
    with MultiRig(PEERS) as r:
        yield r


# -- who is who -------------------------------------------------------------------------------


def test_each_client_is_found_by_its_key_and_routed_by_address(rig: MultiRig) -> None:
    clients = {n: rig.client(n) for n in ("alice", "bob", "carol")}
    assert sorted(rig.loop.sessions()) == ["alice", "bob", "carol"]
    assert rig.loop.sessions()["bob"]["address"] == "10.8.0.2"
    # Each one's packets reach the tun.
    for n, c in clients.items():
        pkt = ip4_packet(ADDR[n], "10.0.0.9")
        c.send(pkt)
        assert tun_recv(rig) == pkt
    # A packet for each address (and its IPv6 twin) goes to that client and no other.
    for n in clients:
        for pkt in (ip4_packet("10.0.0.9", ADDR[n]),
                    ip6_packet("2001:db8::9", f"64:ff9b::{ADDR[n]}")):  # fmt: skip
            rig.peer_tun.send(pkt)
            assert recv_on(rig, clients[n]) == pkt
            for other in clients:
                if other != n:
                    nothing_for(rig, clients[other], 20)
    stats = rig.loop.stats()
    assert stats["sessions"] == 3 and stats["handshakes_ok"] == 3
    assert stats["spoofed_drops"] == 0


def test_the_last_of_many_peers_is_found(tmp_path: object) -> None:
    peers = [(f"p{i}", os.urandom(32), f"10.8.{i // 250}.{i % 250 + 1}") for i in range(600)]
    with MultiRig(peers, pool="10.8.0.0/16") as rig:
        c = rig.client("p599")
        c.send(ip4_packet("10.8.2.100"))
        assert tun_recv(rig) == ip4_packet("10.8.2.100")


def test_a_key_not_in_the_peers_is_refused(rig: MultiRig) -> None:
    alice = rig.client("alice")
    # 72 bytes no peer's key authenticates may start an extended hello: the server waits for
    # 32 more (until its deadline, or until the client gives up), and never answers.
    rig.loop._set_test_timeouts(accept_ms=300)
    intruder = rig.connect("mallory")  # a key of its own
    quitter = rig.connect("mallory")
    nothing_for(rig, quitter, 50)
    quitter.sock.close()
    evs = events_until(rig, lambda e: len(e) == 2, timeout=5)
    assert evs == [(L.EV_LOG, "authentication failed from 127.0.0.1: wrong key or garbage")] * 2
    assert intruder.sock.recv(64) == b""  # closed at the deadline, nothing sent
    assert rig.loop.stats()["handshakes_failed"] == 2
    pkt = ip4_packet("10.0.0.9", ADDR["alice"])
    rig.peer_tun.send(pkt)
    assert recv_on(rig, alice) == pkt


def test_a_stale_timestamp_is_refused(rig: MultiRig) -> None:
    old = rig.connect("alice", ts=int(time.time()) - 3 * 3600)
    evs = events_until(rig, lambda e: any(c == L.EV_LOG for c, _ in e))
    assert "clock difference too large from 127.0.0.1" in evs[-1][1]
    assert closed(rig, old)
    assert rig.loop.sessions() == {}


# -- isolation -------------------------------------------------------------------------------


def test_a_peer_cannot_send_as_another_or_as_the_server(rig: MultiRig) -> None:
    alice = rig.client("alice")
    bob = rig.client("bob")
    for src in (ADDR["bob"], SERVER, "10.0.0.9"):
        alice.send(ip4_packet(src))
    alice.send(ip6_packet(f"64:ff9b::{ADDR['bob']}"))
    alice.send(b"\x00" * 30)  # not an IP packet
    good = ip6_packet(f"64:ff9b::{ADDR['alice']}")
    alice.send(good)
    assert tun_recv(rig) == good  # only its own; the others were dropped
    drops = rig.loop.sessions()["alice"]["drops"]
    assert drops["spoofed"] == 4 and drops["non_ip"] == 1
    assert rig.loop.sessions()["bob"]["drops"]["spoofed"] == 0
    assert rig.loop.stats()["spoofed_drops"] == 4
    # bob is unaffected
    pkt = ip4_packet(ADDR["bob"])
    bob.send(pkt)
    assert tun_recv(rig) == pkt


def test_a_peers_own_link_traffic_is_not_called_spoofed(rig: MultiRig) -> None:
    alice = rig.client("alice")
    own_link = [
        ip6_packet("fe80::1", "ff02::2"),  # router solicitation
        ip6_packet("::", "ff02::16"),  # MLD report
        ip6_packet("fe80::1", "fe80::2"),  # neighbour solicitation
    ]
    leaving = [
        ip6_packet("fe80::1", "2001:db8::9"),  # a link-local source off the link
        ip6_packet(f"64:ff9b::{ADDR['bob']}", "ff02::1"),  # bob's address, even on the link
    ]
    for pkt in own_link + leaving:
        alice.send(pkt)
    good = ip4_packet(ADDR["alice"])
    alice.send(good)
    assert tun_recv(rig) == good  # nothing else went through
    drops = rig.loop.sessions()["alice"]["drops"]
    assert drops["link_local"] == 3 and drops["spoofed"] == 2
    stats = rig.loop.stats()
    assert stats["link_local_drops"] == 3 and stats["spoofed_drops"] == 2


def test_no_session_no_delivery(rig: MultiRig) -> None:
    alice = rig.client("alice")
    for dst in (ADDR["bob"], "10.8.0.77", "10.9.0.1"):
        rig.peer_tun.send(ip4_packet("10.0.0.9", dst))
    rig.peer_tun.send(ip6_packet("2001:db8::9", "2001:db8::1"))
    nothing_for(rig, alice, 100)
    assert rig.loop.stats()["no_session_drops"] == 4


def test_a_bad_tag_ends_only_that_session(rig: MultiRig) -> None:
    alice = rig.client("alice")
    bob = rig.client("bob")
    frame = bytearray(alice.frame(ip4_packet(ADDR["alice"])))
    frame[-1] ^= 1
    alice.sock.sendall(bytes(frame))
    evs = events_until(rig, lambda e: (L.EV_SESSION_DOWN, "alice corrupted stream") in e)
    assert (L.EV_SESSION_DOWN, "alice corrupted stream") in evs
    assert closed(rig, alice)
    assert sorted(rig.loop.sessions()) == ["bob"]
    pkt = ip4_packet(ADDR["bob"])
    bob.send(pkt)
    assert tun_recv(rig) == pkt


def test_a_closing_client_is_reported(rig: MultiRig) -> None:
    alice = rig.client("alice")
    alice.sock.close()
    evs = events_until(rig, lambda e: any(c == L.EV_SESSION_DOWN for c, _ in e))
    assert evs == [(L.EV_SESSION_DOWN, "alice connection closed by peer")]
    assert rig.loop.sessions() == {}


# -- one session per peer: replacement, probation, replay -----------------------------------------


def test_a_new_connection_replaces_the_session_once_its_first_frame_authenticates(
    rig: MultiRig,
) -> None:
    old = rig.client("alice")
    bob = rig.client("bob")
    new = rig.connect("alice")
    evs = events_until(rig, lambda e: any("new connection" in m for _, m in e))
    assert "once its first frame authenticates" in evs[-1][1]
    new.finish()
    assert rig.loop.stats()["probation"] == 1
    assert rig.loop.sessions()["alice"]["replacement"] is not None
    # Until then the old session carries alice's traffic.
    pkt = ip4_packet("10.0.0.9", ADDR["alice"])
    rig.peer_tun.send(pkt)
    assert recv_on(rig, old) == pkt
    new.send(b"")  # an empty frame: a keepalive, enough to authenticate
    evs = events_until(rig, lambda e: any(c == L.EV_SESSION_UP for c, _ in e))
    assert (L.EV_SESSION_DOWN, "alice replaced by a new connection from 127.0.0.1") in evs
    assert evs[-1] == (L.EV_SESSION_UP, "alice 127.0.0.1")
    assert closed(rig, old)
    rig.peer_tun.send(pkt)
    assert recv_on(rig, new) == pkt
    # bob never noticed
    assert sorted(rig.loop.sessions()) == ["alice", "bob"]
    rig.peer_tun.send(ip4_packet("10.0.0.9", ADDR["bob"]))
    assert recv_on(rig, bob) == ip4_packet("10.0.0.9", ADDR["bob"])


def test_a_replayed_hello_is_refused_and_the_session_stays(rig: MultiRig) -> None:
    live = rig.client("alice")
    # Another host replays alice's recorded hello.
    replay = socket.create_connection(rig.lst.getsockname(), timeout=5)
    replay.sendall(live.pkt1)
    evs = events_until(rig, lambda e: any("replayed" in m for _, m in e))
    assert "replayed handshake from 127.0.0.1 refused (peer alice)" in evs[-1][1]
    replay.settimeout(5)
    assert replay.recv(64) == b""  # closed, no reply
    replay.close()
    assert rig.loop.stats()["replays"] == 1
    pkt = ip4_packet("10.0.0.9", ADDR["alice"])
    rig.peer_tun.send(pkt)
    assert recv_on(rig, live) == pkt


def test_a_replay_the_server_forgot_still_cannot_take_over(rig: MultiRig) -> None:
    first = rig.client("alice")
    recorded = first.pkt1
    # Nine more handshakes of alice push the first one's random out of what is remembered.
    for _ in range(9):
        c = rig.connect("alice")
        pump(rig.loop, lambda e: any("new connection" in m for _, m in e))
        c.finish()
        c.send(b"")
        pump(rig.loop, lambda e: any(code == L.EV_SESSION_UP for code, _ in e))
        last = c
    replay = socket.create_connection(rig.lst.getsockname(), timeout=5)
    replay.sendall(recorded)
    pump(rig.loop, lambda e: any("new connection" in m for _, m in e))
    assert len(replay.recv(64)) == 64  # answered, and on probation ...
    pkt = ip4_packet("10.0.0.9", ADDR["alice"])
    rig.peer_tun.send(pkt)
    assert recv_on(rig, last) == pkt  # ... while the live session carries on
    # Garbage cannot authenticate: probation ends, the session stays.
    replay.sendall(bytes(8) + b"x" * 20)
    evs = pump(rig.loop, lambda e: any("closed before it replaced" in m for _, m in e))
    assert "corrupted stream" in evs[-1][1]
    replay.close()
    rig.peer_tun.send(pkt)
    assert recv_on(rig, last) == pkt
    assert rig.loop.stats()["probation_closed"] == 1


def test_probation_ends_when_the_old_session_does(rig: MultiRig) -> None:
    old = rig.client("alice")
    new = rig.connect("alice")
    pump(rig.loop, lambda e: any("new connection" in m for _, m in e))
    new.finish()
    old.sock.close()
    evs = pump(rig.loop, lambda e: any(c == L.EV_SESSION_UP for c, _ in e))
    assert evs == [
        (L.EV_SESSION_DOWN, "alice connection closed by peer"),
        (L.EV_SESSION_UP, "alice 127.0.0.1"),
    ]
    pkt = ip4_packet("10.0.0.9", ADDR["alice"])
    rig.peer_tun.send(pkt)
    assert recv_on(rig, new) == pkt


def test_probation_has_the_handshake_deadline(rig: MultiRig) -> None:
    live = rig.client("alice")
    bob = rig.client("bob")
    rig.loop._set_test_timeouts(accept_ms=300)
    silent = rig.connect("alice")
    began = time.monotonic()
    pump(rig.loop, lambda e: any("new connection" in m for _, m in e))
    silent.finish()
    # The start of a frame is not an authenticated frame.
    silent.sock.sendall(silent.frame(ip4_packet(ADDR["alice"]))[:5])
    evs = pump(rig.loop, lambda e: any("closed before" in m for _, m in e))
    # Not before its deadline (the loop's clock counts whole milliseconds, read once a turn).
    assert time.monotonic() - began >= 0.3 - 0.01
    assert evs[-1] == (
        L.EV_LOG,
        "peer alice: new connection from 127.0.0.1 closed before it replaced the session: "
        "no frame authenticated within the handshake timeout",
    )
    assert all(code != L.EV_SESSION_DOWN for code, _ in evs)
    assert closed(rig, silent)
    stats = rig.loop.stats()
    assert stats["probation"] == 0 and stats["probation_closed"] == 1
    assert rig.loop.sessions()["alice"]["replacement"] is None
    # The live sessions carry on.
    for name, c in (("alice", live), ("bob", bob)):
        pkt = ip4_packet("10.0.0.9", ADDR[name])
        rig.peer_tun.send(pkt)
        assert recv_on(rig, c) == pkt
    assert sorted(rig.loop.sessions()) == ["alice", "bob"]


def test_a_newer_connection_takes_the_probation_place(rig: MultiRig) -> None:
    rig.client("alice")
    second = rig.connect("alice")
    pump(rig.loop, lambda e: any("new connection" in m for _, m in e))
    second.finish()
    third = rig.connect("alice")
    evs = pump(rig.loop, lambda e: any("closed before" in m for _, m in e))
    assert "a newer connection completed its handshake" in evs[-1][1]
    assert closed(rig, second)
    third.finish()
    third.send(b"")
    pump(rig.loop, lambda e: any(c == L.EV_SESSION_UP for c, _ in e))
    assert rig.loop.stats()["probation"] == 0


# -- reloads ---------------------------------------------------------------------------------


def test_set_peers_adds_removes_and_leaves_the_others_alone(rig: MultiRig) -> None:
    alice = rig.client("alice")
    bob = rig.client("bob")
    dave_key = os.urandom(32)
    # carol goes, dave comes, bob's key changes, alice stays as she is.
    new_bob = os.urandom(32)
    ended = rig.loop.set_peers(
        [("alice", KEYS["alice"], ADDR["alice"]), ("bob", new_bob, ADDR["bob"]),
         ("dave", dave_key, "10.8.0.4")]
    )  # fmt: skip
    assert ended == ["bob"]
    evs = pump(rig.loop, lambda e: len(e) >= 1)
    assert evs == [(L.EV_SESSION_DOWN, "bob removed from the peers file")]
    assert closed(rig, bob)
    pkt = ip4_packet("10.0.0.9", ADDR["alice"])
    rig.peer_tun.send(pkt)
    assert recv_on(rig, alice) == pkt
    rig.peers["dave"] = (dave_key, "10.8.0.4")
    dave = rig.client("dave")
    dave.send(ip4_packet("10.8.0.4"))
    assert tun_recv(rig) == ip4_packet("10.8.0.4")
    rig.loop._set_test_timeouts(accept_ms=200)
    stale = rig.connect("bob")  # the old key no longer gets in
    pump(rig.loop, lambda e: any("authentication failed" in m for _, m in e))
    assert closed(rig, stale)
    assert sorted(rig.loop.sessions()) == ["alice", "dave"]


@pytest.mark.parametrize(
    "peers",
    [
        [("a", bytes(32), "10.8.0.1"), ("a", bytes(32), "10.8.0.2")],
        [("a", bytes(32), "10.8.0.1"), ("b", bytes(32), "10.8.0.1")],
        [("a", bytes(32), "10.9.0.1")],
        [("a", bytes(32), "10.8.0.0")],
        [("a", bytes(32), "10.8.0.255")],
        [("a", bytes(31), "10.8.0.1")],
        [("a b", bytes(32), "10.8.0.1")],
    ],
)
def test_set_peers_refuses_bad_peers_and_changes_nothing(rig: MultiRig, peers: list) -> None:  # type: ignore[type-arg]
    alice = rig.client("alice")
    with pytest.raises(ValueError):
        rig.loop.set_peers(peers)
    assert rig.loop.stats()["peers"] == 3
    pkt = ip4_packet("10.0.0.9", ADDR["alice"])
    rig.peer_tun.send(pkt)
    assert recv_on(rig, alice) == pkt


def test_bad_arguments() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst = socket.socket()
    try:
        for pool in ("10.0.0.0/8", "10.0.0.0/31"):
            with pytest.raises(ValueError, match="/16 to a /30"):
                MultiLoop(a.fileno(), listen_fd=lst.fileno(), pool=pool)
        with pytest.raises(ValueError, match="MTU"):
            MultiLoop(a.fileno(), listen_fd=lst.fileno(), pool="10.0.0.0/24", mtu=10)
    finally:
        for s in (a, b, lst):
            s.close()


# -- one full socket does not stop the others ------------------------------------------------------


def test_a_full_socket_drops_its_own_packets_only(rig: MultiRig) -> None:
    slow = rig.client("alice")
    fast = rig.client("bob")
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = ip4_packet("10.0.0.9", ADDR["alice"], size=8000)
    # alice never reads: her buffers fill up, her packets are then dropped ...
    deadline = time.monotonic() + 20
    while rig.loop.stats()["congestion_drops"] == 0:
        assert time.monotonic() < deadline, rig.loop.stats()
        for _ in range(20):
            try:
                rig.peer_tun.send(big)
            except BlockingIOError:
                break
        rig.loop.run(2)
    assert rig.loop.sessions()["alice"]["drops"]["congestion"] > 0
    # ... while bob's keep flowing.
    for i in range(20):
        pkt = ip4_packet("10.0.0.9", ADDR["bob"], size=100 + i)
        rig.peer_tun.send(pkt)
        assert recv_on(rig, fast) == pkt
    assert rig.loop.sessions()["bob"]["drops"]["congestion"] == 0


def test_one_full_session_alone_holds_the_tun_instead_of_dropping() -> None:
    # With a single session, a full socket stops the tun reads (backpressure, as _loop):
    # the tun's queue fills up instead, nothing is dropped, all arrives once the client reads.
    with MultiRig(PEERS) as rig:
        c = rig.client("alice")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rig.peer_tun.setblocking(False)
        sent: list[bytes] = []
        while True:  # until the tun stand-in is full: the loop stopped reading it
            pkt = ip4_packet("10.0.0.9", ADDR["alice"], size=4000 + len(sent) % 500)
            try:
                rig.peer_tun.send(pkt)
            except BlockingIOError:
                break
            sent.append(pkt)
            rig.loop.run(0)
        assert rig.loop.stats()["sessions_full"] == 1
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)  # now drain it
        got = []
        buf = b""
        deadline = time.monotonic() + 30
        c.sock.setblocking(False)
        while len(got) < len(sent):
            assert time.monotonic() < deadline, (len(got), len(sent), str(rig.loop.stats()))
            rig.loop.run(1)
            try:
                buf += c.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            while len(buf) >= 8 and len(buf) >= 8 + _len(buf):
                n = _len(buf)
                got.append(c.rx.decrypt(buf[8 : 8 + n], buf[2:8], 6))
                buf = buf[8 + n :]
        assert got == sent
        assert rig.loop.stats()["congestion_drops"] == 0


def test_pending_handshakes_time_out(rig: MultiRig) -> None:
    rig.loop._set_test_timeouts(accept_ms=100)
    silent = dial(rig.lst)
    evs = pump(rig.loop, lambda e: any("timeout" in m for _, m in e))
    assert "handshake timeout from 127.0.0.1" in evs[-1][1]
    silent.close()
    # Meanwhile a real client gets in.
    rig.client("carol")


def test_stats_and_close(rig: MultiRig) -> None:
    rig.client("alice")
    stats = rig.loop.stats()
    assert stats["peers"] == 3 and stats["sessions"] == 1 and stats["pending_handshakes"] == 0
    assert rig.loop.disconnect("alice") is True
    assert rig.loop.disconnect("alice") is False
    assert rig.loop.sessions() == {}
    rig.loop.close()
    with pytest.raises(RuntimeError):
        rig.loop.run(0)


def test_hello_split_in_pieces(rig: MultiRig) -> None:
    pkt1, _ = make_pkt1(KEYS["carol"], os.urandom(32), int(time.time()))
    c = dial(rig.lst)
    seen = []
    for i in range(0, 72, 10):
        c.sendall(pkt1[i : i + 10])
        seen.append(rig.loop.run(5))
        assert seen[-1][0] == (L.EV_SESSION_UP if i == 70 else L.EV_TIMEOUT), seen
    assert seen[-1] == (L.EV_SESSION_UP, "carol 127.0.0.1")
    assert len(recv_exact(c, 64)) == 64
    c.close()


# -- a Linux IFF_VNET_HDR tun (tun_vnet.h) ---------------------------------------------------------


def test_vnet_hdr_tso_to_its_peer_and_gso_from_a_peer() -> None:
    from test_loop_vnet import NO_VH, VH, tcp4, valid

    # tcp4() builds 10.0.0.1 -> 10.0.0.2 segments: alice and bob of this pool.
    peers = [("alice", KEYS["alice"], "10.0.0.1"), ("bob", KEYS["bob"], "10.0.0.2")]
    with MultiRig(peers, pool="10.0.0.0/24", vnet_hdr=True) as rig:
        alice = rig.client("alice")
        bob = rig.client("bob")
        # A TSO packet for bob from the tun: cut into ordinary packets, all for bob.
        payload = bytes(range(256)) * 23  # 5888 bytes: 4 x 1448 + 96
        rig.peer_tun.send(VH.pack(1, 1, 52, 1448, 20, 16) + tcp4(5, payload, flags=0x18, ident=7))
        segs = [rig.recv(bob) for _ in range(5)]
        assert all(valid(s) for s in segs)
        assert b"".join(s[52:] for s in segs) == payload
        nothing_for(rig, alice, 50)
        # alice's segments of one flow, in one write: one GSO write to the tun.
        pay = [bytes([i]) * 1448 for i in range(3)]
        pkts = [tcp4(1000 + 1448 * i, pay[i], ident=i + 1) for i in range(3)]
        alice.sock.sendall(b"".join(alice.frame(p) for p in pkts))
        big = tun_recv(rig)
        assert VH.unpack(big[:10])[1] == 1 and big[10 + 52 :] == b"".join(pay)
        assert rig.loop.stats()["tun_merged"] == 3
        # bob may not send as alice, merged or not
        bob.send(pkts[0])
        alice.send(tcp4(99, b"x", sport=7))
        assert tun_recv(rig) == NO_VH + tcp4(99, b"x", sport=7)
        assert rig.loop.sessions()["bob"]["drops"]["spoofed"] == 1


# -- a tun with an address-family header (macOS utun, OpenBSD tun) -----------------------------


@pytest.mark.parametrize(("af_inet", "af_inet6"), [(2, 30), (2, 24)], ids=["macos", "openbsd"])
def test_tun_header_is_stripped_on_read_and_added_on_write(af_inet: int, af_inet6: int) -> None:
    def af(n: int) -> bytes:
        return struct.pack("!I", n)

    with MultiRig(PEERS, tun_header=True, af_inet=af_inet, af_inet6=af_inet6) as rig:
        alice = rig.client("alice")
        bob = rig.client("bob")
        # tun -> peers: routed by the packet after the header, which is not framed
        for name, c in (("alice", alice), ("bob", bob)):
            v4 = ip4_packet("10.0.0.9", ADDR[name])
            v6 = ip6_packet("2001:db8::9", f"64:ff9b::{ADDR[name]}")
            rig.peer_tun.send(af(af_inet) + v4)
            assert recv_on(rig, c) == v4
            rig.peer_tun.send(af(af_inet6) + v6)
            assert recv_on(rig, c) == v6
        # peers -> tun: each packet gets the family of its version
        for name, c in (("alice", alice), ("bob", bob)):
            v4 = ip4_packet(ADDR[name])
            v6 = ip6_packet(f"64:ff9b::{ADDR[name]}")
            c.send(v4)
            assert tun_recv(rig) == af(af_inet) + v4
            c.send(v6)
            assert tun_recv(rig) == af(af_inet6) + v6
        # a read shorter than the header, or nothing after it: dropped, the loop reads on
        rig.peer_tun.send(b"\0\0")
        rig.peer_tun.send(af(af_inet))
        pkt = ip4_packet("10.0.0.9", ADDR["alice"])
        rig.peer_tun.send(af(af_inet) + pkt)
        assert recv_on(rig, alice) == pkt
        stats = rig.loop.stats()
        assert stats["short_drops"] == 2 and stats["tun_tx_errors"] == 0
        assert stats["tun_tx_packets"] == 4 and stats["frames_tx"] == 5
        nothing_for(rig, bob, 20)


def test_tun_header_excludes_vnet_hdr() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst = socket.socket()
    try:
        with pytest.raises(ValueError, match="exclude each other"):
            MultiLoop(a.fileno(), listen_fd=lst.fileno(), pool="10.0.0.0/24",
                      tun_header=True, vnet_hdr=True)  # fmt: skip
    finally:
        for s in (a, b, lst):
            s.close()


# -- each session's flow queue ------------------------------------------------------------------


def _udp(src: str, dst: str, sport: int, size: int, tag: int) -> bytes:
    pkt = bytearray(ip4_packet(src, dst, size))
    pkt[9] = 17
    pkt[20:24] = struct.pack("!HH", sport, 80)
    pkt[28:32] = struct.pack("!I", tag)
    return bytes(pkt)


def test_a_peers_ping_leaves_ahead_of_its_own_bulk_backlog(rig: MultiRig) -> None:
    alice = rig.client("alice")
    alice.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    bulk = [_udp("10.0.0.9", ADDR["alice"], 1000, 1400, i) for i in range(400)]
    ping = bytearray(ip4_packet("10.0.0.9", ADDR["alice"], 84))
    ping[9] = 1
    rig.peer_tun.setblocking(False)
    for pkt in bulk:  # alice does not read meanwhile: her socket fills, the rest queues
        rig.peer_tun.send(pkt)
        rig.loop.run(0)
    rig.peer_tun.send(bytes(ping))
    rig.loop.run(0)
    alice.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)  # now she reads
    got = []
    while bytes(ping) not in got:
        got.append(recv_on(rig, alice))
    # Ahead of most of the backlog: behind what the socket held and one batch at most.
    assert len(got) < 200, len(got)
    while len(got) < 401:
        got.append(recv_on(rig, alice))
    assert [g for g in got if g != bytes(ping)] == bulk  # the bulk flow keeps its order
    assert rig.loop.sessions()["alice"]["drops"]["congestion"] == 0
