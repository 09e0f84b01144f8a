"""dsvpn._loop end to end: a client Loop and a server Loop talking over loopback TCP."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time

import pytest
from loop_rig import ClientRig, Pair, pump, serve_handshake, tun_pair

from dsvpn import _loop as L

KEY = bytes(range(1, 33))


@pytest.fixture
def pair():
    p = Pair(KEY)
    yield p
    p.close()


def test_end_to_end_both_directions(pair):
    pair.connect()
    assert pair.cli.peer == "127.0.0.1" and pair.srv.session_active
    rnd = random.Random(7)
    up = [bytes([0x45]) + os.urandom(rnd.randrange(19, 9000)) for _ in range(300)]
    down = [bytes([0x60]) + os.urandom(rnd.randrange(0, 1500)) for _ in range(300)]
    got_up: list[bytes] = []
    got_down: list[bytes] = []
    for i in range(300):
        pair.cpeer.send(up[i])
        pair.speer.send(down[i])
        if i % 50 == 49:
            pump(
                [pair.cli, pair.srv],
                lambda _, n=i + 1: (
                    pair.srv.stats()["tun_tx_packets"] == n
                    and pair.cli.stats()["tun_tx_packets"] == n
                ),
            )
            got_up += [pair.speer.recv(70000) for _ in range(50)]
            got_down += [pair.cpeer.recv(70000) for _ in range(50)]
    # every packet intact; packets of different flows may leave the flow queue in another order
    assert sorted(got_up) == sorted(up) and sorted(got_down) == sorted(down)
    cs, ss = pair.cli.stats(), pair.srv.stats()
    assert cs["frames_tx"] == ss["frames_rx"] == 300
    assert ss["frames_tx"] == cs["frames_rx"] == 300
    assert cs["sock_tx_bytes"] == ss["sock_rx_bytes"] == sum(len(p) + 8 for p in up)
    assert cs["congestion_drops"] == 0 and cs["tun_tx_errors"] == 0


def test_disconnect_and_reconnect(pair):
    pair.connect()
    pair.cli.disconnect()
    assert not pair.cli.session_active and pair.cli.peer is None
    evs = pump([pair.srv], lambda e: e)
    assert evs == [(L.EV_SESSION_DOWN, "connection closed by peer")]
    pair.connect()
    pair.cpeer.send(b"\x45" * 100)
    pump([pair.cli, pair.srv], lambda _: pair.srv.stats()["tun_tx_packets"] == 1)
    assert pair.speer.recv(70000) == b"\x45" * 100
    assert pair.srv.stats()["handshakes_ok"] == 2
    pair.srv.close()
    with pytest.raises(RuntimeError):
        pair.srv.run(1)
    evs = pump([pair.cli], lambda e: e)
    assert evs[0][0] == L.EV_SESSION_DOWN


def test_wake_fd_and_timeout_promptness():
    tun, peer = tun_pair()
    r, w = os.pipe()
    os.set_blocking(r, False)
    loop = L.Loop(tun.fileno(), KEY, is_server=True, wake_fd=r)
    try:
        t0 = time.monotonic()
        assert loop.run(150) == (L.EV_TIMEOUT, "")
        assert 0.14 < time.monotonic() - t0 < 2  # bounds loose enough for a busy machine
        os.write(w, b"\x02\x0f")
        t0 = time.monotonic()
        assert loop.run(5000)[0] == L.EV_WAKE
        assert time.monotonic() - t0 < 2
        with pytest.raises(BlockingIOError):
            os.read(r, 10)  # the loop drained it
        assert loop.run(0) == (L.EV_TIMEOUT, "")
    finally:
        loop.close()
        for fd in (r, w):
            os.close(fd)
        tun.close()
        peer.close()


def test_run_returns_promptly_under_load(pair):
    pair.connect()
    stop = threading.Event()
    pkt = b"\x45" + bytes(1399)

    def feed():
        pair.cpeer.settimeout(0.2)
        while not stop.is_set():
            try:
                pair.cpeer.send(pkt)
            except TimeoutError:
                continue
            except OSError:
                return

    def sink():
        pair.speer.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                pair.speer.recv(70000)

    def serve():
        while not stop.is_set():
            pair.srv.run(20)

    threads = [threading.Thread(target=f, daemon=True) for f in (feed, sink, serve)]
    for t in threads:
        t.start()
    try:
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            ev = pair.cli.run(50)
            worst = max(worst, time.monotonic() - t0)
            assert ev == (L.EV_TIMEOUT, "")
        # A loop that ignored its timeout while the tun stays readable would not return at
        # all while the feed goes on; the bound is loose so that a busy machine passes.
        assert worst < 5, worst
        assert pair.cli.stats()["frames_tx"] > 100
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_send_timeout():
    rig = ClientRig(KEY, rcvbuf=16384)
    loop = rig.loop
    try:
        rig.connect(sndbuf=16384)
        serve_handshake(rig.srv, KEY)
        pump([loop], lambda e: e)
        assert loop.session_active and struct.calcsize("<Q") == 8
        loop._set_test_timeouts(send_ms=400)
        # the peer never reads: the socket fills, frames stay queued, no progress
        evs: list[tuple[int, str]] = []
        deadline = time.monotonic() + 10
        while not evs:
            assert time.monotonic() < deadline, loop.stats()
            for _ in range(20):
                rig.peer_tun.send(b"\x45" + bytes(1399))
            ev = loop.run(20)
            if ev[0] != L.EV_TIMEOUT:
                evs.append(ev)
        assert evs == [(L.EV_SESSION_DOWN, "send timeout")]
        assert loop.stats()["tx_queued"] == 0
        rig.srv.close()
    finally:
        rig.close()


def test_tcp_options():
    s = socket.socket()
    try:
        L.tcp_options(s.fileno())
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60000
        if hasattr(socket, "TCP_NOTSENT_LOWAT"):
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 131072
    finally:
        s.close()
    L.tcp_options(-1)  # errors are ignored


def test_bad_key_and_connect_on_server():
    tun, peer = tun_pair()
    try:
        with pytest.raises(ValueError):
            L.Loop(tun.fileno(), b"short", is_server=True)
        loop = L.Loop(tun.fileno(), KEY, is_server=True)
        s = socket.socket()
        fd = s.detach()
        with pytest.raises(ValueError):
            loop.connect(fd)
        with pytest.raises(OSError):
            os.fstat(fd)  # owned, so closed even though connect() refused it
        loop.close()
    finally:
        tun.close()
        peer.close()
