"""The forward-secret handshake on a server of several clients (dsvpn._multi): each extended
hello found by its peer's key, answered by Python (dsvpn.pfs), on the same footing as base
hellos (window, replay memory, probation); --require-pfs; base and extended peers together."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from loop_rig import MultiRig, PfsRawClient, RawClient, dial, ip4_packet, listener, pump, tun_pair
from test_multi_loop import closed, nothing_for, tun_recv

from dsvpn import _loop as L
from dsvpn import cli, peers, peers_server, pfs
from dsvpn.charm import Charm
from dsvpn.config import ServerConfig
from dsvpn.platform import TunFraming

KEYS = {name: os.urandom(32) for name in ("alice", "bob", "carol")}
ADDR = {"alice": "10.8.0.1", "bob": "10.8.0.2", "carol": "10.8.0.3"}
PEERS = [(n, KEYS[n], ADDR[n]) for n in ("alice", "bob", "carol")]


def has(code: int, text: str | None = None):  # type: ignore[no-untyped-def]
    return lambda evs: any(c == code and (text is None or text in m) for c, m in evs)


def pfs_hello(rig: MultiRig, key: bytes, **kw: object) -> PfsRawClient:
    """A --pfs client with key that has sent its extended hello (not yet answered)."""
    c = PfsRawClient(rig.lst, key, **kw)  # type: ignore[arg-type]
    rig.clients.append(c)
    c.hello()
    return c


def pfs_client(rig: MultiRig, name: str) -> PfsRawClient:
    """Peer name connected with the forward-secret handshake, answered and up."""
    c = pfs_hello(rig, rig.peers[name][0])
    assert pump(rig.loop, has(L.EV_PFS_HELLO)) == [(L.EV_PFS_HELLO, "127.0.0.1")]
    assert pfs.answer_hellos(rig.loop) == 1
    pump(rig.loop, has(L.EV_SESSION_UP, f"{name} 127.0.0.1"))
    c.finish()
    return c


def flows(rig: MultiRig, name: str, c: RawClient) -> None:
    """Packets go both ways between peer name's client c and the tun."""
    up = ip4_packet(ADDR[name], "10.0.0.9")
    c.send(up)
    assert tun_recv(rig) == up
    down = ip4_packet("10.0.0.9", ADDR[name])
    rig.peer_tun.send(down)
    assert rig.recv(c) == down


@pytest.fixture
def rig():  # type: ignore[no-untyped-def]
    with MultiRig(PEERS) as r:
        yield r


def test_the_right_key_gets_a_reply_that_verifies_and_frames_flow(rig: MultiRig) -> None:
    c = pfs_hello(rig, KEYS["bob"])
    pump(rig.loop, has(L.EV_PFS_HELLO))
    hello = rig.loop.take_pfs_hello()
    assert hello is not None
    token, state, client_public, who = hello
    assert who == "127.0.0.1, peer bob"
    assert client_public == pfs.client_public(c.pkt1)
    # The state is the transcript after h1 under bob's key: the reply it makes verifies.
    assert rig.loop.take_pfs_hello() is None  # taken once only
    reply, key = pfs.server_reply(Charm.from_state(state), client_public)
    assert rig.loop.pfs_reply(token, reply, key)
    assert rig.loop.pfs_reply(token, reply, key) is False  # done already
    pump(rig.loop, has(L.EV_SESSION_UP, "bob 127.0.0.1"))
    c.finish()  # raises if the reply does not verify under bob's key
    assert c.session_key == key
    flows(rig, "bob", c)
    session = rig.loop.sessions()["bob"]
    assert session["pfs"] is True and session["address"] == ADDR["bob"]
    stats = rig.loop.stats()
    assert stats["handshakes_ok"] == 1 and stats["handshakes_pfs"] == 1
    assert stats["pending_handshakes"] == 0


def test_the_last_of_many_peers_is_found_by_its_extended_hello() -> None:
    peers = [(f"p{i}", os.urandom(32), f"10.8.{i // 250}.{i % 250 + 1}") for i in range(600)]
    with MultiRig(peers, pool="10.8.0.0/16") as rig:
        c = pfs_client(rig, "p599")
        c.send(ip4_packet("10.8.2.100"))
        assert tun_recv(rig) == ip4_packet("10.8.2.100")


def test_a_wrong_key_gets_nothing(rig: MultiRig) -> None:
    rig.loop._set_test_timeouts(accept_ms=300)
    c = pfs_hello(rig, os.urandom(32))
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "authentication failed from 127.0.0.1: wrong key or garbage")]
    assert recv_exact_or_eof(c.sock) == b""  # nothing sent, closed
    assert rig.loop.stats()["handshakes_failed"] == 1
    assert rig.loop.take_pfs_hello() is None


def recv_exact_or_eof(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    try:
        return sock.recv(200)
    except ConnectionResetError:
        return b""


def test_a_replayed_extended_hello_leaves_the_live_session_alone(rig: MultiRig) -> None:
    live = pfs_client(rig, "alice")
    live.send(b"")  # as a --pfs client does at once
    flows(rig, "alice", live)
    replay = dial(rig.lst)  # another host replays alice's recorded hello
    replay.sendall(live.pkt1)
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "replayed handshake from 127.0.0.1 refused (peer alice)")]
    assert rig.loop.take_pfs_hello() is None  # never handed to Python
    assert recv_exact_or_eof(replay) == b""
    replay.close()
    assert rig.loop.stats()["replays"] == 1
    assert rig.loop.sessions()["alice"]["replacement"] is None
    flows(rig, "alice", live)


def test_a_new_extended_handshake_replaces_the_session_through_probation(
    rig: MultiRig,
) -> None:
    old = rig.client("alice")  # a base session first
    new = pfs_hello(rig, KEYS["alice"])
    pump(rig.loop, has(L.EV_PFS_HELLO))
    pfs.answer_hellos(rig.loop)
    evs = pump(rig.loop, has(L.EV_LOG, "new connection"))
    assert "once its first frame authenticates" in evs[-1][1]
    new.finish()
    flows(rig, "alice", old)  # still the old one until the new one's first frame
    new.send(b"")
    evs = pump(rig.loop, has(L.EV_SESSION_UP))
    assert (L.EV_SESSION_DOWN, "alice replaced by a new connection from 127.0.0.1") in evs
    assert closed(rig, old)
    flows(rig, "alice", new)
    assert rig.loop.sessions()["alice"]["pfs"] is True


def test_require_pfs_refuses_a_base_hello_naming_its_peer() -> None:
    with MultiRig(PEERS, require_pfs=True) as rig:
        base = rig.connect("alice")
        evs = pump(rig.loop, has(L.EV_LOG))
        assert evs == [
            (L.EV_LOG, "classic handshake from 127.0.0.1 refused (--require-pfs): peer alice")
        ]
        assert recv_exact_or_eof(base.sock) == b""
        assert rig.loop.sessions() == {}
        # A base hello under no peer's key is still a wrong key.
        rig.loop._set_test_timeouts(accept_ms=200)
        stranger = rig.connect("mallory")
        evs = pump(rig.loop, has(L.EV_LOG))
        assert "authentication failed from 127.0.0.1: wrong key or garbage" in evs[-1][1]
        assert recv_exact_or_eof(stranger.sock) == b""
        # The forward-secret handshake works, for the refused peer too.
        rig.loop._set_test_timeouts()
        for name in ("alice", "bob"):
            c = pfs_client(rig, name)
            flows(rig, name, c)
        assert rig.loop.stats()["handshakes_pfs"] == 2


def test_base_and_extended_peers_at_once(rig: MultiRig) -> None:
    clients: dict[str, RawClient] = {"alice": rig.client("alice")}
    # bob's and carol's extended hellos wait together, alice's traffic meanwhile flows.
    waiting = {n: pfs_hello(rig, KEYS[n]) for n in ("bob", "carol")}
    pump(rig.loop, lambda e: rig.loop.stats()["pending_handshakes"] == 2 and len(e) >= 2)
    flows(rig, "alice", clients["alice"])
    assert pfs.answer_hellos(rig.loop) == 2
    pump(rig.loop, lambda e: sum(c == L.EV_SESSION_UP for c, _ in e) == 2)
    for n, c in waiting.items():
        c.finish()
        clients[n] = c
    for n, c in clients.items():
        flows(rig, n, c)
        for other in clients:
            if other != n:
                nothing_for(rig, clients[other], 20)
    sessions = rig.loop.sessions()
    assert {n: s["pfs"] for n, s in sessions.items()} == {
        "alice": False,
        "bob": True,
        "carol": True,
    }
    # A peer of an extended session still cannot pose as another.
    clients["bob"].send(ip4_packet(ADDR["carol"]))
    clients["bob"].send(ip4_packet(ADDR["bob"]))
    assert tun_recv(rig) == ip4_packet(ADDR["bob"])
    assert rig.loop.sessions()["bob"]["drops"]["spoofed"] == 1


def test_extended_hello_split_in_pieces(rig: MultiRig) -> None:
    c = PfsRawClient(rig.lst, KEYS["carol"])
    rig.clients.append(c)
    for i in range(0, pfs.HELLO_LEN, 10):
        c.sock.sendall(c.pkt1[i : i + 10])
        ev = rig.loop.run(5)
        assert ev[0] == (L.EV_PFS_HELLO if i + 10 >= pfs.HELLO_LEN else L.EV_TIMEOUT), (i, ev)
    assert pfs.answer_hellos(rig.loop) == 1
    pump(rig.loop, has(L.EV_SESSION_UP, "carol"))
    c.finish()
    flows(rig, "carol", c)


def test_a_client_that_stops_half_way_through_the_extended_hello(rig: MultiRig) -> None:
    c = PfsRawClient(rig.lst, KEYS["carol"])
    c.sock.sendall(c.pkt1[:90])
    nothing_for(rig, c, 50)
    c.sock.close()
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "handshake failed from 127.0.0.1: connection closed")]


def test_a_low_order_client_key_is_refused_without_a_reply(rig: MultiRig) -> None:
    # An authentic hello (alice's key) whose E_c is the zero point.
    st = Charm(KEYS["alice"], pfs.PFS_IV)
    body = os.urandom(32) + pfs.timestamp(int(time.time())) + bytes(32)
    s = dial(rig.lst)
    s.sendall(body + st.hash(body))
    pump(rig.loop, has(L.EV_PFS_HELLO))
    assert pfs.answer_hellos(rig.loop) == 0
    evs = pump(rig.loop, has(L.EV_LOG))
    assert "handshake failed from 127.0.0.1: " in evs[-1][1] and "low-order" in evs[-1][1]
    assert recv_exact_or_eof(s) == b""
    s.close()
    assert rig.loop.sessions() == {}


def test_a_hello_of_a_removed_peer_is_not_answered(rig: MultiRig) -> None:
    c = pfs_hello(rig, KEYS["bob"])
    pump(rig.loop, has(L.EV_PFS_HELLO))
    rig.loop.set_peers([p for p in PEERS if p[0] != "bob"])
    assert pfs.answer_hellos(rig.loop) == 0
    evs = pump(rig.loop, has(L.EV_LOG))
    assert evs == [(L.EV_LOG, "handshake failed from 127.0.0.1: its peer was removed")]
    assert recv_exact_or_eof(c.sock) == b""


def test_a_hello_taken_by_python_survives_a_reload_that_keeps_its_peer(rig: MultiRig) -> None:
    c = pfs_hello(rig, KEYS["carol"])
    pump(rig.loop, has(L.EV_PFS_HELLO))
    hello = rig.loop.take_pfs_hello()
    assert hello is not None
    token, state, client_public, _ = hello
    rig.loop.set_peers([p for p in PEERS if p[0] != "alice"])  # carol moves to index 1
    reply, key = pfs.server_reply(Charm.from_state(state), client_public)
    assert rig.loop.pfs_reply(token, reply, key)
    pump(rig.loop, has(L.EV_SESSION_UP, "carol 127.0.0.1"))
    c.finish()
    flows(rig, "carol", c)


def test_an_unanswered_hello_times_out(rig: MultiRig) -> None:
    rig.loop._set_test_timeouts(accept_ms=200)
    c = pfs_hello(rig, KEYS["alice"])
    pump(rig.loop, has(L.EV_PFS_HELLO))
    evs = pump(rig.loop, has(L.EV_LOG))  # nobody answers
    assert evs == [(L.EV_LOG, "handshake timeout from 127.0.0.1")]
    assert pfs.answer_hellos(rig.loop) == 0
    assert recv_exact_or_eof(c.sock) == b""


def test_answer_hellos_wipes_the_state_and_the_session_key() -> None:
    kept: list[bytearray] = []
    state = bytearray(Charm(os.urandom(32), pfs.PFS_IV).state)

    class Source:
        def __init__(self) -> None:
            self.hellos = [(7, state, pfs.ClientHandshake(bytes(32), 0).hello[40:72], "x")]

        def take_pfs_hello(self) -> tuple[int, bytearray, bytes, str] | None:
            return self.hellos.pop() if self.hellos else None

        def pfs_reply(self, token: int, reply: bytes, key: bytes | bytearray) -> bool:
            assert isinstance(key, bytearray) and any(key)
            kept.append(key)
            return True

        def pfs_abort(self, token: int, why: str) -> bool:
            raise AssertionError(why)

    assert pfs.answer_hellos(Source()) == 1
    assert kept[0] == bytes(32) and state == bytes(len(state))


def test_the_client_key_is_a_bytearray_to_wipe() -> None:
    key = os.urandom(32)
    hs = pfs.ClientHandshake(key, int(time.time()))
    st = pfs.verify_hello(key, hs.hello, int(time.time()))
    reply, server_key = pfs.server_reply(st, pfs.client_public(hs.hello))
    client_key = hs.finish(reply)
    assert isinstance(client_key, bytearray) and client_key == server_key
    pfs.wipe(client_key)
    assert client_key == bytes(32)


def test_require_pfs_with_a_peers_file_from_the_command_line_to_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "peers"
    peers.add(path, "alice")
    cfg = cli.parse_args(["server", str(path), "--require-pfs"]).config
    assert isinstance(cfg, ServerConfig) and cfg.require_pfs and cfg.peers_file is not None
    current = peers.load(path)
    tun, peer_tun = tun_pair()
    lst = listener()
    loop = peers_server.make_loop(
        tun.fileno(), lst.fileno(), cfg, current, -1, framing=TunFraming(False, 2, 10)
    )
    c = RawClient(lst, current.peers[0].key)
    try:
        c.hello()
        evs = pump(loop, has(L.EV_LOG))
        assert evs == [
            (L.EV_LOG, "classic handshake from 127.0.0.1 refused (--require-pfs): peer alice")
        ]
    finally:
        loop.close()
        for s in (c.sock, tun, peer_tun, lst):
            s.close()
